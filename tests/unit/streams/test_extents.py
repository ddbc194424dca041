"""Extent helpers and the local raw file view."""

import errno
import os
import tempfile

import testtools
from oslo_utils import units

from snapworker.streams import extents
from snapworker.streams.extents import Extent

KiB = units.Ki
MiB = units.Mi


class MergeExtentsTestCase(testtools.TestCase):

    def test_merges_same_kind_and_drops_empty(self):
        merged = list(extents.merge_extents([
            Extent(0, 10, True), Extent(10, 0, False), Extent(10, 5, True),
            Extent(15, 5, False), Extent(20, 5, False), Extent(25, 1, True)]))
        self.assertEqual([Extent(0, 15, True), Extent(15, 10, False),
                          Extent(25, 1, True)], merged)

    def test_empty(self):
        self.assertEqual([], list(extents.merge_extents([])))


class RawFileViewTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.path = os.path.join(tmp.name, 'disk.raw')

    def make(self, size, writes):
        with open(self.path, 'wb') as f:
            f.truncate(size)
            for offset, data in writes:
                f.seek(offset)
                f.write(data)

    def test_extents_follow_holes(self):
        self.make(8 * MiB, [(2 * MiB, b'x' * MiB), (7 * MiB, b'y')])
        with extents.RawFileView(self.path) as view:
            found = list(view.extents())
            self.assertEqual(8 * MiB, view.virtual_size)
        # Filesystems round data to their block size; only check coverage
        # and that the written bytes are inside data extents.
        self.assertEqual(0, found[0].start)
        self.assertEqual(8 * MiB, found[-1].end)
        for a, b in zip(found, found[1:], strict=False):
            self.assertEqual(a.end, b.start)
            self.assertNotEqual(a.data, b.data)
        data = [e for e in found if e.data]
        for offset in (2 * MiB, 3 * MiB - 1, 7 * MiB):
            self.assertTrue(any(e.start <= offset < e.end for e in data))
        self.assertLess(sum(e.length for e in data), 4 * MiB)

    def test_fully_sparse_and_empty(self):
        self.make(MiB, [])
        with extents.RawFileView(self.path) as view:
            self.assertEqual([Extent(0, MiB, False)], list(view.extents()))
        self.make(0, [])
        with extents.RawFileView(self.path) as view:
            self.assertEqual([], list(view.extents()))

    def test_pread_counts(self):
        self.make(MiB, [(100, b'abc')])
        with extents.RawFileView(self.path) as view:
            self.assertEqual(b'\0abc\0', view.pread(99, 5))
            self.assertEqual(5, view.bytes_read)

    def test_short_read_is_an_error(self):
        self.make(10, [(0, b'0123456789')])
        with extents.RawFileView(self.path) as view:
            exc = self.assertRaises(OSError, view.pread, 5, 10)
            self.assertEqual(errno.EIO, exc.errno)
            self.assertEqual(0, view.bytes_read)

    def test_rejects_non_regular_files(self):
        self.assertRaises(ValueError, extents.RawFileView,
                          os.path.dirname(self.path))

    def test_block_device_view_rejects_regular_files(self):
        self.make(10, [])
        self.assertRaises(ValueError, extents.BlockDeviceView, self.path)

    def test_close_is_idempotent(self):
        self.make(10, [])
        view = extents.RawFileView(self.path)
        view.close()
        view.close()
