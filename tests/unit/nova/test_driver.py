"""The Nova side's pieces that need no nova-compute: waiting, installing,
which disks are delegated and in what format.

``snapworker.nova.driver`` itself imports ``nova.conf``, which cannot be
registered after snapworker's options in one process (both define
``[DEFAULT] host``); it is tested through real child nova-compute
processes in tests/functional/nova/test_driver.py. For the same reason
Nova's own disk naming is asked in a child Python here.
"""

import collections
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

import testtools
from nova import exception as nova_exception

from snapworker import events
from snapworker import notifications
from snapworker.nova import conf as nova_conf
from snapworker.nova import disks
from snapworker.nova import exception
from snapworker.nova import install
from snapworker.nova import waiter

GIB = 1024 ** 3
IDS = {'instance_uuid': 'inst', 'image_id': 'img', 'host': 'compute-1'}


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeSubscription:
    """Returns scripted events; ``None`` entries are quiet periods."""

    def __init__(self, clock, script):
        self._clock = clock
        self._script = collections.deque(script)
        self.waits = []

    def wait(self, timeout):
        self.waits.append(timeout)
        if self._script:
            item = self._script.popleft()
            if isinstance(item, BaseException):
                self._clock.now += 0.1
                raise item
            if isinstance(item, Gap):
                self.disconnections += 1
                item = item.event
            if item is not None:
                self._clock.now += 0.1
                return item
        self._clock.now += timeout
        return None

    disconnections = 0


class Gap:
    """The connection was lost (and regained) before ``event`` came."""

    def __init__(self, event=None):
        self.event = event


def event(event_type, **payload):
    return events.Event(event_type=event_type, publisher_id='snapworker:h',
                        priority='INFO', payload=payload, raw_payload={})


class SnapshotWaiterTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.clock = FakeClock()
        self.conf = mock.Mock(accept_timeout=30, timeout_base=100,
                              timeout_per_gib=10, status_poll_interval=5)
        self.statuses = collections.deque()
        self.calls = []

    def wait(self, *script, default_size=GIB):
        sub = FakeSubscription(self.clock, script)
        w = waiter.SnapshotWaiter(
            sub, self._status, self.conf, IDS, default_size,
            clock=self.clock, sleep=self._sleep)
        w.wait(on_started=lambda: self.calls.append('started'),
               on_released=lambda: self.calls.append('released'))
        return sub

    def _status(self):
        self.calls.append('poll')
        status = self.statuses.popleft() if self.statuses else 'queued'
        if isinstance(status, BaseException):
            raise status
        return status

    def _sleep(self, seconds):
        self.calls.append('sleep')
        self.clock.now += seconds

    def test_events_drive_started_then_released(self):
        self.wait(event(notifications.START, virtual_size=GIB),
                  event(notifications.PROGRESS),
                  event(notifications.SOURCE_RELEASED),
                  event(notifications.END))

        self.assertEqual(['started', 'released'], self.calls)

    def test_error_event_raises_with_worker_cause(self):
        e = self.assertRaises(
            exception.SnapshotOffloadFailed, self.wait,
            event(notifications.START),
            event(notifications.ERROR, error_code='SourceReadError',
                  error_message='disk went away'))

        self.assertIn('SourceReadError: disk went away', str(e))
        self.assertEqual(['started'], self.calls)

    def test_cancelled_snapshot_raises_so_nova_records_the_fault(self):
        # An admin's ``snapworker cancel`` mid-upload: the worker's error
        # event makes snapshot() raise the generic failure (not
        # ImageNotFound, which Nova treats as the user's doing and records
        # no fault for), and the guest was already released.
        e = self.assertRaises(
            exception.SnapshotOffloadFailed, self.wait,
            event(notifications.START, virtual_size=GIB),
            event(notifications.PROGRESS, bytes_uploaded=GIB // 4),
            event(notifications.ERROR, error_code='Cancelled',
                  error_message='Snapshot into image img cancelled by ops',
                  image_status='deleted'))

        self.assertIn('Cancelled: Snapshot into image img cancelled', str(e))
        self.assertNotIsInstance(e, nova_exception.ImageNotFound)
        self.assertEqual(['started'], self.calls)

    def test_error_before_start_does_not_start(self):
        self.assertRaises(
            exception.SnapshotOffloadFailed, self.wait,
            event(notifications.ERROR, error_code='InstanceNotShutOff',
                  error_message='running'))

        self.assertEqual([], self.calls)

    def test_worker_errors_map_to_nova_exceptions(self):
        self.assertRaises(
            nova_exception.ImageNotFound, self.wait,
            event(notifications.ERROR, error_code='ImageNotFound'))
        self.assertRaises(
            nova_exception.InstanceNotFound, self.wait,
            event(notifications.ERROR, error_code='InstanceNotFound'))

    def test_no_worker_fails_at_accept_timeout(self):
        self.assertRaises(exception.WorkerNotResponding, self.wait)

        self.assertEqual(30, self.clock.now)
        self.assertEqual(['poll'] * 6, self.calls)

    def test_lost_start_seen_in_glance(self):
        self.statuses.extend(['saving'])

        self.wait(None, event(notifications.END))

        self.assertEqual(['poll', 'started'], self.calls)

    def test_lost_end_seen_in_glance(self):
        self.statuses.extend(['active'])

        self.wait(event(notifications.START, virtual_size=GIB),
                  event(notifications.SOURCE_RELEASED), None)

        self.assertEqual(['started', 'released', 'poll'], self.calls)

    def test_end_alone_still_reports_start(self):
        self.wait(event(notifications.END))

        self.assertEqual(['started'], self.calls)

    def test_image_deleted_without_event_is_image_not_found(self):
        self.statuses.extend(['saving', 'deleted'])

        self.assertRaises(nova_exception.ImageNotFound, self.wait,
                          None, None)

    def test_run_timeout_scales_with_virtual_size(self):
        e = self.assertRaises(
            exception.SnapshotTimedOut, self.wait,
            event(notifications.START, virtual_size=3 * GIB + 1))

        # 100 s + 4 GiB (rounded up) x 10 s, counted from the start event.
        self.assertIn('within 140 s', str(e))
        self.assertAlmostEqual(140.1, self.clock.now)

    def test_run_timeout_falls_back_to_default_size(self):
        self.statuses.extend(['saving'])

        e = self.assertRaises(exception.SnapshotTimedOut, self.wait,
                              default_size=2 * GIB)

        self.assertIn('within 120 s', str(e))

    def test_broken_subscription_falls_back_to_glance(self):
        # What a RabbitMQ restart did to kombu: the waiter must not pass
        # it on as the snapshot's failure.
        self.statuses.extend(['saving', 'active'])

        self.wait(BrokenPipeError(32, 'Broken pipe'),
                  ConnectionResetError(104, 'reset'))

        self.assertEqual(['sleep', 'poll', 'started', 'sleep', 'poll'],
                         self.calls)
        # A failing wait still takes its share of time: no busy loop.
        self.assertAlmostEqual(10.0, self.clock.now)

    def test_reconnected_subscription_asks_glance_at_once(self):
        # The end event fell into the gap; the first event after it
        # (here a late progress) triggers the poll that finds the image.
        self.statuses.extend(['active'])

        sub = self.wait(event(notifications.START, virtual_size=GIB),
                        Gap(event(notifications.PROGRESS)))

        self.assertEqual(['started', 'poll'], self.calls)
        self.assertEqual(2, len(sub.waits))

    def test_quiet_gap_polls_once(self):
        self.statuses.extend(['saving', 'saving', 'active'])

        sub = self.wait(event(notifications.START), Gap(), None)

        # One poll per quiet interval, the gap's included: no extra one.
        self.assertEqual(['started', 'poll', 'poll', 'poll'], self.calls)
        self.assertEqual(4, len(sub.waits))

    def test_glance_unreachable_is_no_answer(self):
        self.statuses.extend([OSError('Glance down'), 'saving',
                              RuntimeError('500'), 'active'])

        self.wait(None, None, None, None)

        self.assertEqual(['poll', 'poll', 'started', 'poll', 'poll'],
                         self.calls)

    def test_outage_to_the_deadline_is_worker_not_responding(self):
        self.statuses.extend([OSError('Glance down')] * 6)

        self.assertRaises(exception.WorkerNotResponding, self.wait,
                          *[BrokenPipeError(32, 'Broken pipe')] * 6)

    def test_refused_duplicate_keeps_waiting_for_the_first(self):
        self.statuses.extend(['saving'])

        self.wait(event(notifications.REFUSED,
                        error_code='SnapshotInProgress'),
                  event(notifications.END))

        self.assertEqual(['poll', 'started'], self.calls)

    def test_refused_but_active_is_done(self):
        self.statuses.extend(['active'])

        self.wait(event(notifications.REFUSED, error_code='ImageNotQueued'))

        self.assertEqual(['poll', 'started'], self.calls)

    def test_refusals_fail_the_snapshot(self):
        self.statuses.extend(['queued', 'deleted'])

        e = self.assertRaises(
            exception.SnapshotOffloadFailed, self.wait,
            event(notifications.REFUSED, error_code='ImageNotOwned',
                  error_message='another project'))
        self.assertIn('ImageNotOwned: another project', str(e))
        self.assertRaises(
            nova_exception.ImageNotFound, self.wait,
            event(notifications.REFUSED, error_code='ImageNotFound'))

    def test_waits_no_longer_than_poll_interval(self):
        sub = self.wait(None, None, event(notifications.END))

        self.assertEqual([5, 5, 5], sub.waits)


class InstallTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.virt = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, self.virt)
        spec = mock.Mock(submodule_search_locations=[self.virt])
        patcher = mock.patch('importlib.util.find_spec', return_value=spec)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.path = os.path.join(self.virt, 'snapworker.py')

    def test_install_show_remove(self):
        self.assertEqual(1, install.main(['show']))

        self.assertEqual(0, install.main(['install']))
        with open(self.path) as f:
            self.assertIn('from snapworker.nova.driver import '
                          'SnapworkerLibvirtDriver', f.read())
        self.assertEqual(0, install.main(['show']))
        self.assertEqual(0, install.main(['install']))

        self.assertEqual(0, install.main(['remove']))
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(0, install.main(['remove']))

    def test_stub_is_valid_python(self):
        compile(install.STUB, 'snapworker.py', 'exec')

    def test_no_nova(self):
        with mock.patch('importlib.util.find_spec', return_value=None):
            self.assertRaises(SystemExit, install.main, ['install'])


class ConfTest(testtools.TestCase):

    def test_options_in_snapworker_group(self):
        ((group, opts), (levels, cap)) = nova_conf.list_opts()

        self.assertEqual('snapworker', group.name)
        self.assertEqual(('upgrade_levels', ['snapworker']),
                         (levels, [o.name for o in cap]))
        self.assertEqual(
            {'topic', 'disk_types', 'accept_timeout', 'liveness_timeout',
             'timeout_base', 'timeout_per_gib', 'status_poll_interval'},
            {opt.name for opt in opts})

    def test_disk_types_default_to_every_type_the_worker_reads(self):
        ((_group, opts), _levels) = nova_conf.list_opts()
        disk_types = next(o for o in opts if o.name == 'disk_types')

        self.assertEqual(['qcow2', 'raw', 'rbd', 'lvm'], disk_types.default)
        self.assertEqual(list(disks.DELEGATED_TYPES), disk_types.default)


class ImageFormatTest(testtools.TestCase):
    """Nova's "save lvm and rbd as raw", and its snapshot_image_format."""

    def test_file_disks_keep_their_format(self):
        self.assertEqual('qcow2', disks.image_format('qcow2'))
        self.assertEqual('raw', disks.image_format('raw'))

    def test_block_backends_are_saved_as_raw(self):
        # A raw target is also what lets the worker clone an RBD disk.
        self.assertEqual('raw', disks.image_format('rbd'))
        self.assertEqual('raw', disks.image_format('lvm'))

    def test_snapshot_image_format_wins(self):
        self.assertEqual('qcow2', disks.image_format('rbd', 'qcow2'))
        self.assertEqual('qcow2', disks.image_format('lvm', 'qcow2'))
        self.assertEqual('raw', disks.image_format('qcow2', 'raw'))


#: Nova's own naming of a root disk, as LibvirtDriver.snapshot() does it:
#: the domain XML parsed by Nova's config classes, ``find_disk``, then
#: ``get_disk_type_from_path`` or the driver format.
_NOVA_NAMES = textwrap.dedent("""\
    import json, sys, uuid
    from nova.virt.libvirt import config, utils
    out = []
    for disk in json.load(sys.stdin):
        guest = config.LibvirtConfigGuest()
        guest.parse_str(
            "<domain type='kvm'><name>x</name><uuid>%s</uuid>"
            "<memory>65536</memory><os><type>hvm</type></os>"
            "<devices>%s</devices></domain>" % (uuid.uuid4(), disk))
        fake = type('Guest', (), {'get_config': lambda self: guest})()
        path, fmt = utils.find_disk(fake)
        out.append([path, utils.get_disk_type_from_path(path) or fmt])
    print(json.dumps(out))
    """)


class NovaDiskNamesTest(testtools.TestCase):
    """The names in disk_types are the ones Nova 34 gives these disks."""

    def nova_names(self, *disk_xml):
        env = dict(os.environ, OS_NOVA_DISABLE_EVENTLET_PATCHING='1')
        proc = subprocess.run([sys.executable, '-c', _NOVA_NAMES],
                              input=json.dumps(disk_xml), env=env,
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(0, proc.returncode, proc.stderr[-2000:])
        return [tuple(r) for r in json.loads(proc.stdout.splitlines()[-1])]

    def test_delegated_disks_are_named_as_in_disk_types(self):
        names = self.nova_names(
            # images_type = rbd
            "<disk type='network' device='disk'>"
            "<driver name='qemu' type='raw'/>"
            "<source protocol='rbd' name='vms/1234_disk'>"
            "<host name='127.0.0.1' port='6789'/></source>"
            "<target dev='vda' bus='virtio'/></disk>",
            # images_type = lvm (or any block device under /dev)
            "<disk type='block' device='disk'>"
            "<driver name='qemu' type='raw'/>"
            "<source dev='/dev/nova-vg/1234_disk'/>"
            "<target dev='vda' bus='virtio'/></disk>",
            # images_type = qcow2 / flat
            "<disk type='file' device='disk'>"
            "<driver name='qemu' type='qcow2'/>"
            "<source file='/var/lib/nova/instances/1234/disk'/>"
            "<target dev='vda' bus='virtio'/></disk>",
            "<disk type='file' device='disk'>"
            "<driver name='qemu' type='raw'/>"
            "<source file='/var/lib/nova/instances/1234/disk'/>"
            "<target dev='vda' bus='virtio'/></disk>")

        self.assertEqual(
            [('rbd:vms/1234_disk', 'rbd'),
             ('/dev/nova-vg/1234_disk', 'lvm'),
             ('/var/lib/nova/instances/1234/disk', 'qcow2'),
             ('/var/lib/nova/instances/1234/disk', 'raw')], names)
        self.assertEqual(set(disks.DELEGATED_TYPES),
                         {name for _path, name in names})
