"""qemu-nbd must never outlive the view: close, errors, signals."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import nbd as libnbd
from oslo_utils import units

from snapworker.streams import nbd
from snapworker.streams import qcow2
from snapworker.streams import raw
from tests.functional.streams import qemu

MiB = units.Mi
HOLDER = '''
import sys
from snapworker.streams.nbd import NbdChainView, qemu_nbd_argv
view = NbdChainView(qemu_nbd_argv(sys.argv[1], 'qcow2'))
view.pread(0, 4096)
print('ready', flush=True)
sys.stdin.read()
'''


def process_exited(pid, timeout=10.0):
    """True once ``pid`` is gone or a zombie (waiting for its new parent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open('/proc/%d/stat' % pid) as f:
                state = f.read().rsplit(')', 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ('Z', 'X'):
            return True
        time.sleep(0.05)
    return False


class NbdLifecycleTestCase(qemu.QemuTestCase):

    def setUp(self):
        super().setUp()
        self.top = self.create('disk.qcow2', 'qcow2', 4 * MiB)
        self.io(self.top, 'qcow2', 'write -P 7 0 1M')

    def test_close_reaps_qemu_nbd(self):
        view = nbd.NbdChainView(nbd.qemu_nbd_argv(self.top, 'qcow2'))
        self.assertEqual(1, len(qemu.child_qemu_nbd()))
        self.assertEqual(b'\x07' * 10, view.pread(0, 10))
        view.close()
        view.close()
        self.assertEqual([], qemu.child_qemu_nbd())

    def test_failed_open_reaps_qemu_nbd(self):
        raw_file = self.create('plain.raw', 'raw', MiB)
        for path, fmt in ((self.path('missing.qcow2'), 'qcow2'),
                          (raw_file, 'qcow2')):
            self.assertRaises(libnbd.Error, nbd.NbdChainView,
                              nbd.qemu_nbd_argv(path, fmt))
            self.assertEqual([], qemu.child_qemu_nbd())

    def test_error_while_streaming_reaps_qemu_nbd(self):
        def fail_midway():
            view = nbd.NbdChainView(nbd.qemu_nbd_argv(self.top, 'qcow2'))
            with qcow2.Qcow2Stream(view) as s:
                s.read(MiB)
                raise RuntimeError('upload failed')

        self.assertRaises(RuntimeError, fail_midway)
        self.assertEqual([], qemu.child_qemu_nbd())

    def test_source_is_not_modified(self):
        with open(self.top, 'rb') as f:
            before = hashlib.sha256(f.read()).hexdigest()
        mtime = os.stat(self.top).st_mtime_ns
        view = nbd.NbdChainView(nbd.qemu_nbd_argv(self.top, 'qcow2'))
        with raw.RawStream(view) as stream:
            while stream.read():
                pass
        with open(self.top, 'rb') as f:
            self.assertEqual(before, hashlib.sha256(f.read()).hexdigest())
        self.assertEqual(mtime, os.stat(self.top).st_mtime_ns)

    def test_large_pread_is_split(self):
        with nbd.NbdChainView(nbd.qemu_nbd_argv(self.top, 'qcow2'),
                              request_size=4096) as view:
            self.assertEqual(b'\x07' * MiB, view.pread(0, MiB))
            self.assertEqual(MiB, view.bytes_read)

    def holder_dies_by(self, signum):
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        with subprocess.Popen([sys.executable, '-c', HOLDER, self.top],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env) as holder:
            try:
                self.assertEqual(b'ready\n', holder.stdout.readline())
                servers = qemu.child_qemu_nbd(holder.pid)
                self.assertEqual(1, len(servers))
                holder.send_signal(signum)
                self.assertEqual(-signum, holder.wait())
            finally:
                holder.kill()
        self.assertTrue(process_exited(servers[0]),
                        'qemu-nbd %d survived the worker' % servers[0])

    def test_worker_sigterm_does_not_leak_qemu_nbd(self):
        self.holder_dies_by(signal.SIGTERM)

    def test_worker_sigkill_does_not_leak_qemu_nbd(self):
        self.holder_dies_by(signal.SIGKILL)
