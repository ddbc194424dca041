"""The operator's commands against a real worker, RabbitMQ and Glance.

Each command runs as a subprocess of the installed ``snapworker`` console
script with the worker's own configuration file (so it finds the same
RabbitMQ and Glance), as an operator would run it. The test Glance has no
Keystone, so the CLI runs in its noauth demo mode (``--os-auth-type none``
and the ``--noauth-*`` identity); with Keystone the same commands take
``OS_*`` credentials (tests/unit/cmd/test_credentials.py).
"""

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time

from oslo_messaging import notify
from testtools import content

from snapworker import events
from snapworker import manager
from snapworker import notifications
from snapworker import rpc
from snapworker.conf import CONF
from tests.functional import base

CLI = os.path.join(os.path.dirname(sys.executable), 'snapworker')
#: A raw disk (size, data written) whose snapshot runs two minutes at the
#: class's read rate (only data is read, holes are skipped): long enough
#: for the many CLI runs of a test (seconds each on a loaded machine) to
#: see it running and cancel it.
_LONG = ('256M', 'write -P 0x44 0 240M')
_PROBE = 'snapshot.probe'
_ANSI = re.compile(r'\x1b\[[0-9]*[A-Za-z]')


def visible_lines(text):
    """The lines a terminal shows, ANSI sequences and redraws removed."""
    lines = [_ANSI.sub('', line).rstrip('\r')
             for line in text.replace('\r\n', '\n').split('\n')]
    return [line for line in lines if line.strip()]


class OperatorCliTest(base.FunctionalTestCase):

    worker_conf = {'worker.max_concurrent_snapshots': '1',
                   # Slow enough to be seen running and still be running
                   # when cancelled: the CLI runs before that take seconds
                   # each on a loaded machine (a cancel stops a job within
                   # a chunk).
                   'worker.max_read_bytes_per_second': str(2 * 1024 ** 2)}

    def command(self, *args, roles='admin,member', conf=()):
        """The command line: credentials first, as for every OpenStack
        CLI, then the command and its arguments."""
        config = [self.worker.process.conf_path, *conf]
        return [CLI, *[a for c in config for a in ('--config-file', c)],
                '--os-auth-type', 'none',
                '--noauth-user-id', self.context.user_id,
                '--noauth-project-id', self.context.project_id,
                '--noauth-roles', roles, *args]

    def cli(self, *args, roles='admin,member', timeout=120, conf=()):
        """Run a command piped; (exit status, stdout lines, stderr)."""
        proc = subprocess.run(self.command(*args, roles=roles, conf=conf),
                              capture_output=True, text=True,
                              timeout=timeout)
        return proc.returncode, proc.stdout.splitlines(), proc.stderr

    def cli_json(self, *args, **kwargs):
        code, lines, err = self.cli(*args, **kwargs)
        return code, (json.loads(lines[-1]) if lines else None), err

    def images_of(self, instance_uuid):
        return list(self.glance.images.list(
            filters={'instance_uuid': instance_uuid}))

    # -- status, jobs, cancel ------------------------------------------------

    def test_status_of_a_live_worker_and_of_a_host_without_one(self):
        code, status, err = self.cli_json('status', '--host',
                                          self.worker.host)
        self.assertEqual(0, code, err)
        self.assertEqual((manager.RPC_API_VERSION, self.worker.host, 0, 0),
                         (status['version'], status['host'],
                          status['running'], status['queued']))
        started = time.monotonic()
        code, _, err = self.cli('status', '--host', 'no-such-host',
                                '--worker-timeout', '3')
        self.assertEqual(3, code)
        self.assertIn('No snapworker worker answered for host no-such-host',
                      err)
        self.assertLess(time.monotonic() - started, 30)

    def test_jobs_lists_and_cancel_stops_cleanly(self):
        disk = self.make_disk('cancel-me', 'raw', size=_LONG[0],
                              writes=_LONG[1:])
        instance, _ = self.define_domain(path=disk, fmt='raw')
        running, queued = self.create_image(), self.create_image()
        with events.Subscription(CONF) as sub:
            for image in (running, queued):
                self.api.create_snapshot(self.context, self.worker.host,
                                         instance, image)
            self.wait_for(lambda: self._states().get(running) == 'running',
                          'the first snapshot to run')
            code, status, err = self.cli_json('jobs', '--host',
                                              self.worker.host)
            self.assertEqual(0, code, err)
            jobs = {j['image_id']: j for j in status['jobs']}
            self.assertEqual(('running', 'queued'),
                             (jobs[running]['state'], jobs[queued]['state']))
            self.assertEqual('stream', jobs[running]['strategy'])
            # The same, as a table.
            code, table, err = self.cli('jobs', '--host', self.worker.host,
                                        '-f', 'human')
            self.assertEqual(0, code, err)
            self.assertIn(f'{self.worker.host}: 1 running, 1 queued',
                          table[0])
            self.assertEqual([(running, 'running', 'stream'),
                              (queued, 'queued', '-')],
                             [tuple(line.split()[:3]) for line in table[1:]])
            # A member may neither list nor cancel; an admin may.
            code, _, err = self.cli('jobs', '--host', self.worker.host,
                                    roles='member')
            self.assertEqual(1, code)
            self.assertIn('admins only', err)
            code, answer, _ = self.cli_json('cancel', running, '--host',
                                            self.worker.host, roles='member')
            self.assertEqual((1, False), (code, answer['cancelled']))
            # The queued one first: cancelling the running one first would
            # let the queued one start.
            for image, state in ((queued, 'queued'), (running, 'running')):
                code, answer, err = self.cli_json('cancel', image, '--host',
                                                  self.worker.host)
                self.assertEqual((0, True, state),
                                 (code, answer['cancelled'],
                                  answer['state']), err)
            finals = self.final_events(sub, (running, queued))
        for image in (running, queued):
            self.assertEqual((notifications.ERROR, 'Cancelled'),
                             finals[image])
            self.assertEqual('deleted', self.image_status(image))
        self.assertNoScratchLeft()
        self.assertNoHelperLeft()
        code, status, _ = self.cli_json('status', '--host', self.worker.host)
        self.assertEqual((0, 0), (status['running'], status['queued']))

    def _states(self):
        code, status, _ = self.cli_json('jobs', '--host', self.worker.host)
        if code != 0:
            return {}
        return {j['image_id']: j['state'] for j in status['jobs']}

    def test_cancelled_snapshot_command_ends_with_the_cause(self):
        """``snapshot`` followed by ``cancel`` from another shell."""
        disk = self.make_disk('cancel-cli', 'raw', size=_LONG[0],
                              writes=_LONG[1:])
        instance, _ = self.define_domain(path=disk, fmt='raw')
        proc = subprocess.Popen(
            self.command('snapshot', instance, '--host', self.worker.host),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        first = json.loads(proc.stdout.readline())
        image_id = first['payload']['image_id']
        self.wait_for(lambda: self._states().get(image_id) == 'running',
                      'the snapshot to run')
        code, answer, err = self.cli_json('cancel', image_id, '--host',
                                          self.worker.host)
        self.assertEqual((0, True), (code, answer['cancelled']), err)
        out, err = proc.communicate(timeout=60)
        last = json.loads(out.splitlines()[-1])
        self.assertEqual(1, proc.returncode, err)
        self.assertEqual((notifications.ERROR, 'Cancelled', image_id),
                         (last['event_type'], last['payload']['error_code'],
                          last['payload']['image_id']))
        # The image the command created went with the snapshot.
        self.assertEqual('deleted', self.image_status(image_id))
        self.assertEqual([], self.images_of(instance))
        self.assertNoScratchLeft()
        self.assertNoHelperLeft()

    # -- snapshot -------------------------------------------------------------

    def test_snapshot_creates_a_nova_like_image_and_ends_active(self):
        base_file = self.make_disk('_base/cli-snap', 'raw', size='32M',
                                   writes=('write -P 0x12 0 3M',))
        disk = self.make_disk('cli-snap', 'qcow2', size='32M',
                              backing=base_file,
                              writes=('write -P 0x34 2M 2M',))
        base_image = self.create_image(os_distro='debian',
                                       hw_disk_bus='virtio')
        instance, _ = self.define_domain(path=disk, base_image=base_image)

        code, lines, err = self.cli('snapshot', instance, '--host',
                                    self.worker.host, '--name', 'nightly')

        self.assertEqual(0, code, err)
        received = [json.loads(line) for line in lines]
        self.assertEqual(notifications.END, received[-1]['event_type'])
        self.assertEqual(notifications.START, received[0]['event_type'])
        (image,) = self.images_of(instance)
        self.assertEqual(received[-1]['payload']['image_id'], image['id'])
        self.assertEqual(
            ('nightly', 'active', 'private', 'qcow2', 'bare'),
            (image['name'], image['status'], image['visibility'],
             image['disk_format'], image['container_format']))
        # What Nova's API and libvirt driver give a snapshot image, and
        # the base image's properties Nova carries on.
        self.assertEqual(
            {'image_type': 'snapshot', 'instance_uuid': instance,
             'user_id': self.context.user_id, 'base_image_ref': base_image,
             'owner_id': self.context.project_id,
             'image_location': 'snapshot', 'image_state': 'available',
             'os_distro': 'debian', 'hw_disk_bus': 'virtio'},
            {key: image.get(key) for key in (
                'image_type', 'instance_uuid', 'user_id', 'base_image_ref',
                'owner_id', 'image_location', 'image_state', 'os_distro',
                'hw_disk_bus')})
        self.addCleanup(self._delete_image, image['id'])
        self.assertTrue(base.images_identical(
            disk, self.download(image['id'], 'qcow2')))

    def test_snapshot_refused_before_an_image_exists(self):
        disk = self.make_disk('cli-running')
        instance, _ = self.define_domain(path=disk, running=True)

        code, lines, err = self.cli('snapshot', instance, '--host',
                                    self.worker.host)

        self.assertEqual(1, code, err)
        self.assertIn('Refused: InstanceNotShutOff', err)
        self.assertEqual([], self.images_of(instance))

    def test_snapshot_failure_names_the_error(self):
        disk = self.make_disk('cli-fail')
        instance, _ = self.define_domain(path=disk)
        image_id = self.create_image(disk_format='raw',
                                     container_format='bare')
        self.glance.images.upload(image_id, io.BytesIO(b'already filled'))

        code, lines, err = self.cli('snapshot', instance, '--host',
                                    self.worker.host, '--image-id',
                                    image_id)

        self.assertEqual(1, code, err)
        last = json.loads(lines[-1])
        self.assertEqual((notifications.REFUSED, 'ImageNotQueued'),
                         (last['event_type'], last['payload']['error_code']))
        # Not the command's image: left as it was.
        self.assertEqual('active', self.image_status(image_id))

    def test_terminal_shows_a_progress_bar_ending_in_the_result_line(self):
        disk = self.make_disk('cli-tty', 'raw', size='16M',
                              writes=('write -P 0x46 0 12M',))
        instance, _ = self.define_domain(path=disk, fmt='raw')
        primary, replica = pty.openpty()
        # A terminal of 120 columns (a pty has none until told).
        fcntl.ioctl(replica, termios.TIOCSWINSZ,
                    struct.pack('HHHH', 40, 120, 0, 0))
        proc = subprocess.Popen(
            self.command('snapshot', instance, '--host', self.worker.host),
            stdin=subprocess.DEVNULL, stdout=replica, stderr=subprocess.PIPE)
        self.addCleanup(proc.kill)
        os.close(replica)
        screen = self._read_terminal(primary, proc)

        self.assertEqual(0, proc.returncode, proc.stderr.read())
        lines = visible_lines(screen)
        (image,) = self.images_of(instance)
        self.addCleanup(self._delete_image, image['id'])
        self.assertTrue(lines[-1].startswith(f"Image {image['id']} active: "
                                             f"stream, 16.0 MiB uploaded"),
                        lines[-1])
        bars = [line for line in lines if line.startswith(image['id'][:8])]
        self.assertEqual('start', bars[0].split()[1])
        self.assertTrue(any(bar.split()[1] == 'uploading' and '/s' in bar
                            and 'ETA' in bar and 'disk held' in bar
                            for bar in bars), bars)
        self.assertIn('released  [################] 100%', bars[-1])
        self.assertIn('(stream, disk released)', bars[-1])
        # Redrawn in place: one line per frame, overwritten.
        self.assertIn('\x1b[1F', screen)
        self.addDetail('terminal', content.text_content(screen))

    @staticmethod
    def _read_terminal(fd, proc):
        """Everything written to the pty until the command exits."""
        chunks = []
        while True:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the other end closed
                    data = b''
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=60)
        os.close(fd)
        return b''.join(chunks).decode()

    # -- watch ----------------------------------------------------------------

    def _watch(self, *filters):
        proc = subprocess.Popen(
            self.command('watch', *filters, '--timeout', '10'),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(
            json.loads(line) for line in proc.stdout), daemon=True)
        reader.start()
        return proc, reader, lines

    def test_watch_filters_by_host_instance_and_image(self):
        disks = [self.make_disk(f'cli-watch-{n}') for n in range(2)]
        (first, _), (second, _) = [self.define_domain(path=d) for d in disks]
        images = [self.create_image(), self.create_image()]
        watches = {
            'instance': self._watch('--instance', first),
            'image': self._watch('--image-id', images[1]),
            'host': self._watch('--host', self.worker.host),
            'other host': self._watch('--host', 'no-such-host'),
        }
        self._wait_subscribed(watches, {
            'instance': {'instance_uuid': first},
            'image': {'image_id': images[1]},
            'host': {},
            'other host': {'host': 'no-such-host'}})
        with events.Subscription(CONF) as sub:
            for instance, image in zip((first, second), images, strict=True):
                self.api.create_snapshot(self.context, self.worker.host,
                                         instance, image)
            self.final_events(sub, images)
        seen = {}
        for name, (proc, reader, lines) in watches.items():
            proc.wait(timeout=60)
            reader.join(10)
            self.assertEqual(0, proc.returncode, name)
            seen[name] = {(e['payload']['image_id'], e['event_type'])
                          for e in lines if e['event_type'] != _PROBE}
        ended = {(image, notifications.END) for image in images}
        self.assertEqual({(images[0], notifications.END)},
                         seen['instance'] & ended)
        self.assertEqual({images[0]}, {i for i, _ in seen['instance']})
        self.assertEqual({(images[1], notifications.END)},
                         seen['image'] & ended)
        self.assertEqual({images[1]}, {i for i, _ in seen['image']})
        self.assertEqual(ended, seen['host'] & ended)
        self.assertEqual(set(), seen['other host'])

    def _wait_subscribed(self, watches, matching):
        """Until each watch has printed a probe notification made to
        pass its filter: from then on it receives every event."""
        transport = rpc.get_notification_transport(CONF)
        self.addCleanup(transport.cleanup)
        deadline = time.monotonic() + 120
        while not all(lines for _, _, lines in watches.values()):
            self.assertLess(time.monotonic(), deadline, {
                name: (proc.poll(), len(lines))
                for name, (proc, _, lines) in watches.items()})
            for payload in matching.values():
                host = payload.get('host', self.worker.host)
                notify.Notifier(
                    transport, driver='messagingv2',
                    publisher_id=f'snapworker:{host}',
                    topics=['notifications']).info(
                    {}, _PROBE, dict({'image_id': 'probe', 'host': host},
                                     **payload))
            time.sleep(0.5)

    # -- plan -----------------------------------------------------------------

    def test_plan_names_the_plan_and_touches_nothing(self):
        base_file = self.make_disk('_base/cli-plan', 'raw', size='32M')
        disk = self.make_disk('cli-plan', 'qcow2', size='32M',
                              backing=base_file)
        instance, _ = self.define_domain(path=disk)
        before = os.stat(disk)

        code, lines, err = self.cli('plan', instance, '--host',
                                    self.worker.host, '-f', 'human')
        self.assertEqual(0, code, err)
        self.assertEqual(f'Instance {instance} on {self.worker.host}: '
                         f'stream plan', lines[0])
        self.assertTrue(lines[1].startswith('  why:'))
        self.assertEqual('  source: file qcow2, 32.0 MiB virtual', lines[2])

        code, plan, err = self.cli_json('plan', instance, '--host',
                                        self.worker.host, '--disk-format',
                                        'raw')
        self.assertEqual(0, code, err)
        self.assertEqual(('stream', 'raw', 32 * 1024 ** 2),
                         (plan['strategy'], plan['target_format'],
                          plan['virtual_size']))
        self.assertEqual([], self.images_of(instance))
        self.assertEqual((before.st_mtime_ns, before.st_size),
                         (os.stat(disk).st_mtime_ns, os.stat(disk).st_size))
        self.assertNoScratchLeft()
        self.assertNoHelperLeft()

    def test_forged_plan_for_another_projects_instance_is_refused(self):
        disk = self.make_disk('cli-plan-other')
        instance, _ = self.define_domain(path=disk, owner='another-project')

        code, plan, err = self.cli_json('plan', instance, '--host',
                                        self.worker.host, roles='member')

        self.assertEqual(1, code, err)
        self.assertEqual('InstanceNotOwned', plan['error_code'])
        self.assertNotIn('strategy', plan)
        # An admin may plan it, as they may snapshot it.
        code, plan, err = self.cli_json('plan', instance, '--host',
                                        self.worker.host)
        self.assertEqual((0, 'another-project'),
                         (code, plan['instance_owner']), err)

    def test_plan_capped_below_1_2_is_refused_by_the_client(self):
        cap = os.path.join(self.workdir, 'cap-1.1.conf')
        with open(cap, 'w') as f:
            f.write('[upgrade_levels]\nsnapworker = 1.1\n')
        code, lines, err = self.cli('plan', 'some-instance', '--host',
                                    self.worker.host, conf=[cap])
        self.assertEqual((5, []), (code, lines), err)
        self.assertIn('plan_snapshot needs snapworker RPC API 1.2', err)
