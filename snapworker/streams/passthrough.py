"""A disk file that already is the image, read as it is."""

import os

from oslo_utils import units

from snapworker import hostio


class FileStream:
    """Streams a file's bytes unchanged, one bounded chunk per read.

    Used when the disk file itself is a valid image of the target format
    (raw, or qcow2 without a backing file), and for the scratch copy of the
    convert plan.
    """

    def __init__(self, path, chunk_size=4 * units.Mi, drop_cache=False):
        """:param drop_cache: drop what is read from the page cache."""
        self._drop_cache = drop_cache
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size
        self._chunk_size = chunk_size
        self.bytes_read = 0
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read(self, n=-1):
        if n is None or n < 0 or n > self._chunk_size:
            n = self._chunk_size
        data = os.read(self._fd, n)
        if self._drop_cache and data:
            hostio.drop_cache(self._fd, self.bytes_read, len(data))
        self.bytes_read += len(data)
        return data

    def close(self):
        if self._fd is not None:
            if self._drop_cache:
                hostio.drop_cache(self._fd, 0, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
