"""Image streams generated piece by piece from a disk view.

The encoders (:mod:`snapworker.streams.raw`, :mod:`snapworker.streams.qcow2`)
describe an image as a generator of byte pieces; ``GeneratedStream`` turns
that generator into the bounded ``read(n)`` every image stream offers (see
the vocabulary in :mod:`snapworker.streams`).
"""

import abc
import itertools
from collections.abc import Iterator

from oslo_utils import units

DEFAULT_CHUNK_SIZE = 4 * units.Mi


class GeneratedStream(abc.ABC):
    """An image stream assembled from a generator of byte pieces.

    Subclasses implement :meth:`_pieces`, yielding bytes-like pieces whose
    concatenation is exactly ``size`` bytes; a piece is at most
    ``chunk_size`` bytes, or one qcow2 metadata cluster if that is larger.
    ``read()`` never returns more than ``chunk_size`` bytes, even for
    ``read(-1)``: returning "everything" would put a whole disk image in
    memory.  Callers loop until ``b''`` as with any raw stream.
    """

    def __init__(self, view, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if chunk_size <= 0:
            raise ValueError('chunk_size must be positive')
        self.view = view
        self.chunk_size = chunk_size
        self._zeros = None
        self._iter = None
        self._piece = memoryview(b'')
        self._done = False

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Exact number of bytes the stream yields."""

    @property
    def bytes_read(self) -> int:
        """Bytes actually read from the source (holes are not read)."""
        return self.view.bytes_read

    @abc.abstractmethod
    def _pieces(self) -> Iterator[bytes]:
        """Yield the stream content in pieces of at most ``chunk_size``."""

    def read(self, n: int = -1) -> bytes:
        """Return up to ``min(n, chunk_size)`` bytes; ``b''`` at the end.

        Short only at the end of the stream, so consumers that expect
        full reads (like ``shutil.copyfileobj``) work too.
        """
        if n is None or n < 0 or n > self.chunk_size:
            n = self.chunk_size
        parts = []
        wanted = n
        while wanted and not self._done:
            if not self._piece:
                self._next_piece()
                continue
            part = self._piece[:wanted]
            self._piece = self._piece[len(part):]
            parts.append(part)
            wanted -= len(part)
        return b''.join(parts)

    def _next_piece(self) -> None:
        if self._iter is None:
            self._iter = self._pieces()
        try:
            self._piece = memoryview(next(self._iter)).cast('B')
        except StopIteration:
            self._done = True

    def _zero_pieces(self, length: int) -> Iterator[memoryview]:
        """Yield ``length`` zero bytes from one shared buffer.

        Holes are never read from the source; one chunk-sized buffer of
        zeros is allocated on first use and sliced for every hole.
        """
        if self._zeros is None:
            self._zeros = memoryview(bytes(self.chunk_size))
        while length > 0:
            step = min(length, self.chunk_size)
            yield self._zeros[:step]
            length -= step

    def _extent_pieces(self, extents) -> Iterator[bytes]:
        """Yield the content of ``extents``: zeros, or chunked reads.

        The reads are planned ahead and handed to the view as one ordered
        sequence (``pread_many``), so a view that can keep several
        requests in flight (NBD) reads ahead while earlier chunks are
        sent; zeros are interleaved as the plan says.
        """
        pieces, ahead = itertools.tee(self._chunked(extents))
        data = self.view.pread_many(
            (offset, length) for offset, length, is_data in ahead
            if is_data)
        try:
            for _offset, length, is_data in pieces:
                if is_data:
                    yield next(data)
                else:
                    yield from self._zero_pieces(length)
        finally:
            data.close()

    def _chunked(self, extents):
        """(offset, length, is_data): data in chunks, zeros whole."""
        for ext in extents:
            if not ext.data:
                yield ext.start, ext.length, False
                continue
            for offset in range(ext.start, ext.end, self.chunk_size):
                yield offset, min(self.chunk_size, ext.end - offset), True

    def close(self) -> None:
        """Stop the generator and close the view; idempotent."""
        if self._iter is not None:
            self._iter.close()
        self._done = True
        self._piece = memoryview(b'')
        self.view.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
