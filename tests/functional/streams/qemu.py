"""Run the real qemu tools for the stream tests, in a private temp dir."""

import json
import os
import shutil
import subprocess
import tempfile

import testtools
from oslo_utils import units

from snapworker.streams import nbd
from snapworker.streams import qcow2
from snapworker.streams import raw

MiB = units.Mi


def run(*argv):
    """Run a command, return stdout; fail the test with stderr on error."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError('%s failed (%d): %s%s' % (
            ' '.join(argv), proc.returncode, proc.stdout, proc.stderr))
    return proc.stdout


def child_qemu_nbd(parent=None):
    """PIDs of qemu-nbd children of ``parent`` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    proc = subprocess.run(['pgrep', '-x', '-P', str(parent), 'qemu-nbd'],
                          capture_output=True, text=True)
    return [int(pid) for pid in proc.stdout.split()]


class QemuTestCase(testtools.TestCase):
    """A temp dir, image builders and the checks every output must pass."""

    def setUp(self):
        super().setUp()
        for tool in ('qemu-img', 'qemu-io', 'qemu-nbd'):
            if not shutil.which(tool):
                self.skipTest('%s is not installed' % tool)
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.addCleanup(self.assert_no_qemu_nbd)

    def assert_no_qemu_nbd(self):
        self.assertEqual([], child_qemu_nbd())

    def path(self, name):
        return os.path.join(self.dir, name)

    def create(self, name, fmt, size, backing=None, options=()):
        """qemu-img create; ``backing`` is ``(path, fmt)`` like Nova's."""
        argv = ['qemu-img', 'create', '-q', '-f', fmt]
        if backing:
            argv += ['-b', backing[0], '-F', backing[1]]
        for option in options:
            argv += ['-o', option]
        run(*argv, self.path(name), str(size))
        return self.path(name)

    def io(self, path, fmt, *commands):
        """Apply qemu-io commands (``write -P 1 0 64k``, ``discard ...``)."""
        argv = ['qemu-io', '-f', fmt]
        for command in commands:
            argv += ['-c', command]
        run(*argv, path)

    def info(self, path):
        return json.loads(run('qemu-img', 'info', '--output=json', path))

    def nonzero_bytes(self, path, fmt):
        """Bytes of the flattened chain that qemu does not know are zero."""
        entries = json.loads(run('qemu-img', 'map', '--output=json', '-f',
                                 fmt, path))
        return sum(e['length'] for e in entries if not e['zero'])

    def write_stream(self, stream, name):
        out = self.path(name)
        with stream, open(out, 'wb') as f:
            expected = stream.size
            shutil.copyfileobj(stream, f, MiB)
        self.assertEqual(expected, os.path.getsize(out))
        return out

    def assert_same(self, source, fmt, output, out_fmt):
        run('qemu-img', 'compare', '-f', fmt, '-F', out_fmt, source, output)

    def assert_standalone_qcow2(self, output):
        """Clean check, no backing file, and what Glance would accept."""
        check = json.loads(run('qemu-img', 'check', '--output=json', output))
        self.assertEqual(0, check.get('leaks', 0), check)
        self.assertEqual(0, check.get('corruptions', 0), check)
        info = self.info(output)
        self.assertEqual('qcow2', info['format'])
        self.assertNotIn('backing-filename', info)
        self.assertNotIn('full-backing-filename', info)
        self.assertEqual('1.1', info['format-specific']['data']['compat'])
        self.assert_glance_accepts(output)

    def assert_glance_accepts(self, output):
        from oslo_utils.imageutils import format_inspector
        inspector = format_inspector.detect_file_format(output)
        self.assertEqual('qcow2', str(inspector))
        inspector.safety_check()

    def drop_cache(self):
        """Evict the test's files from the page cache.

        ext4 reports the unwritten extents that ``write -z`` leaves in a
        raw file as holes only while none of their pages is cached; a
        previous read's readahead can turn them into "data" (correctly
        reading as zeros, but read).  Evicting makes the map repeatable.
        """
        for name in os.listdir(self.dir):
            fd = os.open(self.path(name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def stream_and_verify(self, top, fmt, qcow2_cluster_size=65536):
        """Both encoders over the NBD view: identical, read honestly.

        Each encoder must read exactly the bytes the chain does not know
        to be zero (per ``qemu-img map``), i.e. every data byte once and
        never a hole.
        """
        self.drop_cache()
        expected_read = self.nonzero_bytes(top, fmt)
        view = nbd.NbdChainView(nbd.qemu_nbd_argv(top, fmt))
        out = self.write_stream(raw.RawStream(view), 'out.raw')
        self.assert_same(top, fmt, out, 'raw')
        self.assertEqual(expected_read, view.bytes_read)
        self.drop_cache()
        view = nbd.NbdChainView(nbd.qemu_nbd_argv(top, fmt))
        out = self.write_stream(
            qcow2.Qcow2Stream(view, cluster_size=qcow2_cluster_size),
            'out.qcow2')
        self.assert_same(top, fmt, out, 'qcow2')
        self.assert_standalone_qcow2(out)
        self.assertEqual(expected_read, view.bytes_read)
