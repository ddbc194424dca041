"""A real ``snapworker-worker`` process, for the tests, demo and benchmarks.

Started by its console script, in its own session (so SIGTERM reaches the
oslo.service parent and its forked child together), and considered up
once it logs that its RPC server listens: a cast sent before that would
go to a queue nobody declared yet, and RabbitMQ would drop it.
"""

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

BIN = os.path.dirname(sys.executable)
READY_LINE = 'snapworker listening'


def write_config(path, *, host, services, instances_path, scratch_dir,
                 glance_url=None, extra=None, journal_dir=None):
    """A worker config for the local services (``services.json`` dict).

    :param glance_url: the Glance to use; the trusted-headers one of the
        services by default.
    :param journal_dir: ``journal`` beside ``scratch_dir`` by default.
    :param extra: ``{'group.option': value}`` (no group: DEFAULT).
    """
    text = textwrap.dedent(f"""\
        [DEFAULT]
        host = {host}
        debug = True
        instances_path = {instances_path}
        scratch_dir = {scratch_dir}
        libvirt_uri = {services['libvirt_uri']}
        transport_url = {services['transport_url']}
        graceful_shutdown_timeout = 60
        [worker]
        progress_interval = 0.2
        block_device_prefixes = /dev/loop
        journal_dir = {journal_dir or os.path.join(
            os.path.dirname(scratch_dir), 'journal')}
        [glance]
        auth_strategy = noauth
        endpoint_override = {glance_url or services['glance_url']}
        """)
    ceph = services.get('ceph')
    if ceph:
        text += textwrap.dedent(f"""\
            [rbd]
            ceph_conf = {ceph['conf_path']}
            user = {ceph['client_user']}
            keyring = {ceph['client_keyring']}
            """)
    for key, value in (extra or {}).items():
        group, _, name = key.rpartition('.')
        text += f'[{group or "DEFAULT"}]\n{name} = {value}\n'
    with open(path, 'w') as f:
        f.write(text)


def process_tree(pid):
    """``pid`` and its live descendants.

    Children are listed per thread, and libnbd starts qemu-nbd from a
    worker thread, so every task's ``children`` file is read.
    """
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for children in glob.glob(f'/proc/{current}/task/*/children'):
            try:
                with open(children) as f:
                    todo += [int(child) for child in f.read().split()]
            except OSError:
                continue
    return found


def peak_rss(pid):
    """Largest VmHWM (peak resident memory) in a process tree, in bytes."""
    peak = 0
    for member in process_tree(pid):
        try:
            with open(f'/proc/{member}/status') as f:
                for line in f:
                    if line.startswith('VmHWM:'):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            continue
    return peak


class WorkerProcess:

    def __init__(self, conf_path, log_path):
        self.conf_path = conf_path
        self.log_path = log_path
        self.proc = None

    def start(self, timeout=60):
        with open(self.log_path, 'ab') as out:
            self.proc = subprocess.Popen(
                [os.path.join(BIN, 'snapworker-worker'),
                 '--config-file', self.conf_path],
                stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, errors='replace') as f:
                if READY_LINE in f.read():
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f'snapworker-worker did not start:\n'
                           f'{self.log_tail()}')

    def log_tail(self, lines=60):
        with open(self.log_path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])

    def peak_rss(self):
        return peak_rss(self.proc.pid)

    def stop(self, timeout=60):
        """SIGTERM the worker's process group; return its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc and self.proc.returncode
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()
