"""BlockDeviceView on a loop device (needs root and /dev/loop-control)."""

import os
import subprocess

from oslo_utils import units

from snapworker.streams import extents
from snapworker.streams import qcow2
from snapworker.streams import raw
from tests.functional.streams import qemu

MiB = units.Mi


class BlockDeviceViewTestCase(qemu.QemuTestCase):

    def setUp(self):
        super().setUp()
        backing = self.create('lv.raw', 'raw', 6 * MiB)
        self.io(backing, 'raw', 'write -P 0x21 1M 64k')
        proc = subprocess.run(['losetup', '--find', '--show', '--read-only',
                               backing], capture_output=True, text=True)
        if proc.returncode or not os.access(proc.stdout.strip(), os.R_OK):
            self.skipTest('no loop device: %s' % proc.stderr.strip())
        self.device = proc.stdout.strip()
        self.addCleanup(subprocess.run, ['losetup', '-d', self.device])

    def test_device_reads_as_one_data_extent(self):
        with extents.BlockDeviceView(self.device) as view:
            self.assertEqual(6 * MiB, view.virtual_size)
            self.assertEqual([extents.Extent(0, 6 * MiB, True)],
                             list(view.extents()))

    def test_streams_match_device(self):
        out = self.write_stream(
            raw.RawStream(extents.BlockDeviceView(self.device)), 'out.raw')
        self.assert_same(self.path('lv.raw'), 'raw', out, 'raw')
        view = extents.BlockDeviceView(self.device)
        out = self.write_stream(qcow2.Qcow2Stream(view), 'out.qcow2')
        self.assert_same(self.path('lv.raw'), 'raw', out, 'qcow2')
        self.assert_standalone_qcow2(out)
        self.assertEqual(6 * MiB, view.bytes_read)
