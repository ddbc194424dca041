"""A raw image of a disk view, streamed."""

from collections.abc import Iterator

from snapworker.streams import generated


class RawStream(generated.GeneratedStream):
    """The guest content of ``view`` as a raw image, ``view.virtual_size``
    bytes long.

    Zero extents are emitted from a shared zero buffer without touching the
    source; data extents are read once, ``chunk_size`` bytes at a time.
    Closing the stream closes the view.
    """

    @property
    def size(self) -> int:
        return self.view.virtual_size

    def _pieces(self) -> Iterator[bytes]:
        return self._extent_pieces(self.view.extents())
