"""Deleting the images of failed snapshots that Glance did not delete.

A snapshot's fate is settled only when Glance confirms it. When a failed
job cannot delete the image it claimed (Glance down, hung, answering 503),
the error notification reports the status Glance last gave and the job's
journal record hands the image to the reaper (``job.handed_over(
GLANCE_IMAGE, image_id, to=REAPER)``): the record outlives the job until
the reaper has deleted the image, and a worker restarted meanwhile resumes
the deletion from the record.

The reaper retries with a bounded exponential backoff for as long as the
worker runs, in one thread of its own: no job waits for it.
"""

import dataclasses
import heapq
import itertools
import threading
import time

from oslo_log import log as logging

from snapworker import exception

LOG = logging.getLogger(__name__)

#: Seconds before the first retry, and the most between two retries.
FIRST_DELAY = 2.0
MAX_DELAY = 60.0


@dataclasses.dataclass
class _Deletion:
    image_id: str
    images: object
    done: object
    keep_if_active: bool
    delay: float
    claim_project: str | None = None
    attempts: int = 0


class ImageReaper:
    """Deletes images until Glance confirms each one is gone.

    :param first_delay: seconds before the first retry; each retry doubles
        it, up to ``max_delay``.
    """

    def __init__(self, first_delay=FIRST_DELAY, max_delay=MAX_DELAY,
                 clock=time.monotonic):
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._clock = clock
        self._lock = threading.Condition()
        self._due = []
        self._order = itertools.count()
        self._stopping = False
        self._thread = None

    def add(self, images, image_id, done, keep_if_active=False, now=False,
            claim_project=None):
        """Delete ``image_id`` with ``images`` (a ``glance.ImageService``).

        :param done: called once the image is gone (or kept, see below).
        :param keep_if_active: recovery's case: an image that turns out
            active holds a complete snapshot and is kept. A failed job's
            image is deleted whatever its status.
        :param now: try at once rather than after the first delay.
        :param claim_project: the job could not even claim the image
            (Glance did not answer): delete it only once it proves to be
            the request's (``glance.check_claim`` for this project),
            leave it alone otherwise.
        """
        deletion = _Deletion(image_id, images, done, keep_if_active,
                             self._first_delay, claim_project)
        with self._lock:
            self._push(deletion, 0.0 if now else deletion.delay)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name='image-reaper', daemon=True)
                self._thread.start()
            self._lock.notify()

    def pending(self):
        with self._lock:
            return sorted(d.image_id for _, _, d in self._due)

    def stop(self, timeout=10.0):
        """Stop retrying (pending deletions stay in the journal)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                LOG.warning('Image reaper did not stop within %.0f s',
                            timeout)

    def _push(self, deletion, delay):
        heapq.heappush(self._due, (self._clock() + delay,
                                   next(self._order), deletion))

    def _run(self):
        while True:
            with self._lock:
                while not self._stopping and (
                        not self._due or self._due[0][0] > self._clock()):
                    timeout = (self._due[0][0] - self._clock()
                               if self._due else None)
                    self._lock.wait(timeout)
                if self._stopping:
                    return
                _, _, deletion = heapq.heappop(self._due)
            if not self._attempt(deletion):
                deletion.delay = min(deletion.delay * 2, self._max_delay)
                with self._lock:
                    self._push(deletion, deletion.delay)

    def _attempt(self, deletion):
        """One try; True when the image's fate is settled."""
        deletion.attempts += 1
        image_id = deletion.image_id
        try:
            if deletion.claim_project is not None:
                try:
                    deletion.images.claim(image_id, deletion.claim_project)
                except (exception.ImageNotFound, exception.ImageNotOwned,
                        exception.ImageNotQueued) as e:
                    LOG.info('Image %s is not the failed request\'s (%s): '
                             'left alone', image_id, e.code)
                    deletion.done()
                    return True
            if deletion.keep_if_active:
                status = deletion.images.status(image_id)
                if status == 'active':
                    LOG.info('Image %s is active after all: kept', image_id)
                    deletion.done()
                    return True
            gone = deletion.images.delete(image_id, retries=False)
        except Exception:
            LOG.exception('Deleting image %s failed', image_id)
            gone = False
        if gone:
            LOG.info('Image %s of a failed snapshot deleted after %d '
                     'attempt(s)', image_id, deletion.attempts)
            try:
                deletion.done()
            except Exception:
                LOG.exception('Could not record the deletion of image %s',
                              image_id)
            return True
        LOG.warning('Image %s still not deleted (attempt %d); retrying in '
                    '%.0f s', image_id, deletion.attempts,
                    min(deletion.delay * 2, self._max_delay))
        return False
