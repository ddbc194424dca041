"""A read-only RBD snapshot as a disk view (see extents.py).

The view is given the image already open (``rbd.Image(ioctx, name,
snapshot=..., read_only=True)``) by the RBD source, and owns it from then
on: only the sources' Ceph modules import rbd, so a worker without RBD
disks never loads librados through the streams.
"""

from collections.abc import Iterator

from snapworker.streams.extents import DiskView
from snapworker.streams.extents import Extent
from snapworker.streams.extents import merge_extents


class RbdView(DiskView):
    """The guest content of an RBD snapshot.

    Extents come from ``diff_iterate`` against nothing (what is allocated
    in the image or, for a clone, its parents), at whole-object
    granularity: with object-map/fast-diff this visits only the objects
    that exist; without them every object is asked, still without reading
    data. Holes are reported as ``data=False`` and never read.

    :param image: an open, read-only ``rbd.Image`` of the snapshot; closed
        by ``close()``, and at once if its size cannot be read.
    """

    def __init__(self, image):
        super().__init__()
        self._image = image
        try:
            self._size = image.size()
        except BaseException:
            self.close()
            raise

    @property
    def virtual_size(self) -> int:
        return self._size

    def extents(self) -> Iterator[Extent]:
        found = []

        def on_extent(offset, length, exists):
            if exists:
                found.append(Extent(offset, length, True))

        self._image.diff_iterate(0, self._size, None, on_extent,
                                 include_parent=True, whole_object=True)
        return merge_extents(self._fill_holes(sorted(found)))

    def _fill_holes(self, data_extents):
        """Whole-object extents, clipped to the image and made to cover
        it: overlaps dropped, the gaps between them as holes."""
        pos = 0
        for ext in data_extents:
            start = max(ext.start, pos)
            end = min(ext.end, self._size)
            if start >= end:
                continue
            if start > pos:
                yield Extent(pos, start - pos, False)
            yield Extent(start, end - start, True)
            pos = end
        if pos < self._size:
            yield Extent(pos, self._size - pos, False)

    def pread(self, offset: int, length: int) -> bytes:
        return self._count(self._image.read(offset, length), offset, length)

    def close(self) -> None:
        if self._image is not None:
            self._image.close()
            self._image = None
