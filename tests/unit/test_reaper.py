"""The image reaper: deletes until Glance confirms, in the background."""

import threading

import testtools

from snapworker import reaper


class _Images:
    """Glance double whose deletes fail ``failures`` times first."""

    def __init__(self, failures=0, status='queued'):
        self.failures = failures
        self.status_value = status
        self.attempts = 0
        self.gone = threading.Event()

    def delete(self, image_id, retries=True):
        self.attempts += 1
        if self.attempts <= self.failures:
            return False
        self.gone.set()
        return True

    def status(self, image_id):
        return self.status_value


class ImageReaperTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.reaper = reaper.ImageReaper(first_delay=0.01, max_delay=0.05)
        self.addCleanup(self.reaper.stop)

    def test_retries_with_backoff_until_glance_confirms(self):
        images = _Images(failures=3)
        done = threading.Event()
        self.reaper.add(images, 'img', done.set, now=True)
        self.assertTrue(done.wait(5))
        self.assertEqual(4, images.attempts)
        self.assertEqual([], self.reaper.pending())

    def test_recovery_keeps_an_image_that_is_active_after_all(self):
        images = _Images(status='active')
        done = threading.Event()
        self.reaper.add(images, 'img', done.set, keep_if_active=True,
                        now=True)
        self.assertTrue(done.wait(5))
        self.assertEqual(0, images.attempts)

    def test_a_failed_jobs_image_is_deleted_whatever_its_status(self):
        images = _Images(status='active')
        done = threading.Event()
        self.reaper.add(images, 'img', done.set, now=True)
        self.assertTrue(done.wait(5))
        self.assertEqual(1, images.attempts)

    def test_stop_joins_and_leaves_pending_work_pending(self):
        images = _Images(failures=10 ** 6)
        self.reaper.add(images, 'img', lambda: None, now=True)
        self.reaper.stop(timeout=5)
        self.assertFalse(self.reaper._thread.is_alive())
        self.assertEqual(['img'], self.reaper.pending())
