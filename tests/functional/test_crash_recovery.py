"""A worker killed mid-snapshot leaves nothing behind once it is back.

Each test SIGKILLs the real worker's process group (parent, forked child
and the qemu-img it runs) while a snapshot is running, with resources
provably on disk, and then starts a new worker with the same host, config,
journal and scratch directory. The restarted worker must clean up before
it listens: scratch directory and RBD snapshot gone, the half-made Glance
image deleted, and one ``snapshot.create.error`` (``WorkerRestarted``).
"""

import os
import signal

import rbd
from oslo_utils import units

from snapworker import events
from snapworker.conf import CONF
from tests.functional import base
from tests.functional import rbd_helpers
from tests.services import worker as worker_service

MiB = units.Mi
START = 'snapshot.create.start'
ERROR = 'snapshot.create.error'


class CrashRecoveryTestCase(base.FunctionalTestCase):

    @property
    def journal_dir(self):
        return os.path.join(self.workdir, 'journal')

    def journal_records(self):
        return sorted(name for name in os.listdir(self.journal_dir)
                      if name.endswith('.json'))

    def start_snapshot(self, sub, instance_uuid, image_id, target_format):
        self.api.create_snapshot(self.context, self.worker.host,
                                 instance_uuid, image_id,
                                 target_format=target_format)
        event = sub.wait(60)
        self.assertIsNotNone(event, self.worker.log_tail())
        self.assertEqual(START, event.event_type,
                         f'{event.payload}\n{self.worker.log_tail()}')

    def kill_worker(self):
        proc = self.worker.process.proc
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def restart_worker(self):
        """A new worker process on the same config (host, dirs, journal).

        It logs to a new file: the old log already holds the line that
        says a worker is listening.
        """
        old = self.worker.process
        log_path = os.path.join(self.workdir,
                                f'{self.worker.host}-restarted.log')
        self.worker.process = worker_service.WorkerProcess(old.conf_path,
                                                           log_path)
        self.worker.process.start()

    def wait_restarted_error(self, sub, image_id):
        """The recovery's error event, and nothing after it.

        Events the killed worker sent before it died (source_released,
        progress) are skipped; it never sent a final one.
        """
        event = sub.wait(60)
        while event is not None and event.event_type not in (
                ERROR, 'snapshot.create.end'):
            event = sub.wait(60)
        self.assertIsNotNone(event, self.worker.log_tail())
        self.assertEqual((ERROR, 'WorkerRestarted'),
                         (event.event_type, event.payload['error_code']),
                         f'{event.payload}\n{self.worker.log_tail()}')
        self.assertEqual(image_id, event.image_id)
        self.assertEqual('deleted', event.payload['image_status'])
        self.assertIsNone(sub.wait(2), 'a second event for the image')
        return event.payload


class ConvertCrashTest(CrashRecoveryTestCase):
    """A convert plan killed while its scratch copy exists."""

    worker_conf = {'worker.compress_qcow2': 'True'}

    def test_sigkill_during_convert_removes_scratch_and_image(self):
        disk = self.make_disk('big', 'qcow2', size='512M',
                              writes=('write -P 0x5a 0 256M',))
        instance, _ = self.define_domain(path=disk, fmt='qcow2')
        image_id = self.create_image()
        workdir = os.path.join(self.worker.scratch_dir,
                               f'convert-{image_id}')
        with events.Subscription(CONF, image_id=image_id) as sub:
            self.start_snapshot(sub, instance, image_id, 'qcow2')
            self.wait_for(lambda: os.path.exists(
                os.path.join(workdir, 'image.qcow2')), 'the scratch copy')
            self.kill_worker()
            # The world as the crash left it.
            self.assertTrue(os.path.isdir(workdir))
            self.assertEqual([f'{image_id}.json'], self.journal_records())
            self.assertNotEqual('deleted', self.image_status(image_id))

            self.restart_worker()
            payload = self.wait_restarted_error(sub, image_id)
        self.assertIn(workdir, payload['error_message'])
        self.assertIn('deleted the unfinished image',
                      payload['error_message'])
        self.assertNoScratchLeft()
        self.assertEqual('deleted', self.image_status(image_id))
        self.assertEqual([], self.journal_records())
        # The restarted worker works.
        small = self.make_disk('small', 'qcow2', size='16M')
        instance, _ = self.define_domain(path=small, fmt='qcow2')
        image_id = self.create_image()
        final = self.snapshot(instance, image_id, 'qcow2')[-1]
        self.assertEqual('snapshot.create.end', final.event_type,
                         self.worker.log_tail())
        self.assertNoScratchLeft()
        self.assertEqual([], self.journal_records())


class RbdCrashTestCase(rbd_helpers.RbdTestMixin, CrashRecoveryTestCase):

    def make_rbd_disk(self, size=256 * MiB, data=128 * MiB):
        """A disk big enough that a snapshot of it is still running when
        the worker gets killed."""
        name, _ = super().make_rbd_disk(
            size, [(offset, 4 * MiB, offset // MiB % 251 + 1)
                   for offset in range(0, data, 4 * MiB)])
        return name

    def snaps(self, name):
        with rbd.Image(self.vms, name, read_only=True) as image:
            return [s['name'] for s in image.list_snaps()]


class RbdStreamCrashTest(RbdCrashTestCase):
    """An RBD stream killed while it reads its snapshot of the disk."""

    # The file store: the RBD disk is streamed (as qcow2) into Glance.
    worker_conf = {'rbd.glance_store': 'local'}

    def test_sigkill_during_stream_removes_snapshot_and_image(self):
        name = self.make_rbd_disk()
        instance, _ = self.define_rbd_domain(name)
        image_id = self.create_image()
        snap = f'snapworker-{image_id}'
        with events.Subscription(CONF, image_id=image_id) as sub:
            self.start_snapshot(sub, instance, image_id, 'qcow2')
            self.wait_for(lambda: snap in self.snaps(name),
                          'the source snapshot')
            self.kill_worker()
            self.assertEqual([snap], self.snaps(name),
                             'the stream ended before the kill')
            self.assertEqual([f'{image_id}.json'], self.journal_records())

            self.restart_worker()
            payload = self.wait_restarted_error(sub, image_id)
        self.assertIn(f'rbd_snapshot vms/{name}@{snap}',
                      payload['error_message'])
        self.assertEqual([], self.snaps(name))
        self.assertEqual('deleted', self.image_status(image_id))
        self.assertEqual([], self.journal_records())


class BackgroundFlattenCrashTest(RbdCrashTestCase):
    """A clone registered at once, killed before its background flatten
    ended: the image stays, the flatten is queued again and finishes."""

    worker_conf = {'rbd.flatten': 'background'}

    def test_sigkill_during_background_flatten_resumes_it(self):
        name = self.make_rbd_disk()
        instance, _ = self.define_rbd_domain(name)
        image_id = self.create_image()
        snap = f'snapworker-{image_id}'
        with events.Subscription(CONF, image_id=image_id) as sub:
            self.api.create_snapshot(self.context, self.worker.host,
                                     instance, image_id, 'raw')
            final = list(sub.until_finished(60))[-1]
            self.kill_worker()
        self.assertEqual('snapshot.create.end', final.event_type,
                         self.worker.log_tail())
        self.assertEqual('clone', final.payload['strategy'])
        if snap not in self.snaps(name):
            self.skipTest('the flatten ended before the kill')
        self.assertEqual([f'{image_id}.json'], self.journal_records())

        with events.Subscription(CONF, image_id=image_id) as sub:
            self.restart_worker()
            self.wait_for(lambda: not self.snaps(name),
                          'the resumed flatten')
            self.wait_for(lambda: not self.journal_records(),
                          'the record of the flatten')
            # The job had ended: nothing to report again.
            self.assertIsNone(sub.wait(1))
        self.assertEqual('active', self.image_status(image_id))
        with rbd.Image(self.images, image_id, snapshot='snap',
                       read_only=True) as clone:
            self.assertRaises(rbd.ImageNotFound, clone.parent_info)
