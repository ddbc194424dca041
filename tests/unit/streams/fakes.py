"""An in-memory disk view and an independent qcow2 decoder for unit tests.

The decoder is deliberately naive (whole image in memory, one lookup per
cluster) so it shares no logic with the encoder it checks.
"""

import struct

from snapworker.streams.extents import DiskView
from snapworker.streams.extents import Extent
from snapworker.streams.extents import merge_extents


class FakeView(DiskView):
    """A disk described by extents; data bytes are a function of offset.

    Data bytes are ``(offset * 7 + 1) % 251`` (never all zero over a
    cluster), so a misplaced cluster is always visible.  Every pread is
    recorded so tests can prove holes were never read.
    """

    def __init__(self, size, data_ranges=(), report_size=None):
        super().__init__()
        self.size = size
        self._extents = []
        pos = 0
        for start, length in sorted(data_ranges):
            self._extents.append(Extent(pos, start - pos, False))
            self._extents.append(Extent(start, length, True))
            pos = start + length
        self._extents.append(Extent(pos, size - pos, False))
        self._extents = list(merge_extents(self._extents))
        self._report_size = size if report_size is None else report_size
        self.reads = []
        self.closed = False

    @property
    def virtual_size(self):
        return self._report_size

    def extents(self):
        return iter(self._extents)

    def pread(self, offset, length):
        self.reads.append((offset, length))
        if not any(ext.data and ext.start <= offset and
                   offset + length <= ext.end for ext in self._extents):
            raise AssertionError('read outside data: %d+%d'
                                 % (offset, length))
        return self._count(pattern(offset, length), offset, length)

    def close(self):
        self.closed = True

    def content(self):
        """The full guest content, for comparing with an encoder."""
        out = bytearray(self.size)
        for ext in self._extents:
            if ext.data:
                out[ext.start:ext.end] = pattern(ext.start, ext.length)
        return bytes(out)


_PERIOD = bytes((i * 7 + 1) % 251 for i in range(251))


def pattern(offset, length):
    """Bytes ``(i * 7 + 1) % 251`` for ``i`` in the range; period 251."""
    start = offset % 251
    repeat = (start + length) // 251 + 1
    return (_PERIOD * repeat)[start:start + length]


def read_all(stream, n=65536):
    parts = []
    while True:
        data = stream.read(n)
        if not data:
            return b''.join(parts)
        parts.append(data)


class Qcow2Image:
    """Decode a generated qcow2 v3 image held in memory."""

    HEADER = struct.Struct('>4sIQIIQIIQQIIQQQQII')

    def __init__(self, data):
        self.data = data
        fields = self.HEADER.unpack_from(data)
        (self.magic, self.version, self.backing_offset, self.backing_size,
         self.cluster_bits, self.size, self.crypt, self.l1_size,
         self.l1_offset, self.rt_offset, self.rt_clusters, self.nb_snapshots,
         self.snapshots_offset, self.incompatible, self.compatible,
         self.autoclear, self.refcount_order, self.header_length) = fields
        self.cluster_size = 1 << self.cluster_bits

    def _u64(self, offset):
        return struct.unpack_from('>Q', self.data, offset)[0]

    def l1_entries(self):
        return [self._u64(self.l1_offset + 8 * i) for i in range(self.l1_size)]

    def guest(self):
        """Return ``(content, references)`` of the image.

        ``references`` maps every host cluster index that metadata points
        to (header, refcount table and blocks, L1, L2, data) to its count.
        """
        cs = self.cluster_size
        refs = {0: 1}

        def ref(offset, clusters=1):
            assert offset % cs == 0, offset
            for c in range(offset // cs, offset // cs + clusters):
                refs[c] = refs.get(c, 0) + 1

        ref(self.rt_offset, self.rt_clusters)
        if self.l1_size:
            ref(self.l1_offset, -(-self.l1_size * 8 // cs))
        out = bytearray(self.size)
        per_l2 = cs // 8
        for l1_index, l1 in enumerate(self.l1_entries()):
            if not l1:
                continue
            assert l1 & (1 << 63), 'L1 entry without COPIED'
            l2_offset = l1 & 0x00fffffffffffe00
            ref(l2_offset)
            for slot in range(per_l2):
                l2 = self._u64(l2_offset + 8 * slot)
                if not l2:
                    continue
                assert l2 & (1 << 63) and not l2 & (1 << 62) and not l2 & 1
                host = l2 & 0x00fffffffffffe00
                ref(host)
                guest = (l1_index * per_l2 + slot) * cs
                chunk = self.data[host:host + cs]
                out[guest:guest + cs] = chunk[:max(0, self.size - guest)]
        for i in range(self.rt_clusters * cs // 8):
            block = self._u64(self.rt_offset + 8 * i)
            if block:
                ref(block)
        return bytes(out[:self.size]), refs

    def refcounts(self):
        """Map host cluster index to its stored refcount (16-bit)."""
        cs = self.cluster_size
        per_block = cs // 2
        counts = {}
        for i in range(self.rt_clusters * cs // 8):
            block = self._u64(self.rt_offset + 8 * i)
            if not block:
                continue
            for j in range(per_block):
                value = struct.unpack_from('>H', self.data, block + 2 * j)[0]
                if value:
                    counts[i * per_block + j] = value
        return counts
