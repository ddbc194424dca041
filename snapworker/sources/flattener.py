"""The background flattener: clones registered before their flatten.

With ``[rbd] flatten = background`` a clone plan registers its clone in
Glance at once and leaves the flatten (and the removal of the instance
disk's snapshot it was cloned from) to this service. It outlives the
jobs, so it is the manager's: ``SnapshotManager`` creates and starts one
per worker, injects it into the RBD sources (``sources.open_source``) and
into recovery (``sources.resume_background``), and stops it last.

It imports no Ceph binding itself: the Ceph half of a task is
``ceph.flatten_clone``, loaded with the first task, so a worker without
RBD disks never loads librados.
"""

import queue
import threading
import time

from oslo_log import log as logging

LOG = logging.getLogger(__name__)

#: How long a stopping worker waits for background flattens by default.
STOP_TIMEOUT = 10.0
_STOP = object()


def _noop():
    pass


class Flattener:
    """One thread working through a queue of flattens, in order.

    A task flattens a clone (deep-flatten: its ``snap`` too), then removes
    the source snapshot and calls its ``on_done`` (which drops it from the
    journal); a task that failed is logged and stays in the journal for
    the next start to retry.

    ``stop()`` gives the queue a bounded time to drain, then abandons what
    is left and joins the thread, still within that time: a flatten that
    is running then cannot be interrupted (librbd offers no way), so the
    thread, a daemon, is left to end with the process. An interrupted
    flatten leaves a valid, partly flattened clone and the named source
    snapshot, which the journal record has the next start flatten again.
    """

    def __init__(self, conf, stop_timeout=STOP_TIMEOUT):
        self._conf = conf
        self._stop_timeout = stop_timeout
        self._queue = queue.Queue()
        self._thread = None
        self._stopping = False
        #: Tasks submitted and not ended; guarded by ``_idle``.
        self._pending = 0
        self._idle = threading.Condition()

    @property
    def pending(self):
        with self._idle:
            return self._pending

    def start(self):
        """Start the thread; tasks submitted before wait for it.

        Once, and not after ``stop()``.
        """
        with self._idle:
            if self._thread is not None or self._stopping:
                return
            self._thread = threading.Thread(
                target=self._loop, name='rbd-flatten', daemon=True)
            self._thread.start()

    def submit(self, clone, snapshot, on_done=_noop):
        """Queue the flatten of ``clone``, made from ``snapshot``.

        :param clone: ``ceph.RbdRef`` of the clone in Glance's pool.
        :param snapshot: ``ceph.RbdRef`` of the instance disk's snapshot.
        :param on_done: called once both are done, from the thread.
        """
        with self._idle:
            if self._stopping:
                # Only a job still running after the manager's stop can
                # get here; its journal record keeps the task for the
                # next start.
                LOG.warning('Worker stopping: flatten of %s left to the '
                            'next start', clone)
                return
            self._pending += 1
        self._queue.put((clone, snapshot, on_done))

    def wait(self, timeout):
        """Wait until no task is pending; return whether that happened."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def stop(self, timeout=None):
        """Drain for at most ``timeout`` seconds, abandon the rest, join.

        :param timeout: seconds, ``stop_timeout`` if None.
        :returns: whether the thread has ended (or never started).
        """
        timeout = self._stop_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._idle:
            self._stopping = True
        if self._thread is None:
            return True
        self.wait(timeout)
        abandoned = self._abandon_queued()
        self._queue.put(_STOP)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if abandoned or self._thread.is_alive():
            LOG.warning('Stopped with %d background flatten(s) left (%d '
                        'not started); their source snapshots stay and the '
                        'next start flattens them', self.pending, abandoned)
        return not self._thread.is_alive()

    def _abandon_queued(self):
        abandoned = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return abandoned
            clone, _snapshot, _on_done = item
            LOG.info('Abandoning the flatten of %s', clone)
            abandoned += 1
            self._task_ended()

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._run(*item)
            finally:
                self._task_ended()

    def _run(self, clone, snapshot, on_done):
        started = time.monotonic()
        try:
            # Imported here, not at the top: see the module docstring.
            from snapworker.sources import ceph
            ceph.flatten_clone(self._conf, clone, snapshot)
        except Exception:
            LOG.exception('Background flatten of %s failed; snapshot %s '
                          'left in place', clone, snapshot)
            return
        LOG.info('Flattened %s and removed %s in %.2f s', clone, snapshot,
                 time.monotonic() - started)
        try:
            on_done()
        except Exception:
            LOG.exception('Recording the end of the flatten of %s failed',
                          clone)

    def _task_ended(self):
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()
