"""True outcomes whatever fails: Glance down or hung, signals, crashes,
stale requests, an unusable journal.

Each test injects one fault into real services around a real worker and
asserts the end state a user cares about: the image active and identical,
or deleted with an error notification that tells the truth about it;
nothing left behind; the next request served. Glance faults use a Glance
of the class's own (started and stopped by the class), never the shared
one the other tests use.
"""

import configparser
import os
import signal
import subprocess
import sys
import tempfile
import time

from oslo_utils import units
from testtools import content

from snapworker import events
from snapworker import notifications
from snapworker.conf import CONF
from tests import services
from tests.functional import base
from tests.services import glance as glance_service
from tests.services import worker as worker_service

MiB = units.Mi


def _journal(workdir):
    path = os.path.join(workdir, 'journal')
    return sorted(n for n in os.listdir(path) if n.endswith('.json'))


class OutcomeTestCase(base.FunctionalTestCase):

    def assertServesNext(self):
        disk = self.make_disk(f'next-{time.monotonic_ns()}', 'raw',
                              size='1M')
        instance, _ = self.define_domain(path=disk, fmt='raw')
        image = self.create_image()
        last = self.snapshot(instance, image)[-1]
        self.assertEqual(notifications.END, last.event_type, last.payload)


class GlanceFaultTest(OutcomeTestCase):
    """A Glance of its own that the tests kill, restart and freeze."""

    @classmethod
    def setUpClass(cls):
        cls.glance_dir = os.path.join(
            tempfile.mkdtemp(prefix='snapworker-glance-'), 'glance')
        cls.own_glance = glance_service.start(cls.glance_dir)
        cls.worker_conf = {
            'glance.endpoint_override': cls.own_glance.url,
            # Bounded waits, so a hung Glance fails a job in seconds.
            'glance.timeout': '3', 'glance.num_retries': '1',
        }
        try:
            super().setUpClass()
        except BaseException:
            cls.own_glance.stop()
            raise
        cls.glance = cls.own_glance.client()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.own_glance.stop()

    def _restart_glance(self):
        port = int(self.own_glance.url.rsplit(':', 1)[1])
        type(self).own_glance = glance_service.start(self.glance_dir,
                                                     port=port)

    def _fault_mid_upload(self, inject, undo=lambda: None):
        """Start a snapshot, ``inject`` a fault once bytes flow, follow it.

        :returns: the image, the final event and the seconds from the
            fault to that event.
        """
        disk = self.make_disk(f'big-{time.monotonic_ns()}', 'raw',
                              size='384M', writes=('write -P 0x42 0 320M',))
        instance, _ = self.define_domain(path=disk, fmt='raw')
        image = self.create_image()
        with events.Subscription(CONF, image_id=image) as sub:
            self.api.create_snapshot(self.context, self.worker.host,
                                     instance, image)
            event = sub.wait(30)
            while event.event_type != notifications.PROGRESS or (
                    not event.payload['bytes_uploaded']):
                event = sub.wait(30)
            inject()
            injected = time.monotonic()
            try:
                final = list(sub.until_finished(60))[-1]
            finally:
                undo()
        return image, final, time.monotonic() - injected

    def _settled(self, image):
        """The reaper deleted the image and the journal let it go."""
        self.wait_for(lambda: self.image_status(image) == 'deleted',
                      'the reaper to delete the image', timeout=90)
        self.wait_for(lambda: not _journal(self.workdir),
                      'the journal record to go')
        self.assertNoScratchLeft()
        self.assertNoHelperLeft()
        self.assertServesNext()

    def test_glance_killed_mid_upload_and_back_later(self):
        image, final, elapsed = self._fault_mid_upload(self.own_glance.stop)
        self.assertEqual(notifications.ERROR, final.event_type)
        self.assertLess(elapsed, 30)
        # Glance could not be told: the truth is what it last said, and
        # the journal keeps the image until Glance confirms its deletion.
        self.assertNotEqual('deleted', final.payload['image_status'])
        self.assertEqual([f'{image}.json'], _journal(self.workdir))
        time.sleep(25)
        self._restart_glance()
        back = time.monotonic()
        self._settled(image)
        self.addDetail('seconds', content.text_content(
            f'error {elapsed:.1f} s after the kill; deleted within '
            f'{time.monotonic() - back:.1f} s of Glance being back'))

    def test_glance_hung_mid_upload(self):
        group = self.own_glance.pid
        image, final, elapsed = self._fault_mid_upload(
            lambda: os.killpg(group, signal.SIGSTOP),
            lambda: os.killpg(group, signal.SIGCONT))
        self.assertEqual(('snapshot.create.error', 'GlanceUnavailable'),
                         (final.event_type, final.payload['error_code']))
        # The slot and the disk are free within a few timeouts.
        self.assertLess(elapsed, 20)
        self._settled(image)


class StopAndCrashTest(OutcomeTestCase):

    worker_conf = {'worker.max_concurrent_snapshots': '1'}

    def _queue_three(self, sub, disk, instance):
        images = [self.create_image() for _ in range(3)]
        for image in images:
            self.api.create_snapshot(self.context, self.worker.host,
                                     instance, image, 'raw')
        event = sub.wait(30)
        while event is not None and (
                event.image_id not in images
                or event.event_type != notifications.START):
            event = sub.wait(30)
        self.assertEqual(images[0], event.image_id)
        return images

    def _helpers(self):
        found = []
        for pid in worker_service.process_tree(self.worker.process.proc.pid):
            try:
                with open(f'/proc/{pid}/comm') as f:
                    if f.read().strip() in ('qemu-nbd', 'qemu-img'):
                        found.append(pid)
            except OSError:
                pass
        return found

    def _stop_mid_stream(self, stop):
        """Stop the worker with ``stop(pid)`` while a stream runs."""
        # qcow2 to raw: the running job reads through qemu-nbd.
        disk = self.make_disk(f'nbd-src-{time.monotonic_ns()}', 'qcow2',
                              size='256M', writes=('write -P 0x5a 0 160M',))
        instance, _ = self.define_domain(path=disk, fmt='qcow2')
        with events.Subscription(CONF) as sub:
            images = self._queue_three(sub, disk, instance)
            self.wait_for(self._helpers, 'qemu-nbd to run')
            helpers = self._helpers()
            stop(self.worker.process.proc.pid)
            finals = self.final_events(sub, images)
        self.assertEqual(0, self.worker.process.proc.wait(60))
        self.assertEqual((notifications.END, None), finals[images[0]])
        self.assertTrue(base.images_identical(
            disk, self.download(images[0], 'raw')))
        for image in images[1:]:
            self.assertEqual((notifications.ERROR, 'WorkerStopping'),
                             finals[image])
            self.assertEqual('deleted', self.image_status(image))
        for pid in helpers:
            self.assertFalse(base.process_running(pid), pid)
        self.assertEqual([], _journal(self.workdir))
        self._restart()

    def test_group_sigterm_mid_stream_finishes_the_running_snapshot(self):
        # As init scripts stop a service: the whole process group.
        self._stop_mid_stream(lambda pid: os.killpg(pid, signal.SIGTERM))

    def test_stop_as_the_shipped_systemd_unit_does(self):
        unit = configparser.ConfigParser(strict=False)
        unit.read(os.path.join(services.REPO_ROOT, 'etc', 'systemd',
                               'snapworker-worker.service'))
        service = unit['Service']
        # KillMode=mixed: KillSignal to the main process only; SIGKILL
        # for what is left only after TimeoutStopSec.
        self.assertEqual('mixed', service['KillMode'])
        signum = getattr(signal, service['KillSignal'])
        self.assertGreater(int(service['TimeoutStopSec']), 60)
        self._stop_mid_stream(lambda pid: os.kill(pid, signum))

    def _restart(self):
        old = self.worker.process
        self.worker.process = worker_service.WorkerProcess(
            old.conf_path, f'{old.log_path}.{time.monotonic_ns()}')
        self.worker.process.start()

    def test_sigkill_with_queued_requests_ends_each_one(self):
        disk = self.make_disk('kill-src', 'qcow2', size='256M',
                              writes=('write -P 0x5b 0 160M',))
        instance, _ = self.define_domain(path=disk, fmt='qcow2')
        with events.Subscription(CONF) as sub:
            images = self._queue_three(sub, disk, instance)
            self.wait_for(self._helpers, 'qemu-nbd to run')
            helpers = self._helpers()
            os.killpg(self.worker.process.proc.pid, signal.SIGKILL)
            self.worker.process.proc.wait(30)
            # Accepted requests are journalled before they wait.
            self.assertEqual(sorted(f'{i}.json' for i in images),
                             _journal(self.workdir))
            self._restart()
            finals = self.final_events(sub, images)
        for image in images:
            self.assertEqual((notifications.ERROR, 'WorkerRestarted'),
                             finals[image])
            self.assertEqual('deleted', self.image_status(image))
        self.assertEqual([], _journal(self.workdir))
        for pid in helpers:
            self.assertFalse(base.process_running(pid), pid)
        self.assertNoScratchLeft()
        self.assertServesNext()

    def test_stale_request_touches_nothing(self):
        disk = self.make_disk('stale', 'raw', size='1M')
        instance, _ = self.define_domain(path=disk, fmt='raw')
        image = self.create_image()
        last = self.snapshot(instance, image, 'raw',
                             sent_at=time.time() - 1000,
                             max_virtual_size=None)[-1]
        self.assertEqual(('snapshot.create.error', 'StaleRequest'),
                         (last.event_type, last.payload['error_code']))
        self.assertIn('1000', last.payload['error_message'])
        # Nova gave up and deletes it itself; the worker left it alone.
        self.assertEqual('queued', self.image_status(image))
        self.assertServesNext()


class JournalDirTest(base.FunctionalTestCase):

    def test_unusable_journal_dir_exits_without_respawning(self):
        blocker = os.path.join(self.workdir, 'not-a-dir')
        with open(blocker, 'w') as f:
            f.write('x')
        conf = os.path.join(self.workdir, 'bad-journal.conf')
        worker_service.write_config(
            conf, host='bad-journal', services=self.services,
            instances_path=self.instances_path,
            scratch_dir=os.path.join(self.workdir, 'bad-scratch'),
            journal_dir=os.path.join(blocker, 'journal'))
        started = time.monotonic()
        proc = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable),
                          'snapworker-worker'), '--config-file', conf],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(2, proc.returncode, proc.stderr[-2000:])
        self.assertLess(time.monotonic() - started, 30)
        self.assertIn('journal_dir', proc.stderr)
        self.assertIn('is unusable', proc.stderr)
        self.assertNotIn('listening', proc.stderr)
