#!/usr/bin/env python3
"""Nova's own cold snapshot against snapworker, end to end, into one Glance.

The claim snapworker makes is "as fast as the upload allows, with no scratch
copy". This benchmark checks it against the baseline in the shared notes
(nova-baseline.md) by running, for each of its four cases (1 GiB virtual by
default)::

  1  qcow2, 3/4 allocated, no backing file    -> qcow2
  2  Nova's default: qcow2 overlay on a raw _base, 5/8 flattened -> qcow2
  3  raw, 3/4 allocated                        -> raw (uploads every byte)
  4  the same raw disk with snapshot_image_format = qcow2 -> qcow2

three contenders, each with the page cache dropped first:

  nova        Nova 34's real, unmodified ``LibvirtDriver.snapshot()`` cold
              path (shut-off domain on libvirtd's test driver), in a child
              process that plays nova-compute. ``qemu-img convert`` into
              ``[libvirt] snapshots_directory``, then the upload of the copy.
  snapworker  a real ``snapworker-worker`` process and an RPC cast, timed
              from the cast to ``snapshot.create.end``.
  bound       python-glanceclient uploading the very bytes Nova produced
              straight from a file: no reading or encoding of the source
              at all, so nothing that uploads through this Glance beats it.

All three upload to the same Glance (the unauthenticated pipeline, which is
the only one Nova's image API can talk to without Keystone), so Glance's
own ingest cost is common to all of them. Every image is downloaded and
checked with ``qemu-img compare`` against the source disk (the bound's by
its sha512 against Nova's verified image); a run whose image differs is a
failure, never a number.

Run as root (to drop the page cache and to read other processes' /proc io
and memory counters), from the repository root, with the services that
``tools/setup-env`` installs::

    .venv/bin/python benchmarks/snapshot_vs_nova.py [--repeat 3] \\
        [--size 1G] [--json out.json] [--keep]

``--size 128M`` is a smoke run (well under a minute). The default run takes
about five minutes on 2 cores.
"""

import argparse
import dataclasses
import glob
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Imports nothing of snapworker: safe in the nova-compute child too.
import benchkit  # noqa: E402
import pagecache  # noqa: E402  (this folder is sys.path[0])
from benchkit import PeakSampler  # noqa: E402
from benchkit import allocated_bytes  # noqa: E402
from benchkit import loadavg  # noqa: E402
from benchkit import log  # noqa: E402
from benchkit import reset_peak_rss  # noqa: E402
from benchkit import run  # noqa: E402
from benchkit import tree_allocated  # noqa: E402
from benchkit import tree_cpu  # noqa: E402
from benchkit import tree_io  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
BIN = os.path.dirname(sys.executable)
HOST = 'bench-compute'
# The identity the snapshots are taken for; the unauthenticated Glance
# ignores it, but Nova refuses to call Glance without a token.
USER_ID = '0c2b5f1d8e9a4c7b9e3d6a2f1b8c5e70'
PROJECT_ID = '6f1e9a3c0b7d4e2a9c5b8d1f0e3a7c24'
TOKEN = 'benchmark'
RUN_TIMEOUT = 600


@dataclasses.dataclass(frozen=True)
class Case:
    """One baseline case: which disk, which format Nova is told to write."""

    name: str
    title: str
    disk: str
    snapshot_image_format: str | None


CASES = (
    Case('qcow2', 'qcow2, 3/4 allocated, no backing -> qcow2', 'qcow2', None),
    Case('overlay', "Nova default: qcow2 overlay on raw _base, 5/8 "
         "flattened -> qcow2", 'overlay', None),
    Case('raw', 'raw, 3/4 allocated -> raw (uploads the whole disk)', 'raw',
         None),
    Case('raw-qcow2', 'raw -> qcow2 (snapshot_image_format = qcow2)', 'raw',
         'qcow2'),
)


# -- disks --------------------------------------------------------------------

@dataclasses.dataclass
class Disk:
    """An instance's root disk and the domain that points at it."""

    path: str
    fmt: str
    files: list
    instance_uuid: str = ''


def _writes(pattern_ranges, size):
    """qemu-io ``write -P`` commands for (pattern, start, end) in 1/8ths.

    Patterns rather than random data: nothing on either path compresses
    or deduplicates, and patterns make the disks quick to build.
    """
    args = []
    for pattern, start, end in pattern_ranges:
        args += ['-c', 'write -P %d %d %d' % (
            pattern, start * size // 8, (end - start) * size // 8)]
    return args


def _new_disk_path(instances):
    path = os.path.join(instances, str(uuid.uuid4()), 'disk')
    os.makedirs(os.path.dirname(path))
    return path


def make_qcow2(instances, size):
    """Self-contained qcow2 with 3/8 + 3/8 of the disk written."""
    path = _new_disk_path(instances)
    run('qemu-img', 'create', '-q', '-f', 'qcow2', path, str(size))
    run('qemu-io', '-f', 'qcow2', *_writes([(0x11, 0, 3), (0x12, 4, 7)],
                                           size), path)
    return Disk(path, 'qcow2', [path])


def make_overlay(instances, size):
    """Nova's default backend: a raw ``_base`` (1/2 data) and an overlay.

    The overlay rewrites 1/16 of the base and adds 1/8 beyond it, as a
    guest would, so the flattened image holds 5/8 of the virtual size.
    """
    base = os.path.join(instances, '_base', uuid.uuid4().hex)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    run('qemu-img', 'create', '-q', '-f', 'raw', base, str(size))
    run('qemu-io', '-f', 'raw', *_writes([(0x21, 0, 4)], size), base)
    path = _new_disk_path(instances)
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw',
        path, str(size))
    run('qemu-io', '-f', 'qcow2',
        '-c', 'write -P 34 %d %d' % (size // 8, size // 16),
        *_writes([(0x23, 5, 6)], size), path)
    return Disk(path, 'qcow2', [path, base])


def make_raw(instances, size):
    """Sparse raw file with 3/8 + 3/8 of the disk written."""
    path = _new_disk_path(instances)
    run('qemu-img', 'create', '-q', '-f', 'raw', path, str(size))
    run('qemu-io', '-f', 'raw', *_writes([(0x31, 0, 3), (0x32, 4, 7)],
                                         size), path)
    return Disk(path, 'raw', [path])


DISK_MAKERS = {'qcow2': make_qcow2, 'overlay': make_overlay,
               'raw': make_raw}


def define_domain(conn, disk):
    """A shut-off domain named like Nova's, with ``disk`` as its root disk.

    ``conn`` must stay open: libvirt's test driver forgets its domains when
    the last connection closes.
    """
    disk.instance_uuid = str(uuid.uuid4())
    conn.defineXML(
        f"<domain type='test'><name>instance-{disk.instance_uuid[:8]}</name>"
        f"<uuid>{disk.instance_uuid}</uuid><memory>65536</memory>"
        f"<os><type>hvm</type></os><devices>"
        f"<disk type='file' device='disk'>"
        f"<driver name='qemu' type='{disk.fmt}'/>"
        f"<source file='{disk.path}'/><target dev='vda' bus='virtio'/>"
        f"</disk></devices></domain>")


# -- measuring ----------------------------------------------------------------


class CpuMeter:
    """CPU seconds used by named process trees while the block runs.

    ``None`` as a pid means this process alone (the bound's uploader,
    whose tree also holds the idle worker and nova-compute child).
    """

    def __init__(self, **pids):
        self._pids = pids
        self.seconds = {}

    def _now(self):
        return {name: time.process_time() if pid is None else tree_cpu(pid)
                for name, pid in self._pids.items()}

    def __enter__(self):
        self._before = self._now()
        return self

    def __exit__(self, *exc):
        after = self._now()
        self.seconds = {name: round(after[name] - self._before[name], 2)
                        for name in after}


# -- Nova's side: a child process that plays nova-compute ---------------------

def nova_child_main(conf_path):
    """Serve snapshot requests (JSON lines on stdin) with Nova's driver.

    A separate process because Nova and snapworker both register options
    on oslo.config's global CONF (``[DEFAULT] host`` among them), and
    because nova-compute is one. It lives for the whole benchmark, like
    nova-compute, so Nova's 3-4 s of imports are paid once. Nova's logging
    and anything else printed go to stderr; replies go to the original
    stdout only.
    """
    import nova.monkey_patch
    nova.monkey_patch.patch()
    from nova import config
    config.parse_args(['nova-compute', '--config-file', conf_path],
                      configure_db=False, init_rpc=False)
    from nova import objects
    from nova.virt import virtapi
    from nova.virt.libvirt import driver as libvirt_driver

    replies = os.fdopen(os.dup(1), 'w')
    os.dup2(2, 1)
    objects.register_all()
    driver = libvirt_driver.LibvirtDriver(virtapi.VirtAPI(), read_only=False)
    replies.write(json.dumps({'ready': True}) + '\n')
    replies.flush()
    for line in sys.stdin:
        result = nova_snapshot(driver, json.loads(line))
        replies.write(json.dumps(result) + '\n')
        replies.flush()


def _nova_instance(spec):
    """The Instance fields that LibvirtDriver.snapshot() reads."""
    from nova import objects
    from nova.network import model as network_model

    return objects.Instance(
        id=1, uuid=spec['instance_uuid'], project_id=PROJECT_ID,
        user_id=USER_ID, image_ref=str(uuid.uuid4()), kernel_id='',
        ramdisk_id='', os_type='linux', root_gb=1, system_metadata={},
        numa_topology=None,
        info_cache=objects.InstanceInfoCache(
            network_info=network_model.NetworkInfo()),
        pci_devices=objects.PciDeviceList(objects=[]),
        pci_requests=objects.InstancePCIRequests(requests=[]))


def _instrument(driver, marks):
    """Timestamp the phases of Nova's cold path without changing it.

    ``_resume_guest_after_snapshot`` runs right after the extract (the
    source is no longer needed); ``_image_api.update`` with data is the
    upload of the copy. Returns the patches, not yet started.
    """
    from unittest import mock

    real_resume = driver._resume_guest_after_snapshot
    real_update = driver._image_api.update

    def resume(*args, **kwargs):
        marks.setdefault('released', time.monotonic())
        return real_resume(*args, **kwargs)

    def update(context, image_id, metadata, data=None, **kwargs):
        if data is not None:
            marks['upload_begin'] = time.monotonic()
        try:
            return real_update(context, image_id, metadata, data, **kwargs)
        finally:
            if data is not None:
                marks['upload_end'] = time.monotonic()

    return [mock.patch.object(driver, '_resume_guest_after_snapshot',
                              resume),
            mock.patch.object(driver._image_api, 'update', update)]


def nova_snapshot(driver, spec):
    """One unmodified ``driver.snapshot()``; times, I/O and scratch peak."""
    import nova.conf
    from nova import context as nova_context

    conf = nova.conf.CONF
    conf.set_override('snapshot_image_format', spec['image_format'],
                      group='libvirt')
    conf.set_override('snapshots_directory', spec['snapshots_directory'],
                      group='libvirt')
    context = nova_context.RequestContext(
        user_id=USER_ID, project_id=PROJECT_ID, auth_token=TOKEN,
        roles=['admin', 'member', 'reader'], is_admin=True)
    marks = {}
    states = []

    def update_task_state(task_state, expected_state=None):
        states.append((task_state, time.monotonic()))

    patches = _instrument(driver, marks)
    for patch in patches:
        patch.start()
    result = {'error': None}
    io_before = tree_io(os.getpid())
    try:
        with PeakSampler(lambda: tree_allocated(
                spec['snapshots_directory'])) as scratch:
            begin = time.monotonic()
            driver.snapshot(context, _nova_instance(spec), spec['image_id'],
                            update_task_state)
            end = time.monotonic()
    except Exception as e:
        result['error'] = f'{type(e).__name__}: {e}'
        return result
    finally:
        for patch in patches:
            patch.stop()
    io_after = tree_io(os.getpid())
    # The third task-state update (back to image_pending_upload) is where
    # the standard path starts extracting.
    extract_begin = states[2][1] if len(states) > 2 else begin
    result.update(
        total=end - begin,
        extract=marks['released'] - extract_begin,
        upload=marks['upload_end'] - marks['upload_begin'],
        cleanup=end - marks['upload_end'],
        source_held=marks['released'] - begin,
        scratch_peak=scratch.peak,
        bytes_read=io_after[0] - io_before[0],
        bytes_written=io_after[1] - io_before[1],
        task_states=[s for s, _ in states])
    return result


class NovaCompute:
    """The parent's handle on the nova-compute child."""

    def __init__(self, work, state):
        self.conf_path = os.path.join(work, 'nova.conf')
        self.log_path = os.path.join(work, 'nova-compute.log')
        with open(self.conf_path, 'w') as f:
            f.write(textwrap.dedent(f"""\
                [DEFAULT]
                host = {HOST}
                instances_path = {work}/instances
                state_path = {work}/nova-state
                [libvirt]
                connection_uri = {state['libvirt_uri']}
                [glance]
                endpoint_override = {state['glance_noauth_url']}
                num_retries = 0
                [oslo_concurrency]
                lock_path = {work}/nova-locks
                """))
        self.proc = None

    def start(self):
        env = dict(os.environ, OS_NOVA_DISABLE_EVENTLET_PATCHING='1',
                   PYTHONPATH=REPO)
        with open(self.log_path, 'ab') as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), '--nova-child',
                 self.conf_path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log_file, text=True, env=env, start_new_session=True)
        if not self._reply(120).get('ready'):
            raise RuntimeError('nova-compute child did not start')

    def _reply(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ''
        if not line:
            raise RuntimeError(f'nova-compute child gave no answer; see '
                               f'{self.log_path}')
        return json.loads(line)

    def snapshot(self, **spec):
        self.proc.stdin.write(json.dumps(spec) + '\n')
        self.proc.stdin.flush()
        return self._reply(RUN_TIMEOUT)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# -- snapworker's side --------------------------------------------------------

class Worker:
    """A real ``snapworker-worker`` process and the RPC client to it.

    Configured like tools/demo.py, except that it uploads to the same
    unauthenticated Glance as Nova, so both pay the same ingest.
    """

    def __init__(self, work, state, host=HOST, extra=None,
                 instances_path=None):
        """:param host: the worker's host (its RPC server); one per
            worker when a benchmark runs several.
        :param extra: more options, ``{'group.option': value}``.
        :param instances_path: ``<work>/instances`` by default.
        """
        self.host = host
        conf_path = os.path.join(work, f'{host}.conf')
        self.scratch_dir = os.path.join(work, f'scratch-{host}')
        benchkit.write_worker_config(
            conf_path, host=host, state=state,
            instances_path=(instances_path
                            or os.path.join(work, 'instances')),
            scratch_dir=self.scratch_dir,
            glance_url=state['glance_noauth_url'],
            extra=dict({'debug': False}, **(extra or {})))
        self.process = benchkit.WorkerProcess(
            conf_path, os.path.join(work, f'{host}.log'))
        self.conf_path = conf_path
        self.api = None

    @property
    def proc(self):
        return self.process.proc

    def start(self):
        """Start the worker; configure this process's client likewise.

        snapworker is imported here, not at the top: the nova-compute
        child runs this same file and must not register snapworker's
        options before Nova's.
        """
        from snapworker import rpc
        from snapworker import rpcapi
        from snapworker.conf import CONF

        self.process.start()
        CONF(['--config-file', self.conf_path], project='snapworker')
        self.api = rpcapi.SnapworkerAPI(rpc.get_transport(CONF),
                                        topic=CONF.worker.topic)

    def snapshot(self, instance_uuid, image_id, target_format):
        """Cast, then follow the image's events to the end; measure it."""
        from oslo_context import context as o_context

        from snapworker import events
        from snapworker import notifications
        from snapworker.conf import CONF

        context = o_context.RequestContext(
            auth_token=TOKEN, user_id=USER_ID, project_id=PROJECT_ID,
            roles=['admin', 'member'])
        reset_peak_rss(self.proc.pid)
        io_before = tree_io(self.proc.pid)
        last = None
        with events.Subscription(CONF, image_id=image_id) as sub, \
                PeakSampler(self.process.peak_rss) as rss, \
                PeakSampler(lambda: tree_allocated(self.scratch_dir)) as sc:
            begin = time.monotonic()
            self.api.create_snapshot(context, self.host, instance_uuid,
                                     image_id, target_format=target_format)
            for event in sub.until_finished(RUN_TIMEOUT):
                last = event
            end = time.monotonic()
        io_after = tree_io(self.proc.pid)
        if last is None or last.event_type != notifications.END:
            return {'error': last.payload.get('error_message') if last
                    else 'no end event'}
        payload = last.payload
        return {
            'error': None, 'total': end - begin,
            'worker_duration': payload['duration_seconds'],
            'strategy': payload['strategy'],
            'payload_bytes_read': payload['bytes_read'],
            'bytes_uploaded': payload['bytes_uploaded'],
            'scratch_bytes': payload['scratch_bytes'],
            'scratch_peak': sc.peak,
            'source_held': payload['source_held_seconds'],
            'bytes_read': io_after[0] - io_before[0],
            'bytes_written': io_after[1] - io_before[1],
            'peak_rss': rss.peak,
            'payload': dict(payload),
        }

    def stop(self):
        self.process.stop()


# -- Glance -------------------------------------------------------------------

class Images:
    """The unauthenticated Glance both sides upload to."""

    def __init__(self, url, work):
        self.client = benchkit.glance_client(url)
        self.work = work

    def create(self, name, instance_uuid, **fields):
        """A queued image as Nova's API creates one for a snapshot."""
        return self.client.images.create(
            name=name, image_type='snapshot', instance_uuid=instance_uuid,
            user_id=USER_ID, owner=PROJECT_ID, **fields)['id']

    def download(self, image_id):
        """The image's bytes in a file, zero chunks left as holes.

        Sparse like the scratch copy qemu-img writes, so the upload bound
        reads from disk what Nova's upload read, not more.
        """
        path = os.path.join(self.work, f'{image_id}.img')
        with open(path, 'wb') as f:
            for chunk in self.client.images.data(image_id):
                if chunk.count(0) == len(chunk):
                    f.seek(len(chunk), os.SEEK_CUR)
                else:
                    f.write(chunk)
            f.truncate()
        return path

    def get(self, image_id):
        return self.client.images.get(image_id)

    def delete(self, image_id):
        try:
            self.client.images.delete(image_id)
        except Exception as e:
            log(f'could not delete image {image_id}: {e}')


def identical(source, copy):
    """``qemu-img compare``: same guest-visible content, any formats."""
    return subprocess.run(['qemu-img', 'compare', source, copy],
                          capture_output=True).returncode == 0


def verify(images, image_id, disk, fmt):
    """Download an image, check it against the source disk; return path.

    Raises RuntimeError when it is not active, has the wrong format or
    differs: such a run must not produce a number.
    """
    image = images.get(image_id)
    if image['status'] != 'active' or image['disk_format'] != fmt:
        raise RuntimeError(f'image {image_id} is {image["status"]}/'
                           f'{image["disk_format"]}, expected active/{fmt}')
    path = images.download(image_id)
    if not identical(disk.path, path):
        raise RuntimeError(f'image {image_id} differs from {disk.path}')
    return path


def upload_bound(ctx, data_path, fmt, nova_image_id, disk):
    """Upload Nova's bytes straight from a file: the floor for this Glance.

    Verified by Glance's own sha512: equal to that of Nova's image, which
    was compared with the source, means the same bytes.
    """
    images = ctx['images']
    image_id = images.create('bound', disk.instance_uuid, disk_format=fmt,
                             container_format='bare')
    try:
        pagecache.drop_cache([data_path])
        io_before = tree_io(os.getpid())
        with CpuMeter(own=None, glance=ctx['glance_pid']) as cpu, \
                open(data_path, 'rb') as f:
            begin = time.monotonic()
            images.client.images.upload(image_id, f)
            seconds = time.monotonic() - begin
        io_after = tree_io(os.getpid())
        stored = images.get(image_id)
        if stored['os_hash_value'] != images.get(
                nova_image_id)['os_hash_value']:
            raise RuntimeError(f'bound image {image_id} differs from '
                               f'Nova image {nova_image_id}')
        return {'total': seconds, 'bytes_uploaded': stored['size'],
                'bytes_read': io_after[0] - io_before[0],
                'cpu': cpu.seconds['own'],
                'glance_cpu': cpu.seconds['glance']}
    finally:
        images.delete(image_id)


# -- one run of one case ------------------------------------------------------

def target_format(case, disk):
    return case.snapshot_image_format or disk.fmt


def run_nova(ctx, case, disk):
    """Nova's cold snapshot of a cold source; verified; image id, result."""
    images, nova = ctx['images'], ctx['nova']
    fmt = target_format(case, disk)
    image_id = images.create(f'nova-{case.name}', disk.instance_uuid)
    pagecache.drop_cache(disk.files)
    with CpuMeter(own=nova.proc.pid, glance=ctx['glance_pid']) as cpu:
        result = nova.snapshot(
            instance_uuid=disk.instance_uuid, image_id=image_id,
            image_format=case.snapshot_image_format,
            snapshots_directory=os.path.join(ctx['work'], 'snapshots'))
    if result['error']:
        raise RuntimeError(f'Nova snapshot failed: {result["error"]}')
    result['cpu'] = cpu.seconds['own']
    result['glance_cpu'] = cpu.seconds['glance']
    result['bytes_uploaded'] = images.get(image_id)['size']
    result['data_path'] = verify(images, image_id, disk, fmt)
    return image_id, result


def run_snapworker(ctx, case, disk):
    """snapworker's snapshot of a cold source, verified; its result."""
    images, worker = ctx['images'], ctx['worker']
    fmt = target_format(case, disk)
    image_id = images.create(f'snapworker-{case.name}', disk.instance_uuid)
    try:
        pagecache.drop_cache(disk.files)
        with CpuMeter(own=worker.proc.pid, glance=ctx['glance_pid']) as cpu:
            result = worker.snapshot(disk.instance_uuid, image_id,
                                     case.snapshot_image_format)
        if result['error']:
            raise RuntimeError(f'snapworker failed: {result["error"]}')
        result['cpu'] = cpu.seconds['own']
        result['glance_cpu'] = cpu.seconds['glance']
        os.unlink(verify(images, image_id, disk, fmt))
        return result
    finally:
        images.delete(image_id)


def run_once(ctx, case, disk):
    """Nova, snapworker, then the bound on Nova's bytes; one result dict."""
    nova_image, nova = run_nova(ctx, case, disk)
    data_path = nova.pop('data_path')
    try:
        snapworker = run_snapworker(ctx, case, disk)
        bound = upload_bound(ctx, data_path, target_format(case, disk),
                             nova_image, disk)
    finally:
        ctx['images'].delete(nova_image)
        os.unlink(data_path)
    return {'nova': nova, 'snapworker': snapworker, 'bound': bound}


def run_case(ctx, case, disk, repeat):
    """``repeat`` runs of a case; failures are recorded, not measured."""
    runs, failures = [], []
    for index in range(repeat):
        load = loadavg()
        try:
            result = run_once(ctx, case, disk)
        except Exception as e:
            failures.append(f'run {index + 1}: {type(e).__name__}: {e}')
            log(f'  {case.name} run {index + 1}: FAILED: {e}')
            continue
        result['loadavg_before'] = load
        runs.append(result)
        log(f'  {case.name} run {index + 1} (load {load}): nova '
            f'{result["nova"]["total"]:.2f} s, snapworker '
            f'{result["snapworker"]["total"]:.2f} s, bound '
            f'{result["bound"]["total"]:.2f} s')
    return {'name': case.name, 'title': case.title,
            'source': disk_facts(disk), 'target_format':
            target_format(case, disk), 'runs': runs, 'failures': failures,
            'median': medians(runs)}


def disk_facts(disk):
    return {'format': disk.fmt, 'path': disk.path,
            'allocated_bytes': sum(allocated_bytes(p) for p in disk.files),
            'files': len(disk.files)}


def medians(runs):
    """Median of every numeric field, per contender."""
    out = {}
    for who in ('nova', 'snapworker', 'bound'):
        keys = [k for k, v in (runs[0][who].items() if runs else ())
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[who] = {k: statistics.median(r[who][k] for r in runs)
                    for k in keys}
    if runs:
        out['loadavg_before'] = statistics.median(
            r['loadavg_before'] for r in runs)
    if runs:
        # The table's ratios are of the medians, as a reader would work
        # them out; the median of per-run ratios, which pairs runs made
        # under the same conditions, is kept beside them.
        for who in ('snapworker', 'bound'):
            out[f'ratio_{who}_nova'] = (out[who]['total'] /
                                        out['nova']['total'])
            out[f'ratio_{who}_nova_per_run'] = statistics.median(
                r[who]['total'] / r['nova']['total'] for r in runs)
    return out


# -- report -------------------------------------------------------------------

def _mib(n):
    return '-' if n is None else '%.0f MiB' % (n / MiB)


def _sec(n):
    return '-' if n is None else '%.2f s' % n


def case_table(case):
    """The per-case table: medians of the runs that verified."""
    m = case['median']
    n, s, b = m['nova'], m['snapworker'], m['bound']
    rows = [
        ('total', _sec(n['total']), _sec(s['total']), _sec(b['total'])),
        ('  every run', *(' '.join('%.2f' % r[who]['total']
                                   for r in case['runs'])
                          for who in ('nova', 'snapworker', 'bound'))),
        ('  extract | upload | rm', '%.2f | %.2f | %.2f s' % (
            n['extract'], n['upload'], n['cleanup']),
         '(worker %.2f s)' % s['worker_duration'], ''),
        ('storage bytes read', _mib(n['bytes_read']),
         _mib(s['bytes_read']), _mib(b['bytes_read'])),
        ('  source bytes (payload)', '', _mib(s['payload_bytes_read']), ''),
        ('bytes uploaded', _mib(n['bytes_uploaded']),
         _mib(s['bytes_uploaded']), _mib(b['bytes_uploaded'])),
        ('scratch peak', _mib(n['scratch_peak']),
         '%s (payload %s)' % (_mib(s['scratch_peak']),
                              _mib(s['scratch_bytes'])), ''),
        ('source held', _sec(n['source_held']), _sec(s['source_held']), ''),
        ('CPU: own | Glance', '%.1f | %.1f s' % (n['cpu'], n['glance_cpu']),
         '%.1f | %.1f s' % (s['cpu'], s['glance_cpu']),
         '%.1f | %.1f s' % (b['cpu'], b['glance_cpu'])),
        ('worker peak RSS', '', _mib(s['peak_rss']), ''),
    ]
    lines = [f"{case['name']}: {case['title']}  ({len(case['runs'])} "
             f"verified runs, {len(case['failures'])} failed)",
             '%-26s %-22s %-26s %s' % ('median', 'Nova', 'snapworker',
                                       'upload bound')]
    lines += ['%-26s %-22s %-26s %s' % row for row in rows]
    lines.append('ratio snapworker/Nova %.2f   bound/Nova %.2f' % (
        m['ratio_snapworker_nova'], m['ratio_bound_nova']))
    return '\n'.join(lines)


def summary_table(cases):
    """One line per case, the numbers the README quotes."""
    head = '%-10s %8s %8s %6s %8s %9s %9s %9s %9s %8s' % (
        'case', 'Nova', 'snapw', 'ratio', 'bound', 'read N', 'read S',
        'scratch N', 'held N/S', 'RSS S')
    lines = [head]
    for case in cases:
        if not case['runs']:
            lines.append('%-10s FAILED: %s' % (case['name'],
                                              case['failures']))
            continue
        n = case['median']['nova']
        s = case['median']['snapworker']
        lines.append('%-10s %7.2fs %7.2fs %6.2f %7.2fs %9s %9s %9s %9s %8s'
                     % (case['name'], n['total'], s['total'],
                        case['median']['ratio_snapworker_nova'],
                        case['median']['bound']['total'],
                        _mib(n['bytes_read']), _mib(s['bytes_read']),
                        _mib(n['scratch_peak']),
                        '%.1f/%.1f' % (n['source_held'], s['source_held']),
                        _mib(s['peak_rss'])))
    return '\n'.join(lines)


def machine():
    """What the numbers were measured on."""
    qemu = subprocess.run(['qemu-img', '--version'], capture_output=True,
                          text=True).stdout.splitlines()[0]
    glance = glob.glob(os.path.join(
        REPO, '.venv-glance/lib/python*/site-packages/glance-*.dist-info'))
    from importlib import metadata
    return {**benchkit.host(), 'qemu_img': qemu,
            'nova': metadata.version('nova'),
            'glance': os.path.basename(glance[0]) if glance else None,
            'glance_setup': 'uWSGI, 1 process, unauthenticated pipeline, '
                            'file store on the same disk'}


# -- main ---------------------------------------------------------------------

def parse_size(text):
    units = {'K': 1024, 'M': MiB, 'G': GiB}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def build(work, conn, size):
    """Every case's disk, built once, each with a shut-off domain."""
    instances = os.path.join(work, 'instances')
    disks = {}
    for name, make in DISK_MAKERS.items():
        disks[name] = make(instances, size)
        define_domain(conn, disks[name])
    return disks


def benchmark(args, work, state_dir):
    """Services, disks, the nova-compute child and the worker; all cases."""

    with benchkit.services(state_dir) as state:
        return _benchmark(args, work, state)


def _benchmark(args, work, state):
    import libvirt

    conn = libvirt.open(state['libvirt_uri'])
    nova = NovaCompute(work, state)
    worker = Worker(work, state)
    try:
        disks = build(work, conn, args.size)
        nova.start()
        worker.start()
        ctx = {'nova': nova, 'worker': worker, 'work': work,
               'images': Images(state['glance_noauth_url'], work),
               'glance_pid': state['glance_noauth']['pid']}
        results = []
        for case in CASES:
            if args.case and case.name not in args.case:
                continue
            log(f'case {case.name}: {case.title}')
            results.append(run_case(ctx, case, disks[case.disk],
                                    args.repeat))
        return results
    finally:
        worker.stop()
        nova.stop()
        conn.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--size', type=parse_size, default=GiB,
                        help='virtual disk size (default 1G; 128M for a '
                             'smoke run)')
    parser.add_argument('--case', action='append',
                        choices=[c.name for c in CASES],
                        help='run only this case (repeatable)')
    parser.add_argument('--workdir', default='/var/tmp')
    parser.add_argument('--json', help='also write the results here')
    parser.add_argument('--keep', action='store_true',
                        help='keep the work directory (logs, disks)')
    parser.add_argument('--nova-child', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nova_child:
        return nova_child_main(args.nova_child)
    # SIGTERM must unwind through the finally blocks that stop services.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp(prefix='snapshot-vs-nova-', dir=args.workdir)
    os.chmod(work, 0o755)  # libvirtd runs as nobody
    state_dir = os.path.join(work, 'services')
    began = time.monotonic()
    try:
        results = benchmark(args, work, state_dir)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f'work directory kept: {work}')
    document = {'size': args.size, 'repeat': args.repeat,
                'machine': machine(), 'cases': results,
                'wall_seconds': round(time.monotonic() - began, 1)}
    for case in results:
        if case['runs']:
            print(case_table(case) + '\n')
    print(summary_table(results))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(document, f, indent=2)
    return 1 if any(case['failures'] for case in results) else 0


if __name__ == '__main__':
    sys.exit(main())
