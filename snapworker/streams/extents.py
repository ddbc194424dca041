"""The contract shared by every disk view, and the views of local raw disks.

A view exposes the guest content of a disk as a flat byte range
``[0, virtual_size)`` described by :class:`Extent` records.  Encoders rely
on two promises:

* ``extents()`` yields contiguous extents, in order, that cover the whole
  range exactly once.  An extent with ``data=False`` reads as zeros, so the
  encoder may emit zeros (or leave a qcow2 cluster unallocated) without
  reading it.
* ``pread()`` returns exactly the requested bytes and adds them to
  ``bytes_read``, so a caller can prove how much of the source it touched.

Example, a 3 MiB disk with 1 MiB of data in the middle::

    [Extent(start=0, length=1048576, data=False),
     Extent(start=1048576, length=1048576, data=True),
     Extent(start=2097152, length=1048576, data=False)]
"""

import abc
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterable
from collections.abc import Iterator
from typing import NamedTuple

from snapworker import hostio

# <linux/fs.h>: _IOR(0x12, 114, size_t), the device size in bytes.
BLKGETSIZE64 = 0x80081272


class Extent(NamedTuple):
    """A contiguous guest range; ``data=False`` means it reads as zeros."""

    start: int
    length: int
    data: bool

    @property
    def end(self) -> int:
        return self.start + self.length


def merge_extents(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Drop empty extents and join neighbours of the same kind.

    Servers and filesystems report allocation at their own granularity; the
    encoders only care about the data/zero boundary, and fewer extents means
    fewer, larger reads.
    """
    pending = None
    for ext in extents:
        if ext.length <= 0:
            continue
        if pending is not None and pending.data == ext.data:
            pending = Extent(pending.start, pending.length + ext.length,
                             ext.data)
            continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending


class DiskView(abc.ABC):
    """The guest content of one disk, read-only.

    Subclasses set ``bytes_read`` through :meth:`_count` and must release
    every resource (file descriptors, helper processes) in :meth:`close`,
    which is idempotent.  Use a view as a context manager so an exception
    cannot leak it.
    """

    def __init__(self):
        self.bytes_read = 0

    @property
    @abc.abstractmethod
    def virtual_size(self) -> int:
        """The guest-visible size of the disk in bytes."""

    @abc.abstractmethod
    def extents(self) -> Iterator[Extent]:
        """Yield contiguous extents covering ``[0, virtual_size)`` once."""

    @abc.abstractmethod
    def pread(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` guest bytes starting at ``offset``."""

    def pread_many(self, requests: Iterable[tuple[int, int]]
                   ) -> Iterator[bytes]:
        """Yield ``pread(offset, length)`` for each request, in order.

        ``requests`` is consumed lazily, ahead of what is yielded: a view
        that can overlap reads (NBD) keeps several in flight. This one
        reads one at a time.
        """
        for offset, length in requests:
            yield self.pread(offset, length)

    @abc.abstractmethod
    def close(self) -> None:
        """Release the source; safe to call more than once."""

    def _count(self, data: bytes, offset: int, length: int) -> bytes:
        """Account for a read and refuse short ones.

        A short read means the source shrank or lied about its size; passing
        it on would shift every later byte of the upload, so fail instead.
        """
        if len(data) != length:
            raise OSError(errno.EIO, 'short read at offset %d: %d of %d bytes'
                          % (offset, len(data), length))
        self.bytes_read += length
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class RawFileView(DiskView):
    """A raw regular file; holes found with ``SEEK_DATA``/``SEEK_HOLE``.

    Filesystems without hole support answer as if the whole file were data,
    which is still correct, only slower.  The view reports what the
    filesystem says at the time ``extents()`` runs, so the file must not
    change while it is read (the worker checks that the domain is off).
    """

    def __init__(self, path: str, drop_cache: bool = False):
        """:param drop_cache: drop each range from the page cache once it
            is read (``hostio``): for disks nobody else reads.
        """
        super().__init__()
        self._drop_cache = drop_cache
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._size = self._find_size()
        except BaseException:
            self.close()
            raise

    def _find_size(self) -> int:
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError('RawFileView needs a regular file; use '
                             'BlockDeviceView for devices')
        return st.st_size

    @property
    def virtual_size(self) -> int:
        return self._size

    def extents(self) -> Iterator[Extent]:
        return merge_extents(self._seek_extents())

    def _seek_extents(self) -> Iterator[Extent]:
        pos = 0
        while pos < self._size:
            data_start = self._seek(pos, os.SEEK_DATA)
            if data_start >= self._size:
                yield Extent(pos, self._size - pos, False)
                return
            yield Extent(pos, data_start - pos, False)
            hole_start = min(self._seek(data_start, os.SEEK_HOLE), self._size)
            yield Extent(data_start, hole_start - data_start, True)
            pos = hole_start

    def _seek(self, pos: int, whence: int) -> int:
        """lseek for SEEK_DATA/SEEK_HOLE with the edge cases answered.

        ENXIO means no data after ``pos``: the rest is a hole.  EINVAL means
        the file type cannot answer at all (block devices): everything is
        data, which SEEK_DATA at ``pos`` and SEEK_HOLE at the end express.
        """
        try:
            return os.lseek(self._fd, pos, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return self._size
            if exc.errno == errno.EINVAL:
                return pos if whence == os.SEEK_DATA else self._size
            raise

    def pread(self, offset: int, length: int) -> bytes:
        data = self._count(os.pread(self._fd, length, offset), offset,
                           length)
        if self._drop_cache:
            hostio.drop_cache(self._fd, offset, length)
        return data

    def close(self) -> None:
        if self._fd is not None:
            if self._drop_cache:
                # Readahead brings in pages past each read (holes too).
                hostio.drop_cache(self._fd, 0, 0)
            os.close(self._fd)
            self._fd = None


class BlockDeviceView(RawFileView):
    """A raw block device such as an LVM volume.

    Linux block devices reject ``SEEK_DATA`` with EINVAL (checked on loop
    devices backed by sparse files, kernel 6.x), so the inherited extent
    walk reports the whole device as one data extent; it is kept rather
    than hard-coding "all data" so a kernel that learns to report device
    holes is used without a code change.  Thin LVM allocation is not
    visible this way; such volumes are read in full.
    """

    def _find_size(self) -> int:
        st = os.fstat(self._fd)
        if not stat.S_ISBLK(st.st_mode):
            raise ValueError('BlockDeviceView needs a block device')
        buf = fcntl.ioctl(self._fd, BLKGETSIZE64, b'\0' * 8)
        return struct.unpack('=Q', buf)[0]
