"""Layout math of the qcow2 encoder, checked with an independent decoder."""

import time

import testtools
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from oslo_utils import units

from snapworker.streams import qcow2
from snapworker.streams.extents import Extent
from tests.unit.streams import fakes

KiB = units.Ki
MiB = units.Mi
GiB = units.Gi
TiB = 1024 * GiB


class Qcow2StreamTestCase(testtools.TestCase):

    def encode(self, view, cluster_size=65536, chunk_size=MiB):
        stream = qcow2.Qcow2Stream(view, cluster_size=cluster_size,
                                   chunk_size=chunk_size)
        size = stream.size
        data = fakes.read_all(stream, 65536)
        self.assertEqual(size, len(data))
        return stream, fakes.Qcow2Image(data)

    def assert_valid(self, view, image):
        """Guest content matches and every cluster has refcount 1."""
        content, refs = image.guest()
        self.assertEqual(view.content().ljust(image.size, b'\0'), content)
        cs = image.cluster_size
        self.assertEqual(len(image.data) // cs, len(refs))
        self.assertEqual(set(range(len(image.data) // cs)), set(refs))
        self.assertEqual({1}, set(refs.values()))
        self.assertEqual(refs, image.refcounts())

    def test_header(self):
        view = fakes.FakeView(3 * MiB, [(MiB, 5000)])
        _, image = self.encode(view)
        self.assertEqual(b'QFI\xfb', image.magic)
        self.assertEqual(3, image.version)
        self.assertEqual((0, 0), (image.backing_offset, image.backing_size))
        self.assertEqual(16, image.cluster_bits)
        self.assertEqual(3 * MiB, image.size)
        self.assertEqual(0, image.crypt)
        self.assertEqual((0, 0), (image.incompatible, image.autoclear))
        self.assertEqual(4, image.refcount_order)
        self.assertEqual(112, image.header_length)
        # compression type zlib, then the end-of-extensions marker
        self.assertEqual(bytes(16), image.data[104:120])
        self.assertEqual(1, image.l1_size)
        self.assert_valid(view, image)

    def test_empty_disk_is_three_clusters(self):
        view = fakes.FakeView(0)
        stream, image = self.encode(view)
        self.assertEqual(3 * 65536, stream.size)
        self.assertEqual((0, 0), (image.l1_size, image.l1_offset))
        self.assert_valid(view, image)

    def test_all_zero_disk_allocates_nothing(self):
        view = fakes.FakeView(10 * GiB)
        stream, image = self.encode(view)
        self.assertEqual([0] * 20, image.l1_entries())
        # header, refcount table, refcount block, L1
        self.assertEqual(4 * 65536, stream.size)
        self.assertEqual([], view.reads)

    def test_partial_clusters_are_padded_with_zeros(self):
        view = fakes.FakeView(100000, [(10, 20), (70000, 30000)])
        stream, image = self.encode(view)
        self.assertEqual(4 + 1 + 2, len(image.data) // 65536)
        self.assert_valid(view, image)
        self.assertEqual(20 + 30000, view.bytes_read)

    def test_size_rounded_up_to_a_sector(self):
        # QEMU would truncate 1000 to 512 and lose the tail.
        view = fakes.FakeView(1000, [(900, 100)])
        _, image = self.encode(view)
        self.assertEqual(1024, image.size)
        content, _ = image.guest()
        self.assertEqual(view.content() + bytes(24), content)

    def test_unaligned_size_small_clusters(self):
        view = fakes.FakeView(10 * 512 + 7, [(0, 600), (5000, 127)])
        _, image = self.encode(view, cluster_size=512)
        self.assert_valid(view, image)

    def test_data_read_once_and_holes_never(self):
        ranges = [(0, 4096), (70000, 5), (3 * MiB, 2 * MiB + 3)]
        view = fakes.FakeView(8 * MiB, ranges)
        self.encode(view, chunk_size=MiB)
        self.assertEqual(sum(length for _, length in ranges), view.bytes_read)
        self.assertTrue(all(length <= MiB for _, length in view.reads))

    def test_huge_sparse_disk_plans_without_per_cluster_state(self):
        view = fakes.FakeView(TiB, [(5 * GiB, MiB)])
        begin = time.monotonic()
        stream = qcow2.Qcow2Stream(view)
        self.assertLess(time.monotonic() - begin, 1.0)
        lay = stream.layout
        self.assertEqual(2048, lay.l1_size)
        self.assertEqual([[81920, 81936]], lay.runs)
        self.assertEqual([10], lay.l2_indexes)
        # header, rt, rb, L1 (16 KiB -> 1 cluster), one L2, 16 data
        self.assertEqual((1 + 1 + 1 + 1 + 1 + 16) * 65536, stream.size)
        image = fakes.Qcow2Image(fakes.read_all(stream, MiB))
        entries = image.l1_entries()
        self.assertEqual(1, sum(1 for e in entries if e))
        self.assertEqual(MiB, view.bytes_read)

    def test_refcount_blocks_count_themselves(self):
        # 512-byte clusters: 256 refcounts per block, 64 per table cluster.
        for data_clusters in (250, 251, 252, 253, 508, 509, 600, 20000):
            view = fakes.FakeView(data_clusters * 512,
                                  [(0, data_clusters * 512)])
            stream, image = self.encode(view, cluster_size=512,
                                        chunk_size=4096)
            lay = stream.layout
            total = len(image.data) // 512
            self.assertEqual(-(-total // 256), lay.rb_count, data_clusters)
            self.assertEqual(-(-lay.rb_count * 8 // 512), lay.rt_clusters)
            self.assert_valid(view, image)

    def test_l2_boundaries(self):
        # 512-byte clusters: one L2 table maps 64 clusters (32 KiB).
        view = fakes.FakeView(200 * 512, [(63 * 512, 1024), (130 * 512, 1)])
        stream, image = self.encode(view, cluster_size=512)
        self.assertEqual([0, 1, 2], stream.layout.l2_indexes)
        self.assert_valid(view, image)

    def test_rejects_bad_cluster_size(self):
        view = fakes.FakeView(MiB)
        for size in (256, 3000, 4 * MiB):
            self.assertRaises(ValueError, qcow2.Qcow2Stream, view,
                              cluster_size=size)

    def test_rejects_gaps_in_extents(self):
        view = fakes.FakeView(MiB)
        view.extents = lambda: iter([Extent(0, 10, True),
                                     Extent(20, MiB - 20, False)])
        self.assertRaises(ValueError, qcow2.Qcow2Stream, view)

    def test_rejects_extents_not_matching_size(self):
        view = fakes.FakeView(MiB, report_size=2 * MiB)
        self.assertRaises(ValueError, qcow2.Qcow2Stream, view)

    def test_close_closes_view(self):
        view = fakes.FakeView(MiB, [(0, MiB)])
        stream = qcow2.Qcow2Stream(view)
        stream.read(10)
        stream.close()
        self.assertTrue(view.closed)
        self.assertEqual(b'', stream.read(10))


@st.composite
def disks(draw):
    size = draw(st.integers(0, 300000))
    points = sorted(draw(st.lists(st.integers(0, size), max_size=12)))
    pairs = zip(points[::2], points[1::2], strict=False)
    ranges = [(a, b - a) for a, b in pairs if b > a]
    return size, ranges


class Qcow2PropertyTestCase(testtools.TestCase):

    @settings(max_examples=60, deadline=None)
    @given(disks(), st.sampled_from([512, 4096, 65536]),
           st.sampled_from([512, 5000, 65536]))
    def test_any_disk_roundtrips(self, disk, cluster_size, chunk_size):
        size, ranges = disk
        view = fakes.FakeView(size, ranges)
        stream = qcow2.Qcow2Stream(view, cluster_size=cluster_size,
                                   chunk_size=chunk_size)
        data = fakes.read_all(stream, 7000)
        self.assertEqual(stream.size, len(data))
        image = fakes.Qcow2Image(data)
        content, refs = image.guest()
        self.assertEqual(-(-size // 512) * 512, image.size)
        self.assertEqual(view.content().ljust(image.size, b'\0'), content)
        self.assertEqual(len(data) // cluster_size, len(refs))
        self.assertEqual({1}, set(refs.values()))
        self.assertEqual(refs, image.refcounts())
        self.assertEqual(sum(length for _, length in ranges),
                         view.bytes_read)
