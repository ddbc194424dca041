"""What the benchmarks stand on: services, a worker, disks, meters.

The benchmarks import nothing from ``tests``: the services are started
the way an operator would start them, by running ``python -m
tests.services up`` as a program and reading the ``services.json`` it
writes, and everything else (the worker process, disks, domains, the
measuring) is here. Nothing of snapworker is imported at module level, so
a child process that plays nova-compute can import this too.
"""

import contextlib
import glob
import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MiB = 1024 * 1024
GiB = 1024 * MiB
READY_LINE = 'snapworker listening'


def log(message):
    """Progress goes to stderr so stdout carries only the results."""
    print(message, file=sys.stderr, flush=True)


def run(*argv):
    subprocess.run(argv, check=True, capture_output=True)


# -- services -----------------------------------------------------------------

@contextlib.contextmanager
def services(state_dir, with_ceph=False, extra_args=()):
    """``python -m tests.services up`` ... ``down``; yields services.json.

    :param extra_args: more ``up`` options (``--glance-rbd-thin``, ...).
    """
    argv = [sys.executable, '-m', 'tests.services', 'up', '--state-dir',
            state_dir]
    if with_ceph:
        argv.append('--with-ceph')
    argv += list(extra_args)
    try:
        subprocess.run(argv, check=True, cwd=REPO, stdout=sys.stderr)
        with open(os.path.join(state_dir, 'services.json')) as f:
            yield json.load(f)
    finally:
        subprocess.run([sys.executable, '-m', 'tests.services', 'down',
                        '--state-dir', state_dir], cwd=REPO,
                       stdout=sys.stderr)


def glance_client(url):
    """glanceclient for the unauthenticated Glance (every request admin;
    glanceclient still wants some token)."""
    import glanceclient
    return glanceclient.Client('2', endpoint=url, token='unused')


# -- the worker ---------------------------------------------------------------

def write_worker_config(path, *, host, state, instances_path, scratch_dir,
                        glance_url, extra=None):
    """A worker config for the services of ``state`` (services.json).

    :param extra: ``{'group.option': value}`` (no group: DEFAULT).
    """
    text = textwrap.dedent(f"""\
        [DEFAULT]
        host = {host}
        debug = False
        instances_path = {instances_path}
        scratch_dir = {scratch_dir}
        libvirt_uri = {state['libvirt_uri']}
        transport_url = {state['transport_url']}
        [worker]
        progress_interval = 1
        journal_dir = {os.path.join(os.path.dirname(scratch_dir),
                                    'journal')}
        [glance]
        auth_strategy = noauth
        endpoint_override = {glance_url}
        """)
    ceph = state.get('ceph')
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


class WorkerProcess:
    """``snapworker-worker`` in a session of its own; up once it listens."""

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
        raise RuntimeError(f'snapworker-worker did not start; see '
                           f'{self.log_path}')

    def peak_rss(self):
        return peak_rss(self.proc.pid)

    def stop(self, timeout=60):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# -- process trees ------------------------------------------------------------

def process_tree(pid):
    """``pid`` and its live descendants (every thread's children)."""
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


def reset_peak_rss(pid):
    """Reset VmHWM of a process tree to its current RSS."""
    for member in process_tree(pid):
        try:
            with open(f'/proc/{member}/clear_refs', 'w') as f:
                f.write('5\n')
        except OSError:
            pass


def _proc_field(path, field):
    with open(path) as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def tree_io(pid):
    """(read, written) storage bytes of a process tree so far
    (``/proc/PID/io``; reaped children count in their parent)."""
    read = written = 0
    for member in process_tree(pid):
        try:
            read += _proc_field(f'/proc/{member}/io', 'read_bytes:')
            written += _proc_field(f'/proc/{member}/io', 'write_bytes:')
        except OSError:
            continue
    return read, written


def tree_cpu(pid):
    """CPU seconds of a process tree so far, reaped children included."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f'/proc/{member}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        total += sum(int(ticks) for ticks in fields[11:15])
    return total / os.sysconf('SC_CLK_TCK')


class PeakSampler:
    """The largest value of ``sample()`` while the ``with`` block runs."""

    def __init__(self, sample, interval=0.05):
        self._sample = sample
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.peak = 0

    def _take(self):
        try:
            self.peak = max(self.peak, self._sample())
        except OSError:
            pass

    def _loop(self):
        while not self._stop.wait(self._interval):
            self._take()

    def __enter__(self):
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._take()


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def tree_allocated(top):
    """Bytes allocated by the files under ``top`` (0 if it is absent)."""
    total = 0
    for root, _dirs, files in os.walk(top):
        for name in files:
            try:
                total += allocated_bytes(os.path.join(root, name))
            except OSError:
                pass
    return total


def host():
    """The machine the numbers were measured on: CPUs, memory, kernel."""
    with open('/proc/cpuinfo') as f:
        model = next((line.split(':', 1)[1].strip() for line in f
                      if line.startswith('model name')), 'unknown')
    with open('/proc/meminfo') as f:
        mem_kib = int(f.readline().split()[1])
    return {'cpus': os.cpu_count(), 'cpu_model': model,
            'memory_gib': round(mem_kib / 1024 / 1024, 1),
            'kernel': platform.release()}


def loadavg():
    with open('/proc/loadavg') as f:
        return float(f.read().split()[0])


# -- page cache ---------------------------------------------------------------

def cached_bytes(paths):
    """Bytes of ``paths`` in the page cache now (``fincore``)."""
    total = 0
    for path in paths:
        out = subprocess.run(['fincore', '--bytes', '--noheadings',
                              '--output', 'RES', path],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            total += int(out.stdout.split()[0])
    return total


# -- disks and domains --------------------------------------------------------

class Disk:
    """An instance's root disk, its files and the domain pointing at it."""

    def __init__(self, path, fmt, files, data_bytes):
        self.path = path
        self.fmt = fmt
        self.files = files
        self.data_bytes = data_bytes
        self.instance_uuid = None


def nova_overlay(instances, virtual_size, data_bytes):
    """Nova's default disk: a qcow2 overlay on a raw ``_base``.

    Half the data in the base (from offset 0), half written by the guest
    in the overlay (at a quarter of the disk, plus an overwrite of base
    data); the rest of the virtual size was never written. The same
    ``data_bytes`` at the same offsets for every ``virtual_size`` (data
    placed within the first 4 GiB), so two sizes compare on data alone.
    Patterns, not random bytes: nothing on any path compresses.
    """
    half = data_bytes // 2
    base = os.path.join(instances, '_base', uuid.uuid4().hex)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    run('qemu-img', 'create', '-q', '-f', 'raw', base, str(virtual_size))
    run('qemu-io', '-f', 'raw', '-c', f'write -P 33 0 {half}', base)
    path = os.path.join(instances, str(uuid.uuid4()), 'disk')
    os.makedirs(os.path.dirname(path))
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw',
        path, str(virtual_size))
    at = min(virtual_size // 4, 2 * GiB)
    run('qemu-io', '-f', 'qcow2',
        '-c', f'write -P 34 {half // 4} {half // 4}',
        '-c', f'write -P 35 {at} {half}', path)
    return Disk(path, 'qcow2', [path, base], data_bytes)


def raw_disk(instances, virtual_size, data_bytes):
    """A sparse raw disk with ``data_bytes`` written from offset 0."""
    path = os.path.join(instances, str(uuid.uuid4()), 'disk')
    os.makedirs(os.path.dirname(path))
    run('qemu-img', 'create', '-q', '-f', 'raw', path, str(virtual_size))
    run('qemu-io', '-f', 'raw', '-c', f'write -P 49 0 {data_bytes}', path)
    return Disk(path, 'raw', [path], data_bytes)


def define_domain(conn, disk, project_id, user_id='bench-user'):
    """A shut-off domain named like Nova's, with ``disk`` as root disk and
    Nova's owner metadata. ``conn`` must stay open (libvirt's test driver
    forgets its domains when its last connection closes)."""
    disk.instance_uuid = str(uuid.uuid4())
    metadata = (f"<metadata><nova:instance xmlns:nova="
                f"'http://openstack.org/xmlns/libvirt/nova/1.1'>"
                f"<nova:owner><nova:user uuid='{user_id}'>u</nova:user>"
                f"<nova:project uuid='{project_id}'>p</nova:project>"
                f"</nova:owner></nova:instance></metadata>")
    conn.defineXML(
        f"<domain type='test'><name>instance-{disk.instance_uuid[:8]}</name>"
        f"<uuid>{disk.instance_uuid}</uuid><memory>65536</memory>"
        f"{metadata}<os><type>hvm</type></os><devices>"
        f"<disk type='file' device='disk'>"
        f"<driver name='qemu' type='{disk.fmt}'/>"
        f"<source file='{disk.path}'/><target dev='vda' bus='virtio'/>"
        f"</disk></devices></domain>")
    return disk.instance_uuid


def remove_disk(disk):
    for path in disk.files:
        with contextlib.suppress(OSError):
            os.unlink(path)
