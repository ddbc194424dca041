"""The upload body: an image stream as glanceclient reads it.

glanceclient (``glanceclient.common.http._BaseHTTPClient._chunk_body``)
turns any non-JSON ``data`` into a generator that calls ``read(1 MiB)``
until it gets ``b''`` and sends the result with chunked transfer encoding;
the length reaches Glance only through ``images.upload(..., image_size=)``
(the ``x-openstack-image-size`` header).  So a body needs ``read(n)``,
which every image stream has, and nothing else: no ``__len__``
(``_chunk_body`` tests the body's truth value first, and a zero length
would look like "no body"), no ``seek``.  The exact ``size`` is exposed
for the caller to pass as ``image_size``.
"""

from collections.abc import Callable


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
