"""The background flattener's life: start, tasks in order, bounded stop.

The Ceph half of a task (``ceph.flatten_clone``) is replaced by a double
that can be held; tests/functional/sources/test_rbd.py and
test_crash_recovery.py run real flattens.
"""

import threading
import time
from unittest import mock

import fixtures
import testtools

from snapworker.conf import CONF
from snapworker.sources import ceph
from snapworker.sources import flattener

CLONE = ceph.RbdRef('images', '3c2d1e0f-aaaa-4bbb-8ccc-123456789abc')
SNAP = ceph.RbdRef('vms', 'disk', 'snapworker-3c2d1e0f')


class FlattenerTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.Timeout(30, gentle=True))
        self.flattened = []
        self.release = threading.Event()
        self.release.set()
        self.errors = {}
        self.useFixture(fixtures.MockPatchObject(
            ceph, 'flatten_clone', side_effect=self._flatten))
        self.flattener = flattener.Flattener(CONF, stop_timeout=5)
        self.addCleanup(self._unblock_and_stop)

    def _flatten(self, conf, clone, snapshot):
        self.assertIs(CONF, conf)
        self.release.wait(20)
        if clone in self.errors:
            raise self.errors[clone]
        self.flattened.append((clone, snapshot))

    def _unblock_and_stop(self):
        self.release.set()
        self.flattener.stop()

    def _thread(self):
        return self.flattener._thread

    def test_not_started_until_start(self):
        self.assertIsNone(self._thread())
        self.assertTrue(self.flattener.stop())
        self.flattener.start()
        # Stopped before it started: no thread, nothing taken any more.
        self.assertIsNone(self._thread())

    def test_tasks_run_in_order_and_report_done(self):
        done = mock.Mock()
        other = ceph.RbdRef('images', '7d1b2e90-3c4f-4f1a-8e2d-5a6b7c8d9e0f')
        self.flattener.start()
        self.flattener.submit(CLONE, SNAP, on_done=done)
        self.flattener.submit(other, SNAP, on_done=done)
        self.assertTrue(self.flattener.wait(10))
        self.assertEqual([(CLONE, SNAP), (other, SNAP)], self.flattened)
        self.assertEqual(2, done.call_count)
        self.assertEqual(0, self.flattener.pending)

    def test_submitted_before_start_waits_for_it(self):
        done = mock.Mock()
        self.flattener.submit(CLONE, SNAP, on_done=done)
        self.assertFalse(self.flattener.wait(0.1))
        self.assertEqual(1, self.flattener.pending)
        self.flattener.start()
        self.assertTrue(self.flattener.wait(10))
        done.assert_called_once_with()

    def test_failed_task_not_done_and_thread_goes_on(self):
        done = mock.Mock()
        self.errors[CLONE] = RuntimeError('flatten failed')
        self.flattener.start()
        self.flattener.submit(CLONE, SNAP, on_done=done)
        good = ceph.RbdRef('images', '7d1b2e90-3c4f-4f1a-8e2d-5a6b7c8d9e0f')
        self.flattener.submit(good, SNAP, on_done=done)
        self.assertTrue(self.flattener.wait(10))
        # The failed one stays journalled (on_done not called).
        self.assertEqual([(good, SNAP)], self.flattened)
        done.assert_called_once_with()

    def test_failing_on_done_does_not_end_the_thread(self):
        self.flattener.start()
        self.flattener.submit(CLONE, SNAP,
                              on_done=mock.Mock(side_effect=OSError('disk')))
        self.assertTrue(self.flattener.wait(10))
        self.assertTrue(self._thread().is_alive())
        self.flattener.submit(CLONE, SNAP)
        self.assertTrue(self.flattener.wait(10))
        self.assertEqual(2, len(self.flattened))

    def test_stop_drains_the_queue_and_joins(self):
        self.flattener.start()
        self.release.clear()
        done = mock.Mock()
        for _ in range(3):
            self.flattener.submit(CLONE, SNAP, on_done=done)
        threading.Timer(0.2, self.release.set).start()
        self.assertTrue(self.flattener.stop())
        self.assertFalse(self._thread().is_alive())
        self.assertEqual(3, done.call_count)

    def test_stop_is_bounded_when_a_flatten_hangs(self):
        self.flattener.start()
        self.release.clear()
        done = mock.Mock()
        self.flattener.submit(CLONE, SNAP, on_done=done)
        self.flattener.submit(CLONE, SNAP, on_done=done)
        started = time.monotonic()
        with self.assertLogs(flattener.LOG.logger, 'WARNING') as logs:
            self.assertFalse(self.flattener.stop(timeout=0.5))
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn('1 not started', logs.output[0])
        # The running flatten ends by itself; the queued one never starts.
        self.release.set()
        self._thread().join(10)
        self.assertFalse(self._thread().is_alive())
        self.assertEqual(1, done.call_count)
        self.assertEqual(0, self.flattener.pending)

    def test_nothing_taken_after_stop(self):
        self.flattener.start()
        self.assertTrue(self.flattener.stop())
        done = mock.Mock()
        self.flattener.submit(CLONE, SNAP, on_done=done)
        self.assertEqual(0, self.flattener.pending)
        self.assertEqual([], self.flattened)
        done.assert_not_called()
