"""Checking and pinning a disk's chain, on real files made with qemu-img.

Every test is an attack a hostile guest (through its raw disk's bytes) or
a swapped host file could make; each asserts what is read, or that the
refusal came before anything outside the instances path was opened.
"""

import json
import os
import socket
import struct
import subprocess

import fixtures
import testtools
from oslo_utils import units

from snapworker import exception
from snapworker.sources import chain
from snapworker.sources import qcow2_header

MiB = units.Mi


def qemu_img(*args):
    return subprocess.run(['qemu-img', *args], check=True,
                          capture_output=True, text=True).stdout


def qemu_io(fmt, path, command):
    subprocess.run(['qemu-io', '-f', fmt, '-c', command, path], check=True,
                   capture_output=True)


class ChainTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.Timeout(30, gentle=True))
        self.root = self.useFixture(fixtures.TempDir()).path
        self.instances = os.path.join(self.root, 'instances')
        self.outside = os.path.join(self.root, 'outside')
        os.makedirs(os.path.join(self.instances, '_base'))
        os.makedirs(self.outside)

    def _open(self, path, fmt):
        pinned = chain.open_file_chain(path, fmt, self.instances)
        self.addCleanup(pinned.close)
        return pinned

    def _overlay(self, name, backing, backing_fmt='raw', size='4M'):
        path = os.path.join(self.instances, name)
        qemu_img('create', '-q', '-f', 'qcow2', '-u', '-b', backing, '-F',
                 backing_fmt or 'raw', path, size)
        if backing_fmt is None:
            # qemu-img 7 no longer writes one; older ones did, and a
            # crafted file can leave it out: rename the extension.
            with open(path, 'r+b') as f:
                data = f.read(65536)
                f.seek(data.index(struct.pack(
                    '>I', qcow2_header.EXT_BACKING_FORMAT)))
                f.write(struct.pack('>I', 0x12345678))
        return path

    def _raw(self, name, size=4 * MiB, where=None, fill=b''):
        path = os.path.join(where or self.instances, name)
        with open(path, 'wb') as f:
            f.write(fill)
            f.truncate(size)
        return path

    # -- the format is given, never guessed -----------------------------------

    def test_raw_disk_holding_a_qcow2_header_is_read_as_raw(self):
        victim = self._raw('victim', fill=b'other tenant' * 100)
        header_disk = self._overlay('hdr', victim)
        with open(header_disk, 'rb') as f:
            header = f.read(1 * MiB)
        disk = self._raw('disk', size=4 * MiB, fill=header)
        pinned = self._open(disk, 'raw')
        self.assertEqual(1, len(pinned.layers))
        self.assertEqual(('raw', 4 * MiB), (pinned.format,
                                             pinned.virtual_size))
        self.assertTrue(pinned.self_contained)

    def test_qcow2_named_by_the_domain_must_be_qcow2(self):
        disk = self._raw('disk')
        error = self.assertRaises(exception.UnsupportedDisk, self._open,
                                  disk, 'qcow2')
        self.assertIn('no qcow2 magic', str(error))

    def test_format_missing_or_unreadable(self):
        disk = self._raw('disk')
        self.assertIn('does not name its format', str(self.assertRaises(
            exception.UnsupportedDisk, self._open, disk, None)))
        self.assertIn("format 'vmdk'", str(self.assertRaises(
            exception.UnsupportedDisk, self._open, disk, 'vmdk')))

    def test_backing_file_without_format_is_refused(self):
        base = self._raw('base', where=os.path.join(self.instances, '_base'))
        top = self._overlay('top', base, backing_fmt=None)
        self.assertIn('refusing to guess', str(self.assertRaises(
            exception.UnsupportedDisk, self._open, top, 'qcow2')))

    # -- checked before opened ------------------------------------------------

    def test_backing_file_outside_is_refused_before_it_is_opened(self):
        # A FIFO outside: opening it for reading would block forever.
        fifo = os.path.join(self.outside, 'fifo')
        os.mkfifo(fifo)
        top = self._overlay('top', fifo)
        self.assertRaises(exception.DiskOutsideInstancesPath, self._open,
                          top, 'qcow2')

    def test_fifo_inside_is_refused_without_blocking(self):
        fifo = os.path.join(self.instances, '_base', 'fifo')
        os.mkfifo(fifo)
        top = self._overlay('top', fifo)
        self.assertIn('not a regular file', str(self.assertRaises(
            exception.UnsupportedDisk, self._open, top, 'qcow2')))

    def test_protocols_and_json_specs_are_refused_unopened(self):
        listener = socket.create_server(('127.0.0.1', 0))
        self.addCleanup(listener.close)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        for spec in (f'nbd://127.0.0.1:{port}/x', f'nbd:127.0.0.1:{port}',
                     f'http://127.0.0.1:{port}/x',
                     'json:{"driver":"file","filename":"/etc/shadow"}',
                     'file:/etc/shadow'):
            top = self._overlay('top', spec)
            self.assertIn('not a local file', str(self.assertRaises(
                exception.UnsupportedDisk, self._open, top, 'qcow2')))
            os.unlink(top)
        self.assertRaises(TimeoutError, listener.accept)

    def test_symlink_to_outside_is_refused(self):
        secret = self._raw('secret', where=self.outside, fill=b'secret')
        link = os.path.join(self.instances, 'disk')
        os.symlink(secret, link)
        self.assertRaises(exception.DiskOutsideInstancesPath, self._open,
                          link, 'raw')

    def test_loops_and_depth_are_bounded(self):
        a = os.path.join(self.instances, 'a')
        b = self._overlay('b', a, backing_fmt='qcow2')
        self._overlay('a', b, backing_fmt='qcow2')
        self.assertIn('loops', str(self.assertRaises(
            exception.UnsupportedDisk, self._open, a, 'qcow2')))
        lower = self._raw('l0')
        for i in range(1, chain.MAX_CHAIN_DEPTH + 1):
            lower = self._overlay(f'l{i}', lower,
                                  backing_fmt='raw' if i == 1 else 'qcow2')
        self.assertIn('deeper than', str(self.assertRaises(
            exception.UnsupportedDisk, self._open, lower, 'qcow2')))

    def test_relative_backing_name_resolves_beside_its_parent(self):
        base = self._raw('base', where=os.path.join(self.instances, '_base'))
        top = self._overlay('top', '_base/base')
        pinned = self._open(top, 'qcow2')
        self.assertEqual((os.path.realpath(base),), pinned.backing_paths)

    # -- pinned: what is read is what was checked -----------------------------

    def test_swapped_names_change_nothing_that_is_read(self):
        base = self._raw('base', where=os.path.join(self.instances, '_base'),
                         fill=b'B' * MiB)
        top = self._overlay('top', base)
        qemu_io('qcow2', top, 'write -P 0x54 1M 1M')
        expected = os.path.join(self.root, 'expected.raw')
        qemu_img('convert', '-f', 'qcow2', '-O', 'raw', top, expected)
        pinned = self._open(top, 'qcow2')
        # Both names now point at other files, one of them outside.
        secret = self._raw('secret', where=self.outside, fill=b'S' * MiB)
        os.rename(base, base + '.old')
        os.symlink(secret, base)
        os.rename(top, top + '.old')
        self._raw('top', fill=b'X' * MiB)
        got = os.path.join(self.root, 'got.raw')
        qemu_img('convert', '-O', 'raw', pinned.qemu_spec(), got)
        qemu_img('compare', '-f', 'raw', '-F', 'raw', expected, got)
        with open(pinned.top.proc_path, 'rb') as f:
            self.assertEqual(b'QFI\xfb', f.read(4))
        # And the end-of-read check notices the renames (change time).
        self.assertRaises(exception.SourceChanged, pinned.verify_unchanged)

    def test_spec_names_every_node_and_no_backing_below(self):
        base = self._raw('base')
        mid = self._overlay('mid', base)
        top = self._overlay('top', mid, backing_fmt='qcow2')
        pinned = self._open(top, 'qcow2')
        spec = json.loads(pinned.qemu_spec()[len('json:'):])
        self.assertEqual('qcow2', spec['driver'])
        self.assertEqual('qcow2', spec['backing']['driver'])
        self.assertEqual('raw', spec['backing']['backing']['driver'])
        self.assertNotIn('backing', spec['backing']['backing'])
        files = [spec['file'], spec['backing']['file'],
                 spec['backing']['backing']['file']]
        self.assertEqual([layer.proc_path for layer in pinned.layers],
                         [f['filename'] for f in files])

    def test_truncated_or_rewritten_file_is_noticed(self):
        disk = self._raw('disk', fill=b'D' * MiB)
        pinned = self._open(disk, 'raw')
        os.truncate(disk, MiB)
        error = self.assertRaises(exception.SourceChanged,
                                  pinned.verify_unchanged)
        self.assertIn('size', str(error))

    def test_header_parse_errors_name_the_file(self):
        disk = self._raw('disk', fill=qcow2_header.MAGIC + b'\0\0\0\x09')
        error = self.assertRaises(exception.UnsupportedDisk, self._open,
                                  disk, 'qcow2')
        self.assertIn('version 9', str(error))


class BlockDeviceTestCase(testtools.TestCase):

    def test_device_outside_the_prefixes_is_refused(self):
        for path, prefixes in (('/dev/sda', ['/dev/nova-vg/']),
                               ('/dev/nova-vg/../sda', ['/dev/nova-vg/']),
                               ('/dev/loop0', [])):
            self.assertIn('block_device_prefixes', str(self.assertRaises(
                exception.UnsupportedDisk, chain.open_block_device, path,
                prefixes)))

    def test_regular_file_under_a_prefix_is_not_a_device(self):
        root = self.useFixture(fixtures.TempDir()).path
        path = os.path.join(root, 'disk')
        open(path, 'wb').close()
        self.assertIn('not a block device', str(self.assertRaises(
            exception.UnsupportedDisk, chain.open_block_device, path,
            [root + '/'])))
