"""The worker's own qcow2 header parser, on real and crafted headers.

A guest cannot write a qcow2 header (QEMU does), but a raw disk's first
bytes are the guest's, and a host file can be crafted: the parser must
refuse what it does not understand, never read outside the first
cluster, and never fail with anything but ``InvalidHeader``.
"""

import os
import struct
import subprocess

import fixtures
import testtools
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from snapworker.sources import qcow2_header as qh


def _reader(data, reads=None):
    def read_at(offset, length):
        if reads is not None:
            reads.append((offset, length))
        return bytes(data[offset:offset + length])
    return read_at


class RealHeaderTestCase(testtools.TestCase):
    """Headers qemu-img wrote."""

    def setUp(self):
        super().setUp()
        self.dir = self.useFixture(fixtures.TempDir()).path

    def _create(self, name, *args, size='64M'):
        path = os.path.join(self.dir, name)
        subprocess.run(['qemu-img', 'create', '-q', *args, path, size],
                       check=True)
        with open(path, 'rb') as f:
            return bytearray(f.read(1 << 21))

    def test_overlay_names_its_backing_file_and_format(self):
        self._create('base', '-f', 'raw')
        header = qh.parse(_reader(self._create(
            'top', '-f', 'qcow2', '-b', os.path.join(self.dir, 'base'),
            '-F', 'raw')))
        self.assertEqual((os.path.join(self.dir, 'base'), 'raw'),
                         (header.backing_name, header.backing_format))
        self.assertEqual(64 * 1024 * 1024, header.virtual_size)

    def test_versions_cluster_sizes_and_extended_l2(self):
        for options in ('compat=0.10', 'compat=1.1,cluster_size=4096',
                        'cluster_size=2M',
                        'extended_l2=on,cluster_size=128k'):
            header = qh.parse(_reader(self._create(
                'img', '-f', 'qcow2', '-o', options)))
            self.assertFalse(header.has_backing)
            self.assertEqual(0, header.snapshots)

    def test_backing_without_format_has_none(self):
        self._create('base', '-f', 'raw')
        data = self._create('top', '-f', 'qcow2', '-b',
                            os.path.join(self.dir, 'base'), '-F', 'raw')
        # Turn the backing-format extension into an unknown one.
        index = data.index(struct.pack('>I', qh.EXT_BACKING_FORMAT))
        data[index:index + 4] = struct.pack('>I', 0x12345678)
        header = qh.parse(_reader(data))
        self.assertIsNone(header.backing_format)


def _v3_header(backing=b'', extensions=b'', incompatible=0, size=1 << 30,
               cluster_bits=16, crypt=0, version=3, header_length=104):
    fixed = struct.pack('>4sIQIIQIIQQIIQ', qh.MAGIC, version, 0, 0,
                        cluster_bits, size, crypt, 0, 0, 0, 0, 0, 0)
    if version == 3:
        fixed += struct.pack('>QQQII', incompatible, 0, 0, 4, header_length)
    data = bytearray(fixed + extensions + struct.pack('>II', 0, 0))
    if backing:
        offset = len(data)
        data += backing
        struct.pack_into('>QI', data, 8, offset, len(backing))
    return data + bytes((1 << cluster_bits) - len(data))


def _ext(ext_type, payload):
    return (struct.pack('>II', ext_type, len(payload)) + payload
            + bytes(-len(payload) % 8))


class CraftedHeaderTestCase(testtools.TestCase):

    def _refused(self, data, reason):
        error = self.assertRaises(qh.InvalidHeader, qh.parse,
                                  _reader(data))
        self.assertIn(reason, str(error))

    def test_valid_crafted_header(self):
        header = qh.parse(_reader(_v3_header(
            backing=b'/instances/_base/b',
            extensions=_ext(qh.EXT_BACKING_FORMAT, b'raw'))))
        self.assertEqual(('/instances/_base/b', 'raw'),
                         (header.backing_name, header.backing_format))

    def test_not_qcow2(self):
        self._refused(b'\0' * 512, 'no qcow2 magic')
        self._refused(b'QFI', 'no qcow2 magic')

    def test_refusals(self):
        cases = [
            (_v3_header(version=4), 'version 4'),
            (_v3_header(cluster_bits=30), 'cluster_bits'),
            (_v3_header(cluster_bits=8), 'cluster_bits'),
            (_v3_header(crypt=1), 'encrypted'),
            (_v3_header(incompatible=qh.INCOMPAT_CORRUPT), 'corrupt'),
            (_v3_header(incompatible=qh.INCOMPAT_DATA_FILE),
             'external data file'),
            (_v3_header(incompatible=1 << 7), 'unknown incompatible'),
            (_v3_header(header_length=100), 'header_length'),
            (_v3_header(header_length=1 << 17), 'header_length'),
            (_v3_header(extensions=_ext(qh.EXT_DATA_FILE, b'/etc/x')),
             'external data file'),
            (_v3_header(extensions=_ext(qh.EXT_ENCRYPTION, b'\0' * 16)),
             'encryption'),
            (_v3_header(extensions=_ext(qh.EXT_BACKING_FORMAT, b'raw')
                        + _ext(qh.EXT_BACKING_FORMAT, b'qcow2')), 'twice'),
            (_v3_header(backing=b'a\0b'), 'NUL'),
            (_v3_header(backing=b'\xff\xfe'), 'UTF-8'),
            (_v3_header(backing=b'x' * 1024), '1024 bytes'),
        ]
        for data, reason in cases:
            self._refused(data, reason)

    def test_extension_overrunning_the_cluster(self):
        data = _v3_header()
        struct.pack_into('>II', data, 104, 0x1234, 1 << 20)
        self._refused(data, 'overruns')

    def test_backing_name_outside_the_first_cluster(self):
        data = _v3_header(backing=b'/b')
        struct.pack_into('>Q', data, 8, 1 << 20)
        self._refused(data, 'outside the first cluster')


class HypothesisTestCase(testtools.TestCase):
    """Any bytes: a header, or InvalidHeader; reads stay in cluster 0."""

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)),
                    max_size=24))
    def test_mutated_headers(self, mutations):
        data = _v3_header(backing=b'/instances/_base/b',
                          extensions=_ext(qh.EXT_BACKING_FORMAT, b'raw'),
                          cluster_bits=12)
        for offset, value in mutations:
            data[offset] = value
        reads = []
        try:
            header = qh.parse(_reader(data, reads))
        except qh.InvalidHeader:
            header = None
        cluster = 1 << max(qh.MIN_CLUSTER_BITS,
                           min(qh.MAX_CLUSTER_BITS, data[23]))
        for offset, length in reads[1:]:
            self.assertLessEqual(offset + length, cluster)
        if header is not None:
            self.assertIn(header.version, (2, 3))
            if header.backing_name is not None:
                self.assertLessEqual(len(header.backing_name.encode()),
                                     qh.MAX_BACKING_NAME)
