"""A standalone qcow2 image of a disk view, generated as a stream.

Glance inspects uploaded qcow2 images and refuses ones with a backing file,
and Nova's default disk is a qcow2 overlay on a ``_base`` file, so the
common case needs a *flattened* qcow2.  ``qemu-img convert`` can only write
it to a regular file (a scratch copy); this module writes it to a stream.

Because the allocation map is known before the first byte, the whole layout
is planned up front and the image is emitted strictly in file order::

    cluster 0         header (+ end-of-extensions marker)
    next clusters     refcount table
    next clusters     refcount blocks (every used cluster has refcount 1)
    next clusters     L1 table
    next clusters     L2 tables, only for L1 entries that map data
    remaining         data clusters, in guest order

Only clusters containing at least one byte of a ``data=True`` extent are
allocated; the rest stay unallocated and read as zeros because the image
has no backing file.  The format follows docs/interop/qcow2.txt in QEMU:
version 3 (compat 1.1), 16-bit refcounts, zlib compression type (unused),
no extended L2 entries, no snapshots, no encryption.

Memory: the plan keeps one entry per run of allocated clusters, one per
data extent and one per allocated L2 table, plus the L1 table while it is
emitted; never one object per cluster of the virtual disk, so a 1 TiB disk
with 1 MiB of data plans in microseconds.
"""

import bisect
import struct
from collections.abc import Iterator

from snapworker.streams import generated
from snapworker.streams.extents import Extent
from snapworker.streams.extents import merge_extents

MAGIC = b'QFI\xfb'
VERSION = 3
# 104 bytes of version 3 fields, then the compression type byte padded to
# a multiple of 8, as QEMU writes it.
HEADER_LENGTH = 112
REFCOUNT_ORDER = 4  # 16-bit refcounts
REFCOUNT_BYTES = (1 << REFCOUNT_ORDER) // 8
# The top bit of L1/L2 entries says "refcount is exactly one"; every
# cluster here is referenced once, and qemu-img check expects the flag.
COPIED = 1 << 63
ENTRY_BYTES = 8
SECTOR = 512
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

_HEADER = struct.Struct('>4sIQIIQIIQQIIQQQQII')
# Header extension: type 0 / length 0 ends the list.
_END_OF_EXTENSIONS = bytes(8)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _Layout:
    """Where every part of the image goes; computed once from extents.

    ``runs`` are ``[first, end)`` guest cluster ranges that get allocated,
    sorted and merged; ``run_ranks[i]`` is the number of data clusters
    before run ``i``, so a guest cluster's host offset is computable
    without a per-cluster table.
    """

    def __init__(self, extents, virtual_size: int, cluster_size: int):
        self.virtual_size = virtual_size
        # QEMU truncates a qcow2 size to whole sectors, so round up: the
        # tail of a raw disk with an odd byte size must not be cut off.
        self.guest_size = _ceil_div(virtual_size, SECTOR) * SECTOR
        self.cluster_size = cluster_size
        self.cluster_bits = cluster_size.bit_length() - 1
        self.l2_entries = cluster_size // ENTRY_BYTES
        self.data_extents = []
        self.runs = []
        self._plan_runs(extents)
        self.run_starts = [first for first, _ in self.runs]
        self.data_starts = [ext.start for ext in self.data_extents]
        self.run_ranks = []
        self.data_clusters = 0
        for first, end in self.runs:
            self.run_ranks.append(self.data_clusters)
            self.data_clusters += end - first
        self.l2_indexes = self._plan_l2_indexes()
        self.l1_size = _ceil_div(self.guest_size,
                                 cluster_size * self.l2_entries)
        self.l1_clusters = _ceil_div(self.l1_size * ENTRY_BYTES,
                                     cluster_size)
        self._plan_refcounts()
        self._plan_offsets()

    def _plan_runs(self, extents) -> None:
        cs = self.cluster_size
        pos = 0
        for ext in merge_extents(extents):
            if ext.start != pos:
                raise ValueError('extents are not contiguous at %d' % pos)
            pos = ext.end
            if not ext.data:
                continue
            self.data_extents.append(ext)
            first, end = ext.start // cs, _ceil_div(ext.end, cs)
            if self.runs and first <= self.runs[-1][1]:
                self.runs[-1][1] = max(self.runs[-1][1], end)
            else:
                self.runs.append([first, end])
        if pos != self.virtual_size:
            raise ValueError('extents cover %d of %d bytes'
                             % (pos, self.virtual_size))

    def _plan_l2_indexes(self) -> list:
        indexes = []
        for first, end in self.runs:
            lo = first // self.l2_entries
            if indexes and indexes[-1] >= lo:
                lo = indexes[-1] + 1
            indexes.extend(range(lo, (end - 1) // self.l2_entries + 1))
        return indexes

    def _plan_refcounts(self) -> None:
        """Size refcount table and blocks, which count themselves too.

        Start from the minimum and grow until the needs stop changing: the
        least fixed point, so no refcount cluster is wasted.
        """
        self.refs_per_block = self.cluster_size // REFCOUNT_BYTES
        fixed = 1 + self.l1_clusters + len(self.l2_indexes) + \
            self.data_clusters
        self.rt_clusters = self.rb_count = 1
        while True:
            total = fixed + self.rt_clusters + self.rb_count
            rb_count = _ceil_div(total, self.refs_per_block)
            rt_clusters = _ceil_div(rb_count * ENTRY_BYTES, self.cluster_size)
            if (rb_count, rt_clusters) == (self.rb_count, self.rt_clusters):
                break
            self.rb_count = max(self.rb_count, rb_count)
            self.rt_clusters = max(self.rt_clusters, rt_clusters)
        self.total_clusters = total

    def _plan_offsets(self) -> None:
        cs = self.cluster_size
        self.rt_offset = cs
        self.rb_offset = self.rt_offset + self.rt_clusters * cs
        self.l1_offset = self.rb_offset + self.rb_count * cs
        self.l2_offset = self.l1_offset + self.l1_clusters * cs
        self.data_offset = self.l2_offset + len(self.l2_indexes) * cs
        self.file_size = self.total_clusters * cs

    def host_offset(self, run_index: int, cluster: int) -> int:
        first = self.runs[run_index][0]
        rank = self.run_ranks[run_index] + cluster - first
        return self.data_offset + rank * self.cluster_size

    def runs_between(self, first: int, end: int) -> Iterator[tuple]:
        """Yield ``(run_index, lo, hi)`` for allocated clusters in a range."""
        index = max(bisect.bisect_right(self.run_starts, first) - 1, 0)
        for i in range(index, len(self.runs)):
            run_first, run_end = self.runs[i]
            if run_first >= end:
                return
            lo, hi = max(run_first, first), min(run_end, end)
            if lo < hi:
                yield i, lo, hi

    def content(self, start: int, end: int) -> Iterator[Extent]:
        """Describe guest range ``[start, end)`` with data and zero extents."""
        pos = start
        index = max(bisect.bisect_right(self.data_starts, start) - 1, 0)
        for i in range(index, len(self.data_extents)):
            ext = self.data_extents[i]
            if ext.start >= end:
                break
            lo, hi = max(ext.start, pos), min(ext.end, end)
            if lo >= hi:
                continue
            if lo > pos:
                yield Extent(pos, lo - pos, False)
            yield Extent(lo, hi - lo, True)
            pos = hi
        if pos < end:
            yield Extent(pos, end - pos, False)


class Qcow2Stream(generated.GeneratedStream):
    """A valid standalone qcow2 v3 image whose guest content is ``view``.

    ``size`` is exact as soon as the object exists (the layout is planned
    in the constructor from ``view.extents()``).  Each data byte of the
    view is read once, holes are never read, and memory stays at one
    chunk plus the metadata described in the module docstring.  Closing the
    stream closes the view.
    """

    def __init__(self, view, cluster_size: int = 65536,
                 chunk_size: int = generated.DEFAULT_CHUNK_SIZE):
        bits = cluster_size.bit_length() - 1
        if (cluster_size != 1 << bits or
                not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS):
            raise ValueError('cluster_size must be a power of two between '
                             '512 and 2 MiB, not %d' % cluster_size)
        super().__init__(view, chunk_size)
        self.layout = _Layout(view.extents(), view.virtual_size,
                              cluster_size)

    @property
    def size(self) -> int:
        return self.layout.file_size

    def _pieces(self) -> Iterator[bytes]:
        yield self._header_cluster()
        yield from self._refcount_table()
        yield from self._refcount_blocks()
        yield from self._l1_table()
        yield from self._l2_tables()
        yield from self._data_clusters()

    def _header_cluster(self) -> bytes:
        lay = self.layout
        header = _HEADER.pack(
            MAGIC, VERSION,
            0, 0,  # backing file offset and size: none, by design
            lay.cluster_bits, lay.guest_size,
            0,  # no encryption
            lay.l1_size, lay.l1_offset if lay.l1_size else 0,
            lay.rt_offset, lay.rt_clusters,
            0, 0,  # no snapshots
            0, 0, 0,  # incompatible, compatible, autoclear features
            REFCOUNT_ORDER, HEADER_LENGTH)
        header += bytes(HEADER_LENGTH - len(header))  # compression type 0
        header += _END_OF_EXTENSIONS
        return header + bytes(lay.cluster_size - len(header))

    def _table(self, clusters: int, slots) -> Iterator[memoryview]:
        """Pack ``(slot, entry)`` pairs into a zeroed table, per cluster.

        Used for the refcount table and the L1 table, whose size the plan
        bounds (one entry per refcount block / per 512 MiB of guest disk at
        64 KiB clusters).
        """
        cs = self.layout.cluster_size
        table = bytearray(clusters * cs)
        for slot, entry in slots:
            struct.pack_into('>Q', table, slot * ENTRY_BYTES, entry)
        view = memoryview(table)
        for offset in range(0, len(table), cs):
            yield view[offset:offset + cs]

    def _refcount_table(self) -> Iterator[memoryview]:
        lay = self.layout
        slots = ((i, lay.rb_offset + i * lay.cluster_size)
                 for i in range(lay.rb_count))
        return self._table(lay.rt_clusters, slots)

    def _refcount_blocks(self) -> Iterator[bytes]:
        lay = self.layout
        one = (1).to_bytes(REFCOUNT_BYTES, 'big')
        for block in range(lay.rb_count):
            used = min(max(lay.total_clusters - block * lay.refs_per_block, 0),
                       lay.refs_per_block)
            yield one * used
            yield from self._zero_pieces(
                (lay.refs_per_block - used) * REFCOUNT_BYTES)

    def _l1_table(self) -> Iterator[memoryview]:
        lay = self.layout
        slots = ((index, (lay.l2_offset + rank * lay.cluster_size) | COPIED)
                 for rank, index in enumerate(lay.l2_indexes))
        return self._table(lay.l1_clusters, slots)

    def _l2_tables(self) -> Iterator[bytes]:
        lay = self.layout
        for index in lay.l2_indexes:
            first = index * lay.l2_entries
            table = bytearray(lay.cluster_size)
            for run, lo, hi in lay.runs_between(first, first + lay.l2_entries):
                host = lay.host_offset(run, lo) | COPIED
                entries = range(host, host + (hi - lo) * lay.cluster_size,
                                lay.cluster_size)
                struct.pack_into('>%dQ' % (hi - lo), table,
                                 (lo - first) * ENTRY_BYTES, *entries)
            yield table

    def _data_clusters(self) -> Iterator[bytes]:
        lay = self.layout
        for first, end in lay.runs:
            start = first * lay.cluster_size
            stop = min(end * lay.cluster_size, lay.virtual_size)
            yield from self._extent_pieces(lay.content(start, stop))
            # The last cluster of a disk whose size is not cluster aligned
            # is still a whole cluster in the file.
            yield from self._zero_pieces(end * lay.cluster_size - stop)
