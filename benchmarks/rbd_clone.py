#!/usr/bin/env python3
"""The worker's clone plan against Nova's direct_snapshot, on a real Ceph.

The question (issue 4): is the time from request to active image flat in
the image size (8 GiB / 1 GiB < 1.5) and under 1 s, with the guest held
under 0.5 s, where Nova's own ``direct_snapshot`` (clone + sync flatten)
grows with the data?

Starts its own services (single-node Ceph, Glance with a ``ceph`` rbd
store, libvirtd's test driver, RabbitMQ) and one ``snapworker-worker`` per
flatten policy, then for each image size (default 1 and 8 GiB, 90 % of it
written) times:

  worker/background  cast -> image active (snap, clone, snap+protect,
                     register; flatten afterwards, in the worker), plus
                     when that background flatten finished
  worker/sync        the same with the flatten before registration
  worker/never       the same without any flatten: the pure clone cost;
                     the image stays a clone of the disk (clone v2)
  nova               Nova's ``direct_snapshot`` sequence with python rbd
                     (snap + protect, clone, flatten, snap + protect the
                     clone, add the location, remove the source snapshot),
                     timed in this process; Nova clears the instance's
                     task_state (the guest may start) only at the end

"held" is how long the guest had to stay down: ``source_held_seconds``
for the worker (until its snapshot of the disk exists), the whole
sequence for Nova; ``released`` in the JSON is when the worker's
``snapshot.source_released`` event arrived here. "active" is until its
``snapshot.create.end`` arrived (Glance reports the image active).
"independent" is when the image stopped depending on the disk (flatten
done, source snapshot gone); never for worker/never.

Object store: BlueStore on a sparse file by default, for every size. Why
not memstore: it keeps every byte in OSD RAM (about twice the data in RSS),
and a flatten writes the data again, so 8 GiB images do not fit in 24 GiB;
and a flatten into RAM is a memcpy, which flatters exactly the cost being
compared. Why not memstore for the small sizes only: the 8/1 ratio would
then compare two different stores. ``--objectstore memstore`` remains for
quick runs on small sizes.

Between runs every RBD object a run made is removed (the Glance image,
which deletes its clone; then anything left in the ``images`` pool, in
either trash, or as a snapshot of the disk, counted as ``leftovers``), and
the next run waits until the cluster's object count is back to the disk's
own, so that no run pays for the previous one's deletions.

Prints a table and a JSON document.

    .venv/bin/python benchmarks/rbd_clone.py [--sizes 1,8] [--repeat 3] \\
        [--repeat-large N] [--objectstore bluestore|memstore]
"""

import argparse
import glob
import json
import os
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import libvirt  # noqa: E402
import rados  # noqa: E402
import rbd  # noqa: E402
from oslo_context import context as o_context  # noqa: E402

from benchmarks import benchkit  # noqa: E402
from snapworker import events  # noqa: E402
from snapworker import rpc  # noqa: E402
from snapworker import rpcapi  # noqa: E402
from snapworker.conf import CONF  # noqa: E402
from snapworker.sources import ceph as sw_ceph  # noqa: E402

MiB = benchkit.MiB
GiB = benchkit.GiB
METHODS = ('worker/background', 'worker/sync', 'worker/never', 'nova')
OBJECTSTORES = ('memstore', 'bluestore')
#: The project owning the images and the request (the unauthenticated
#: Glance takes the owner the client names; the worker claims only an
#: image its requester's project owns).
PROJECT_ID = '6f1e9a3c0b7d4e2a9c5b8d1f0e3a7c24'
USER_ID = '0c2b5f1d8e9a4c7b9e3d6a2f1b8c5e70'
#: How long to wait for the cluster to drop a run's objects.
SETTLE_TIMEOUT = 120.0
#: Objects a run may leave for good: RBD metadata (directory, children,
#: trash and info objects of the pools); a data object is 4 MiB, so this
#: is ~128 MiB at most, far below a leftover clone.
SETTLE_SLACK = 32


def write_disk(ioctx, name, size, fill):
    """Create ``name`` and write ``fill`` of it (distinct 8 MiB chunks)."""
    rbd.RBD().create(ioctx, name, size)
    chunk = 8 * MiB
    block = bytearray(os.urandom(chunk))
    with rbd.Image(ioctx, name) as image:
        for i, offset in enumerate(range(0, int(size * fill), chunk)):
            block[:8] = i.to_bytes(8, 'little')
            image.write(bytes(block), offset)


def store_sizing(objectstore, sizes, fills):
    """Size the OSD's store for the largest image; return (bytes, note).

    What a run can hold at once, measured: the disk's data D, plus what a
    flatten writes into the Glance pool, which is D for a flatten before
    the clone's snapshot (sync, Nova) but more for one after it
    (background: deep-flatten copies the objects into the head and a
    RADOS clone for ``snap``; memstore had passed 3 D when it filled up).
    A full OSD blocks every write and hangs the run, so both stores get
    4 D plus headroom. Memstore holds it in RAM (RSS about twice the
    data); BlueStore's file is sparse, but it never gives back what it
    once allocated, so its size is also the worst-case disk use, checked
    here against the free space before anything starts.
    """
    data = max(s * GiB * fills[s] for s in sizes)
    wanted = int(4 * data + 4 * GiB)
    if objectstore == 'memstore':
        with open('/proc/meminfo') as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith('MemAvailable:'))
        note = ''
        if 2 * 2 * data > avail:
            note = (f'warning: memstore may need ~{4 * data / GiB:.0f} GiB '
                    f'of RAM, {avail / GiB:.0f} GiB available; consider '
                    f'--objectstore bluestore')
        return wanted, note
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if wanted + 4 * GiB > free:
        sys.exit(f'bluestore needs up to {wanted / GiB:.0f} GiB in '
                 f'{tempfile.gettempdir()}, only {free / GiB:.0f} GiB free')
    return wanted, ''


class OsdUsage:
    """The OSD's used bytes; the peak over a run shows what a flatten
    costs in space (and whether the store is sized right).

    BlueStore: ``bluestore_allocated`` from the OSD's admin socket, exact
    and live. Memstore has no such counter; the cluster stats stand in,
    but they reach the mon through the OSD's heartbeat and the mgr
    (seconds late), so short runs read low there.
    """

    def __init__(self, conn, asok):
        self._conn = conn
        self._asok = asok

    def used(self):
        if self._asok:
            return _asok_command(self._asok, {
                'prefix': 'perf dump', 'logger': 'bluestore',
                'counter': 'bluestore_allocated'})[
                    'bluestore']['bluestore_allocated']
        return self._conn.get_cluster_stats()['kb_used'] * 1024

    def peak_above_now(self):
        """A ``PeakSampler`` of the bytes used above what is used now."""
        base = self.used()
        return benchkit.PeakSampler(lambda: self.used() - base, interval=0.1)


def remove_rbd(ioctx, name, timeout=10):
    """Remove an image and its snapshots, retried while it is busy (a
    client that just closed it may still hold its watch for a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sw_ceph.remove_image(ioctx, name)
            return
        except (rbd.ImageBusy, rbd.ImageHasSnapshots):
            if time.monotonic() > deadline:
                benchkit.log(f'could not remove {name}: still busy')
                return
            time.sleep(0.2)


def _asok_command(path, cmd):
    """One command on a Ceph admin socket, without the 0.3-1 s ``ceph`` CLI.

    The protocol: the JSON command and a NUL; back, a big-endian 32-bit
    length and that much JSON.
    """
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(json.dumps(cmd).encode() + b'\0')
        length = struct.unpack('>I', sock.recv(4, socket.MSG_WAITALL))[0]
        data = b''
        while len(data) < length:
            chunk = sock.recv(length - len(data))
            if not chunk:
                raise ConnectionError(f'{path} closed mid-answer')
            data += chunk
    return json.loads(data)


class Bench:

    def __init__(self, services, workdir):
        self.services = services
        self.workdir = workdir
        ceph = services['ceph']
        self.fsid = ceph['fsid']
        self.conn = rados.Rados(conffile=ceph['conf_path'], rados_id='admin',
                                conf={'client_mount_timeout': '10'})
        self.conn.connect()
        self.vms = self.conn.open_ioctx('vms')
        self.images = self.conn.open_ioctx('images')
        self.glance = benchkit.glance_client(services['glance_noauth_url'])
        self.libvirt = libvirt.open(services['libvirt_uri'])
        self.api = rpcapi.SnapworkerAPI(rpc.get_transport(CONF),
                                        topic=CONF.worker.topic)
        self.context = o_context.RequestContext(
            user_id=USER_ID, project_id=PROJECT_ID,
            roles=['admin', 'member', 'reader'], auth_token='unused')
        self.workers = {}
        self.default_features = int(self.conn.conf_get(
            'rbd_default_features'))
        self._trim_at_once()
        # BlueStore only (see OsdUsage): the OSD's admin socket in the
        # cluster's run dir.
        asok = None
        if ceph.get('objectstore') == 'bluestore':
            asok, = glob.glob(os.path.join(ceph['state_dir'], 'run',
                                           'ceph-osd.*.asok'))
        self.usage = OsdUsage(self.conn, asok)

    def _trim_at_once(self):
        """Let the OSD trim removed snapshots without pausing.

        The OSD counts as rotational here whatever its store (memstore
        too: the virtio disk says rotational), and then sleeps 5 s
        between snapshot trims. The RADOS clones of a deleted image's
        ``snap`` (a background flatten makes one per object) would then
        linger for minutes, and every later run would wait for them or
        share the machine with them. SSD OSDs do not sleep.
        """
        ret, _, err = self.conn.mon_command(json.dumps({
            'prefix': 'config set', 'who': 'osd',
            'name': 'osd_snap_trim_sleep_hdd', 'value': '0'}), b'')
        if ret:
            raise RuntimeError(f'config set osd_snap_trim_sleep_hdd: {err}')

    def worker(self, policy):
        """One worker per flatten policy, started on first use."""
        if policy not in self.workers:
            host = f'bench-{policy}'
            top = os.path.join(self.workdir, host)
            scratch = os.path.join(top, 'scratch')
            instances = os.path.join(self.workdir, 'instances')
            for path in (scratch, instances):
                os.makedirs(path, exist_ok=True)
            conf = os.path.join(top, 'worker.conf')
            benchkit.write_worker_config(
                conf, host=host, state=self.services,
                instances_path=instances, scratch_dir=scratch,
                glance_url=self.services['glance_noauth_url'],
                # The unauthenticated Glance does not describe its stores
                # (an admin-only call): name the rbd store and its pool.
                extra={'rbd.flatten': policy,
                       'rbd.glance_store': 'ceph',
                       'rbd.glance_pool': 'images',
                       'worker.active_timeout': '900'})
            worker = benchkit.WorkerProcess(
                conf, os.path.join(top, 'worker.log')).start()
            worker.host = host
            self.workers[policy] = worker
        return self.workers[policy]

    def close(self):
        for w in self.workers.values():
            w.stop()
        self.libvirt.close()
        self.vms.close()
        self.images.close()
        self.conn.shutdown()

    def run(self, method, disk):
        """One measured run, then everything it made removed."""
        load = os.getloadavg()[0]
        with self.usage.peak_above_now() as usage:
            if method == 'nova':
                result = self.run_nova(disk)
            else:
                result = self.run_worker(disk, method.split('/')[1])
        result['peak_bytes'] = usage.peak
        result['load1'] = load
        result['leftovers'] = self.clean(disk)
        self.settle()
        return result

    def _domain(self, name):
        instance = str(uuid.uuid4())
        dom = self.libvirt.defineXML(
            f"<domain type='test'><name>bench-{instance[:8]}</name>"
            f"<uuid>{instance}</uuid><memory>65536</memory>"
            f"<os><type>hvm</type></os><devices>"
            f"<disk type='network' device='disk'>"
            f"<driver name='qemu' type='raw'/>"
            f"<source protocol='rbd' name='vms/{name}'/>"
            f"<target dev='vda' bus='virtio'/></disk></devices></domain>")
        return instance, dom

    def run_worker(self, name, policy):
        w = self.worker(policy)
        instance, dom = self._domain(name)
        image_id = self.glance.images.create(name='bench',
                                             owner=PROJECT_ID)['id']
        try:
            with events.Subscription(CONF, image_id=image_id) as sub:
                t0 = time.monotonic()
                self.api.create_snapshot(self.context, w.host, instance,
                                         image_id, target_format='raw')
                received, arrived = [], {}
                for event in sub.until_finished(1200):
                    arrived[event.event_type] = time.monotonic() - t0
                    received.append(event)
            active = time.monotonic() - t0
            end = received[-1]
            if end.event_type != 'snapshot.create.end':
                raise RuntimeError(f'{end.payload}; see {w.log_path}')
            if end.payload['strategy'] != 'clone':
                raise RuntimeError(f"not a clone: {end.payload}")
            independent = active
            if policy == 'never':
                independent = None  # a clone of the disk for good
            elif policy == 'background':
                # The flattener removes the source snapshot when done;
                # 0.1 s polls: opening the image is I/O on the same OSD.
                while self._worker_snaps(name):
                    time.sleep(0.1)
                independent = time.monotonic() - t0
            return {'active': active, 'held': end.payload[
                'source_held_seconds'], 'independent': independent,
                'released': arrived.get('snapshot.source_released'),
                'strategy': end.payload['strategy'],
                'flatten_policy': end.payload.get('flatten_policy'),
                'location_api': end.payload.get('location_api'),
                'image_hashed': end.payload.get('image_hashed'),
                'bytes_read': end.payload['bytes_read']}
        finally:
            self.glance.images.delete(image_id)
            dom.undefine()

    def _worker_snaps(self, name):
        with rbd.Image(self.vms, name, read_only=True) as image:
            return [s['name'] for s in image.list_snaps()
                    if s['name'].startswith('snapworker-')]

    def run_nova(self, name):
        """nova.storage.rbd_utils direct_snapshot + cleanup, re-typed."""
        image_id = self.glance.images.create(
            name='bench-nova', disk_format='raw', container_format='bare',
            owner=PROJECT_ID)['id']
        snap = uuid.uuid4().hex
        try:
            t0 = time.monotonic()
            with rbd.Image(self.vms, name) as image:
                image.create_snap(snap)
                image.protect_snap(snap)
            snapped = time.monotonic() - t0
            # Nova clones with the client's rbd_default_features.
            rbd.RBD().clone(self.vms, name, snap, self.images, image_id,
                            features=self.default_features)
            with rbd.Image(self.images, image_id) as clone:
                clone.flatten()
                clone.create_snap('snap')
                clone.protect_snap('snap')
            self.glance.images.add_location(
                image_id, f'rbd://{self.fsid}/images/{image_id}/snap',
                {})
            with rbd.Image(self.vms, name) as image:
                image.unprotect_snap(snap)
                image.remove_snap(snap)
            total = time.monotonic() - t0
            return {'active': total, 'held': total, 'independent': total,
                    'snapped': snapped, 'strategy': 'nova-direct',
                    'bytes_read': None}
        finally:
            self.glance.images.delete(image_id)

    def clean(self, disk):
        """Remove whatever a run left in Ceph; return what that was.

        Deleting the Glance image deletes its clone, and with it the
        disk's trashed snapshot (clone v2); this catches the rest, so
        that one failed cleanup cannot fill the cluster for every later
        run. A clean run returns [].
        """
        found = []
        for name in rbd.RBD().list(self.images):
            found.append(f'images/{name}')
            remove_rbd(self.images, name)
        for pool, ioctx in (('vms', self.vms), ('images', self.images)):
            for entry in list(rbd.RBD().trash_list(ioctx)):
                found.append(f'{pool} trash {entry["name"]}')
                rbd.RBD().trash_remove(ioctx, entry['id'], force=True)
        with rbd.Image(self.vms, disk) as image:
            for snap in list(image.list_snaps()):
                found.append(f'vms/{disk}@{snap["name"]}')
                if snap.get('namespace', 0) != 0:
                    continue  # trash: goes with its last clone, gone above
                if image.is_protected_snap(snap['name']):
                    image.unprotect_snap(snap['name'])
                image.remove_snap(snap['name'])
        return found

    def objects(self):
        return self.conn.get_cluster_stats()['num_objects']

    def settle(self):
        """Wait until the cluster holds only the disk's objects again
        (give or take ``SETTLE_SLACK`` metadata objects).

        Removing a flattened multi-GiB clone returns before the OSD has
        freed everything (and the mgr reports it a second late); the next
        run should not pay for that.
        """
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while self.objects() > self.baseline_objects + SETTLE_SLACK:
            if time.monotonic() > deadline:
                print(f'  (cluster still holds {self.objects()} objects, '
                      f'disk alone {self.baseline_objects})', flush=True)
                return
            time.sleep(0.5)


def fmt_runs(values, digits):
    return ' '.join('-' if v is None else f'{v:.{digits}f}' for v in values)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(results, sizes):
    """The table the README shows, and the flatness ratio per method."""
    print()
    print('| size | written | method | request -> active (runs) | '
          'guest held | independent of disk | peak extra used |')
    print('|---|---|---|---|---|---|---|')
    for row in results:
        runs = row['runs']
        independent = ('never' if row['independent'] is None
                       else f"{row['independent']:.2f} s")
        print(f"| {row['size_gib']} GiB | {row['fill']:.0%} | "
              f"{row['method']} | {row['active']:.2f} s "
              f"({fmt_runs([r['active'] for r in runs], 2)}) | "
              f"{row['held']:.3f} s | {independent} | "
              f"{row['peak_bytes'] / GiB:.1f} GiB |")
    if len(sizes) < 2:
        return
    small, large = min(sizes), max(sizes)
    by = {(r['size_gib'], r['method']): r for r in results}
    print()
    print(f'| method | active {large}/{small} GiB | held {large}/{small} '
          f'GiB |')
    print('|---|---|---|')
    for method in dict.fromkeys(r['method'] for r in results):
        a, b = by.get((small, method)), by.get((large, method))
        if a and b:
            print(f"| {method} | {b['active'] / a['active']:.2f} | "
                  f"{b['held'] / a['held']:.2f} |")


def measure_size(bench, args, size, fill, methods):
    """Every method on one disk of ``size`` GiB; its rows."""
    repeat = args.repeat
    if size == max(int(s) for s in args.sizes.split(',')) \
            and args.repeat_large:
        repeat = args.repeat_large
    name = f'bench-{size}g-{uuid.uuid4().hex[:6]}'
    t0 = time.monotonic()
    write_disk(bench.vms, name, size * GiB, fill)
    print(f'{size} GiB disk, {fill:.0%} written in '
          f'{time.monotonic() - t0:.1f} s', flush=True)
    bench.baseline_objects = 0
    time.sleep(2)  # the mgr's digest catches up with the writes
    bench.baseline_objects = bench.objects()
    rows = []
    try:
        for method in methods:
            runs = [bench.run(method, name) for _ in range(repeat)]
            row = {'size_gib': size, 'fill': fill, 'method': method,
                   'objectstore': args.objectstore, 'runs': runs}
            for key in ('active', 'held', 'independent', 'peak_bytes'):
                row[key] = median(r[key] for r in runs)
            rows.append(row)
            independent = ('never' if row['independent'] is None
                           else f"{row['independent']:7.2f} s")
            print(f"{size:>3} GiB {method:<18} active "
                  f"{row['active']:7.2f} s "
                  f"({fmt_runs([r['active'] for r in runs], 2)})"
                  f"  held {row['held']:7.3f} s"
                  f"  independent {independent}"
                  f"  peak +{row['peak_bytes'] / GiB:.1f} GiB"
                  f"  load {fmt_runs([r['load1'] for r in runs], 1)}",
                  flush=True)
            for r in runs:
                if r['leftovers']:
                    print(f"  cleaned up after a run: {r['leftovers']}",
                          flush=True)
    finally:
        remove_rbd(bench.vms, name)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='1,8',
                        help='image sizes in GiB, comma separated')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--repeat-large', type=int,
                        help='runs for the largest size (default --repeat): '
                             'its flattens take real time on bluestore')
    parser.add_argument('--fill', default='0.9',
                        help='fraction written, per size (comma separated '
                             'like --sizes) or one for all')
    parser.add_argument('--methods', default=','.join(METHODS),
                        help='subset of ' + ', '.join(METHODS))
    parser.add_argument('--objectstore', default='bluestore',
                        choices=OBJECTSTORES,
                        help='the OSD store (default bluestore, see the '
                             'module docstring for why)')
    parser.add_argument('--json')
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(',')]
    fills = [float(f) for f in args.fill.split(',')]
    fills = dict(zip(sizes, fills * len(sizes) if len(fills) == 1
                     else fills, strict=True))
    methods = args.methods.split(',')
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f'unknown methods {sorted(unknown)}')
    store_bytes, note = store_sizing(args.objectstore, sizes, fills)
    if note:
        print(note, flush=True)
    state = tempfile.mkdtemp(prefix='rbd-bench-', dir='/tmp')
    os.chmod(state, 0o755)  # libvirtd's helpers run as nobody
    started = time.monotonic()
    try:
        with benchkit.services(
                os.path.join(state, 'services'), with_ceph=True,
                extra_args=('--ceph-objectstore', args.objectstore,
                            '--ceph-store-bytes', str(store_bytes))
        ) as services:
            print(f'ceph: {args.objectstore}, {store_bytes / GiB:.1f} GiB '
                  f'store', flush=True)
            CONF([], project='snapworker', default_config_files=[])
            CONF.set_override('transport_url', services['transport_url'])
            bench = Bench(services, state)
            try:
                results = [row for size in sizes
                           for row in measure_size(bench, args, size,
                                                   fills[size], methods)]
            finally:
                bench.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    print(f'wall time {(time.monotonic() - started) / 60:.1f} min')
    report(results, sizes)
    doc = json.dumps(results, indent=2)
    if args.json:
        with open(args.json, 'w') as f:
            f.write(doc)
    else:
        print(doc)


if __name__ == '__main__':
    main()
