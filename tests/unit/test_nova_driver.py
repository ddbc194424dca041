"""The Nova side's pieces that need no nova-compute: waiting, installing.

``snapworker.nova.driver`` itself imports ``nova.conf``, which cannot be
registered after snapworker's options in one process (both define
``[DEFAULT] host``); it is tested through real child nova-compute
processes in tests/functional/test_nova_driver.py.
"""

import collections
import os
import tempfile
from unittest import mock

import testtools
from nova import exception as nova_exception

from snapworker import events
from snapworker import notifications
from snapworker.nova import conf as nova_conf
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
            if item is not None:
                self._clock.now += 0.1
                return item
        self._clock.now += timeout
        return None


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
            clock=self.clock)
        w.wait(on_started=lambda: self.calls.append('started'),
               on_released=lambda: self.calls.append('released'))
        return sub

    def _status(self):
        self.calls.append('poll')
        return self.statuses.popleft() if self.statuses else 'queued'

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
        ((group, opts),) = nova_conf.list_opts()

        self.assertEqual('snapworker', group.name)
        self.assertEqual(
            {'topic', 'disk_types', 'accept_timeout', 'timeout_base',
             'timeout_per_gib', 'status_poll_interval'},
            {opt.name for opt in opts})
