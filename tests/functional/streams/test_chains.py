"""Stream real disks and chains, compare with qemu-img.

Each test builds a source with qemu-img/qemu-io, streams it as raw and as
qcow2 (see ``QemuTestCase.stream_and_verify``) and requires
``qemu-img compare`` to call source and output identical, ``qemu-img
check`` to be clean, and no backing file in the output.
"""

import os

from oslo_utils import units

from snapworker.streams import extents
from snapworker.streams import nbd
from snapworker.streams import qcow2
from snapworker.streams import raw
from tests.functional.streams import qemu

KiB = units.Ki
MiB = units.Mi
GiB = units.Gi
TiB = 1024 * GiB


class RawSourceTestCase(qemu.QemuTestCase):

    def make_raw(self, size):
        base = self.create('disk.raw', 'raw', size)
        self.io(base, 'raw', 'write -P 0x11 1M 1M', 'write -P 0x22 3M 3k',
                'write -P 0x33 %d 512' % (size - 512))
        return base

    def test_raw_with_holes_through_nbd(self):
        self.stream_and_verify(self.make_raw(8 * MiB), 'raw')

    def test_raw_file_view(self):
        base = self.make_raw(8 * MiB)
        out = self.write_stream(raw.RawStream(extents.RawFileView(base)),
                                'out.raw')
        self.assert_same(base, 'raw', out, 'raw')
        view = extents.RawFileView(base)
        out = self.write_stream(qcow2.Qcow2Stream(view), 'out.qcow2')
        self.assert_same(base, 'raw', out, 'qcow2')
        self.assert_standalone_qcow2(out)
        self.assertLess(view.bytes_read, 2 * MiB)

    def test_raw_unaligned_size(self):
        size = 5 * MiB + 3 * 512
        self.stream_and_verify(self.make_raw(size), 'raw')

    def test_raw_file_of_odd_byte_size(self):
        base = self.path('odd.raw')
        with open(base, 'wb') as f:
            f.truncate(3 * MiB + 1000)
            f.seek(3 * MiB)
            f.write(b'tail' * 250)
        view = extents.RawFileView(base)
        out = self.write_stream(qcow2.Qcow2Stream(view), 'out.qcow2')
        self.assertEqual(3 * MiB + 1024, self.info(out)['virtual-size'])
        self.assert_same(base, 'raw', out, 'qcow2')
        self.assert_standalone_qcow2(out)
        self.stream_and_verify(base, 'raw')

    def test_output_cluster_sizes(self):
        base = self.make_raw(8 * MiB + 512)
        for cluster_size in (512, 4 * KiB, 2 * MiB):
            self.stream_and_verify(base, 'raw', cluster_size)


class Qcow2SourceTestCase(qemu.QemuTestCase):

    def layer_writes(self, path, fmt='qcow2'):
        """Data, zero writes over data, discards, at odd offsets."""
        self.io(path, fmt, 'write -P 0x41 0 300k', 'write -P 0x42 1M 1M',
                'write -z 1200k 100k', 'discard 1600k 128k',
                'write -z 3M 512k', 'write -P 0x43 5000k 4k')

    def test_compat(self):
        for compat in ('0.10', '1.1'):
            top = self.create('c%s.qcow2' % compat, 'qcow2', 6 * MiB,
                              options=['compat=%s' % compat])
            self.layer_writes(top)
            self.stream_and_verify(top, 'qcow2')

    def test_source_cluster_sizes(self):
        for cluster_size in ('4k', '16k', '512k', '2M'):
            top = self.create('cs%s.qcow2' % cluster_size, 'qcow2',
                              6 * MiB + 3 * 512,
                              options=['cluster_size=%s' % cluster_size])
            self.layer_writes(top)
            self.io(top, 'qcow2', 'write -P 0x44 %d 512' % (6 * MiB + 1024))
            self.stream_and_verify(top, 'qcow2')

    def test_extended_l2(self):
        top = self.create('ext.qcow2', 'qcow2', 6 * MiB,
                          options=['extended_l2=on', 'cluster_size=128k'])
        self.layer_writes(top)
        self.io(top, 'qcow2', 'write -P 0x45 4100k 4k', 'write -z 4200k 4k')
        self.assertTrue(
            self.info(top)['format-specific']['data']['extended-l2'])
        self.stream_and_verify(top, 'qcow2')

    def test_compressed_backing(self):
        plain = self.create('plain.qcow2', 'qcow2', 6 * MiB)
        self.layer_writes(plain)
        base = self.path('compressed.qcow2')
        qemu.run('qemu-img', 'convert', '-c', '-O', 'qcow2', plain, base)
        top = self.create('top.qcow2', 'qcow2', 6 * MiB,
                          backing=(base, 'qcow2'))
        self.io(top, 'qcow2', 'write -P 0x46 100k 8k', 'write -z 1M 64k')
        self.stream_and_verify(top, 'qcow2')


class ChainTestCase(qemu.QemuTestCase):

    def test_nova_default_overlay_on_raw(self):
        base = self.create('base.raw', 'raw', 8 * MiB)
        self.io(base, 'raw', 'write -P 0x51 0 2M', 'write -P 0x52 6M 1M')
        top = self.create('disk', 'qcow2', 8 * MiB, backing=(base, 'raw'))
        self.io(top, 'qcow2', 'write -P 0x53 1M 2M', 'write -z 6M 64k',
                'discard 6400k 256k', 'write -z 100k 8k')
        self.stream_and_verify(top, 'qcow2')

    def test_depth_three_zero_and_discard_in_every_layer(self):
        layers = [('base.raw', 'raw'), ('l1.qcow2', 'qcow2'),
                  ('l2.qcow2', 'qcow2'), ('l3.qcow2', 'qcow2')]
        backing = None
        for i, (name, fmt) in enumerate(layers):
            options = ['compat=0.10'] if i == 2 else []
            path = self.create(name, fmt, 8 * MiB, backing=backing,
                               options=options)
            self.io(path, fmt, 'write -P %d %dk 700k' % (0x60 + i, 512 * i),
                    'write -z %dk 96k' % (512 * i + 64),
                    'discard %dk 128k' % (2048 + 512 * i),
                    'write -P %d %dk 4k' % (0x70 + i, 6000 + 10 * i))
            backing = (path, fmt)
        self.stream_and_verify(backing[0], 'qcow2')

    def test_depth_two_qcow2_base_different_cluster_sizes(self):
        base = self.create('base.qcow2', 'qcow2', 4 * MiB,
                           options=['cluster_size=4k'])
        self.io(base, 'qcow2', 'write -P 0x81 0 3M')
        mid = self.create('mid.qcow2', 'qcow2', 4 * MiB,
                          backing=(base, 'qcow2'),
                          options=['cluster_size=2M'])
        self.io(mid, 'qcow2', 'write -z 1M 8k', 'discard 2M 2M')
        top = self.create('top.qcow2', 'qcow2', 4 * MiB,
                          backing=(mid, 'qcow2'),
                          options=['extended_l2=on'])
        self.io(top, 'qcow2', 'write -P 0x82 3000k 5k')
        self.stream_and_verify(top, 'qcow2')

    def test_overlay_larger_than_backing(self):
        base = self.create('base.raw', 'raw', 3 * MiB + 512)
        self.io(base, 'raw', 'write -P 0x91 2M 1M')
        top = self.create('top.qcow2', 'qcow2', 10 * MiB + 1536,
                          backing=(base, 'raw'))
        self.io(top, 'qcow2', 'write -P 0x92 9M 64k', 'write -z 2M 4k')
        self.stream_and_verify(top, 'qcow2')

    def test_empty_overlay_on_empty_base(self):
        base = self.create('base.raw', 'raw', 4 * MiB)
        top = self.create('top.qcow2', 'qcow2', 4 * MiB,
                          backing=(base, 'raw'))
        self.stream_and_verify(top, 'qcow2')

    def test_huge_sparse_disk_streams_as_small_qcow2(self):
        """1 TiB virtual, 1 MiB of data, 8 GiB past the 4 GiB NBD limit."""
        base = self.create('base.raw', 'raw', 6 * GiB)
        self.io(base, 'raw', 'write -P 0xa1 %d 512k' % (5 * GiB))
        top = self.create('top.qcow2', 'qcow2', TiB, backing=(base, 'raw'))
        self.io(top, 'qcow2', 'write -P 0xa2 %d 512k' % (TiB - 512 * KiB))
        # qemu reports the first 4 KiB of a raw file as data, always.
        self.assertEqual(MiB + 4 * KiB, self.nonzero_bytes(top, 'qcow2'))
        view = nbd.NbdChainView(nbd.qemu_nbd_argv(top, 'qcow2'))
        out = self.write_stream(qcow2.Qcow2Stream(view), 'out.qcow2')
        self.assertEqual(MiB + 4 * KiB, view.bytes_read)
        self.assertLess(os.path.getsize(out), 2 * MiB)
        self.assert_same(top, 'qcow2', out, 'qcow2')
        self.assert_standalone_qcow2(out)

    def test_zero_size_disk(self):
        top = self.create('empty.qcow2', 'qcow2', 0)
        self.stream_and_verify(top, 'qcow2')
