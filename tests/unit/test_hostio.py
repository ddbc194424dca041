"""Host-friendly I/O: thread I/O priority, cache dropping, the throttle."""

import os
import subprocess
import threading

import fixtures
import testtools

from snapworker import hostio
from snapworker.streams import extents


class IoPriorityTestCase(testtools.TestCase):

    def test_thread_priority_is_set_and_inherited_by_helpers(self):
        found = {}

        def job():
            found['set'] = hostio.set_thread_io_priority('idle')
            found['thread'] = hostio.thread_io_priority()
            # A helper started from this thread, as qemu-nbd is.
            found['child'] = subprocess.run(
                ['ionice'], capture_output=True, text=True).stdout.strip()

        thread = threading.Thread(target=job)
        thread.start()
        thread.join()
        self.assertEqual((True, (3, 0)), (found['set'], found['thread']))
        self.assertEqual('idle', found['child'])
        # Only that thread: this one is untouched.
        self.assertNotEqual((3, 0), hostio.thread_io_priority())

    def test_normal_leaves_it_alone(self):
        before = hostio.thread_io_priority()
        self.assertFalse(hostio.set_thread_io_priority('normal'))
        self.assertEqual(before, hostio.thread_io_priority())


class ThrottleTestCase(testtools.TestCase):

    def test_sleeps_to_hold_the_rate(self):
        now, slept = [0.0], []
        throttle = hostio.Throttle(100, clock=lambda: now[0],
                                   sleep=slept.append)
        throttle(50)
        throttle(150)
        self.assertEqual([0.5, 2.0], slept)
        hostio.Throttle(0, sleep=slept.append)(10 ** 9)
        self.assertEqual([0.5, 2.0], slept)


class DropCacheTestCase(testtools.TestCase):

    def test_raw_view_leaves_no_pages_behind(self):
        path = os.path.join(self.useFixture(fixtures.TempDir()).path, 'd')
        with open(path, 'wb') as f:
            f.write(os.urandom(16 * 1024 * 1024))
        for drop, cached in ((False, True), (True, False)):
            fd = os.open(path, os.O_RDONLY)
            hostio.drop_cache(fd, 0, 0)
            os.close(fd)
            with extents.RawFileView(path, drop_cache=drop) as view:
                for ext in view.extents():
                    view.pread(ext.start, ext.length)
            resident = int(subprocess.run(
                ['fincore', '--bytes', '--noheadings', '--output', 'RES',
                 path], capture_output=True, text=True).stdout)
            self.assertEqual(cached, resident > 8 * 1024 * 1024, resident)
