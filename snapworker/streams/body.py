"""File-like upload bodies of known length, built from generated pieces.

glanceclient (``glanceclient.common.http._BaseHTTPClient._chunk_body``)
turns any non-JSON ``data`` into a generator that calls ``read(1 MiB)``
until it gets ``b''`` and sends the result with chunked transfer encoding;
the length reaches Glance only through ``images.upload(..., image_size=)``
(the ``x-openstack-image-size`` header).  So a body needs ``read(n)`` and
nothing else: no ``__len__`` (``_chunk_body`` tests the body's truth value
first, and a zero length would look like "no body"), no ``seek``.  The
exact ``size`` is exposed for the caller to pass as ``image_size``.
"""

import abc
import itertools
from collections.abc import Callable
from collections.abc import Iterator

from oslo_utils import units

MiB = units.Mi
DEFAULT_CHUNK_SIZE = 4 * MiB


def placed_pieces(view, extents, chunk_size):
    """Yield ``(offset, length, data)`` covering ``extents`` in order.

    ``data`` is the bytes of a data range, read in pieces of at most
    ``chunk_size``, or None for a whole zero extent (never read). The
    reads are planned ahead and handed to the view as one ordered
    sequence (``pread_many``), so a view that can keep several requests
    in flight (NBD) reads ahead while earlier pieces are consumed.
    """
    pieces, ahead = itertools.tee(_chunked(extents, chunk_size))
    data = view.pread_many(
        (offset, length) for offset, length, is_data in ahead if is_data)
    try:
        for offset, length, is_data in pieces:
            yield offset, length, next(data) if is_data else None
    finally:
        data.close()


def _chunked(extents, chunk_size):
    """(offset, length, is_data): data in chunks, zeros whole."""
    for ext in extents:
        if not ext.data:
            yield ext.start, ext.length, False
            continue
        for offset in range(ext.start, ext.end, chunk_size):
            yield offset, min(chunk_size, ext.end - offset), True


class PieceStream(abc.ABC):
    """A read-only stream assembled from a generator of byte pieces.

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
        """Yield the content of ``extents``: zeros, or chunked reads."""
        for _offset, length, data in placed_pieces(self.view, extents,
                                                   self.chunk_size):
            if data is None:
                yield from self._zero_pieces(length)
            else:
                yield data

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


class CountingBody:
    """Pass-through body for glanceclient that reports progress.

    ``bytes_out`` counts what the HTTP layer has taken, which is what the
    progress notifications promise ("bytes actually moved"), not what the
    source produced.  ``on_progress`` is called after every read with the
    running total; keep it cheap (rate-limit in the callback if needed).
    """

    def __init__(self, stream,
                 on_progress: Callable[[int], None] | None = None,
                 digest=None, throttle=None):
        """:param digest: a ``digest.BackgroundDigest`` given every byte
            the HTTP layer takes, or None.
        :param throttle: called with the bytes each read took from the
            source (``hostio.Throttle``), or None.
        """
        self.stream = stream
        self.on_progress = on_progress
        self.digest = digest
        self.throttle = throttle
        self._source_bytes = 0
        self.bytes_out = 0
        #: What the source raised, if reading it failed. The HTTP stack
        #: wraps it in a connection error; the caller reports this instead.
        self.read_error = None

    @property
    def size(self) -> int:
        """The exact upload length, to pass as ``image_size``."""
        return self.stream.size

    def read(self, n: int = -1) -> bytes:
        # Whatever fails here (the source, a callback that cancels the
        # job) is kept: the HTTP stack wraps it in a connection error.
        try:
            data = self.stream.read(n)
            if self.throttle is not None:
                read = self.stream.bytes_read
                self.throttle(read - self._source_bytes)
                self._source_bytes = read
            if data:
                self.bytes_out += len(data)
                if self.digest is not None:
                    self.digest.update(data)
                if self.on_progress is not None:
                    self.on_progress(self.bytes_out)
        except Exception as e:
            self.read_error = e
            raise
        return data

    def close(self) -> None:
        self.stream.close()
