"""Reading a disk without hurting the host's running guests.

A compute host's page cache and disk bandwidth belong to its guests (the
oVirt project measured the page cache to be harmful for bulk image reads
on such hosts). A snapshot therefore:

* leaves no pages behind: the worker's own reads drop what they read
  (``POSIX_FADV_DONTNEED`` behind each read: the disk is a shut-off
  instance's, nobody else's), and QEMU helpers read with ``O_DIRECT``
  (``cache.direct``), which neither fills the cache nor evicts the pages
  of the ``_base`` files running guests share;
* runs at a low I/O priority (``[worker] io_priority``): set on the job's
  thread, and so inherited by the helpers that thread starts;
* can be capped (``[worker] max_read_bytes_per_second``).
"""

import ctypes
import os
import threading
import time

from oslo_log import log as logging

LOG = logging.getLogger(__name__)

# <linux/ioprio.h>
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
_CLASSES = {'realtime': 1, 'best-effort': 2, 'idle': 3}
_SYS_IOPRIO_SET = 251  # x86_64
_SYS_IOPRIO_GET = 252


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def set_thread_io_priority(spec):
    """Give the calling thread (and the helpers it starts) ``spec``.

    :param spec: ``'normal'`` (leave as is), ``'idle'``, or
        ``'best-effort:<0-7>'`` (7 the lowest).
    :returns: whether the priority was set.
    """
    if spec == 'normal':
        return False
    name, _, level = spec.partition(':')
    value = (_CLASSES[name] << _IOPRIO_CLASS_SHIFT) | int(level or 0)
    tid = threading.get_native_id()
    if _libc().syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, tid,
                       value) != 0:
        LOG.warning('Could not set I/O priority %s: %s', spec,
                    os.strerror(ctypes.get_errno()))
        return False
    return True


def thread_io_priority(tid=None):
    """``(class, level)`` of a thread (this one by default)."""
    tid = tid or threading.get_native_id()
    value = _libc().syscall(_SYS_IOPRIO_GET, _IOPRIO_WHO_PROCESS, tid)
    return value >> _IOPRIO_CLASS_SHIFT, value & ((1 << _IOPRIO_CLASS_SHIFT)
                                                  - 1)


def supports_direct_io(path):
    """Whether ``path`` (a pinned ``/proc/<pid>/fd/<n>``) opens O_DIRECT.

    tmpfs and some FUSE filesystems refuse it; QEMU would then fail to
    open the chain, so those are read through the cache.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def drop_cache(fd, offset, length):
    """Drop what was just read from the page cache (best effort)."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


class Throttle:
    """Keeps a byte rate at or under ``rate`` bytes/s (0: no limit)."""

    def __init__(self, rate, clock=time.monotonic, sleep=time.sleep):
        self._rate = rate
        self._clock = clock
        self._sleep = sleep
        self._start = None
        self._bytes = 0

    def __call__(self, n):
        """Account ``n`` bytes; sleep as long as the rate requires."""
        if not self._rate:
            return
        if self._start is None:
            self._start = self._clock()
        self._bytes += n
        ahead = self._bytes / self._rate - (self._clock() - self._start)
        if ahead > 0:
            self._sleep(ahead)
