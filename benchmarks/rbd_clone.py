#!/usr/bin/env python3
"""The worker's clone plan against Nova's direct_snapshot, on a real Ceph.

Starts its own services (single-node Ceph with a memstore big enough for
the largest image plus a full flatten copy, Glance with a ``ceph`` rbd
store, libvirtd's test driver, RabbitMQ) and one ``snapworker-worker`` per
flatten policy, then for each image size (default 1 and 4 GiB, 90 % of it
written) times:

  worker/background  cast -> image active (snap, clone, snap+protect,
                     register; flatten afterwards, in the worker), plus
                     when that background flatten finished
  worker/sync        the same with the flatten before registration
  nova               Nova's ``direct_snapshot`` sequence with python rbd
                     (snap + protect, clone, flatten, snap + protect the
                     clone, add the location, remove the source snapshot),
                     timed in this process; Nova clears the instance's
                     task_state (the guest may start) only at the end

"held" is how long the guest had to stay down: ``source_held_seconds``
for the worker (until its snapshot of the disk exists), the whole
sequence for Nova. Prints a table and a JSON document.

    .venv/bin/python benchmarks/rbd_clone.py [--sizes 1,4] [--repeat 3]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import libvirt  # noqa: E402
import rbd  # noqa: E402
from oslo_context import context as o_context  # noqa: E402

from snapworker import events  # noqa: E402
from snapworker import rpcapi  # noqa: E402
from snapworker.conf import CONF  # noqa: E402
from tests.functional import base as fbase  # noqa: E402
from tests.services import __main__ as services_main  # noqa: E402
from tests.services import ceph  # noqa: E402
from tests.services import glance as glance_service  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
METHODS = ('worker/background', 'worker/sync', 'nova')


def write_disk(ioctx, name, size, fill):
    """Create ``name`` and write ``fill`` of it (distinct 8 MiB chunks)."""
    rbd.RBD().create(ioctx, name, size)
    chunk = 8 * MiB
    block = bytearray(os.urandom(chunk))
    with rbd.Image(ioctx, name) as image:
        for i, offset in enumerate(range(0, int(size * fill), chunk)):
            block[:8] = i.to_bytes(8, 'little')
            image.write(bytes(block), offset)


def remove_all(ioctx, name):
    try:
        with rbd.Image(ioctx, name) as image:
            for snap in list(image.list_snaps()):
                if image.is_protected_snap(snap['name']):
                    image.unprotect_snap(snap['name'])
                image.remove_snap(snap['name'])
        rbd.RBD().remove(ioctx, name)
    except rbd.ImageNotFound:
        pass


class Bench:

    def __init__(self, services, workdir):
        self.services = services
        self.workdir = workdir
        self.cluster = ceph.CephCluster.from_dict(services['ceph'])
        self.conn = self.cluster.connect(admin=True)
        self.vms = self.conn.open_ioctx('vms')
        self.images = self.conn.open_ioctx('images')
        self.glance = glance_service.GlanceService(
            url=services['glance_url'], state_dir='', log_path='', pid=0,
            pipeline='trusted-headers').client()
        self.libvirt = libvirt.open(services['libvirt_uri'])
        self.api = rpcapi.SnapworkerAPI()
        self.context = o_context.RequestContext(
            user_id=glance_service.IDENTITY_HEADERS['X-User-Id'],
            project_id=glance_service.IDENTITY_HEADERS['X-Project-Id'],
            roles=['admin', 'member', 'reader'], auth_token='unused')
        self.workers = {}
        self.default_features = int(self.conn.conf_get(
            'rbd_default_features'))

    def worker(self, policy):
        if policy not in self.workers:
            instances = os.path.join(self.workdir, 'instances')
            os.makedirs(instances, exist_ok=True)
            w = fbase.WorkerProcess(self.services, self.workdir, instances,
                                    **{'rbd.flatten': policy,
                                       'worker.active_timeout': '600'})
            w.setUp()
            self.workers[policy] = w
        return self.workers[policy]

    def close(self):
        for w in self.workers.values():
            w.cleanUp()
        self.libvirt.close()
        self.vms.close()
        self.images.close()
        self.conn.shutdown()

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
        image_id = self.glance.images.create(name='bench')['id']
        try:
            with events.Subscription(CONF, image_id=image_id) as sub:
                t0 = time.monotonic()
                self.api.create_snapshot(self.context, w.host, instance,
                                         image_id, target_format='raw')
                received = list(sub.until_finished(900))
            active = time.monotonic() - t0
            end = received[-1]
            if end.event_type != 'snapshot.create.end':
                raise RuntimeError(f'{end.payload}\n{w.log_tail()}')
            flattened = active
            if policy == 'background':
                while self._worker_snaps(name):
                    time.sleep(0.02)
                flattened = time.monotonic() - t0
            return {'active': active, 'held': end.payload[
                'source_held_seconds'], 'independent': flattened,
                'strategy': end.payload['strategy'],
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
            name='bench-nova', disk_format='raw',
            container_format='bare')['id']
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
                image_id, f'rbd://{self.cluster.fsid}/images/{image_id}/snap',
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='1,4',
                        help='image sizes in GiB, comma separated')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--fill', default='0.9',
                        help='fraction written, per size (comma separated '
                             'like --sizes) or one for all')
    parser.add_argument('--methods', default=','.join(METHODS),
                        help='subset of ' + ', '.join(METHODS))
    parser.add_argument('--json')
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(',')]
    fills = [float(f) for f in args.fill.split(',')]
    fills = dict(zip(sizes, fills * len(sizes) if len(fills) == 1
                     else fills, strict=True))
    # In OSD RAM: the data written, plus twice that for a background
    # flatten (measured: deep-flatten of a clone whose ``snap`` exists
    # copies every object into the head and a RADOS clone for the
    # snapshot, which memstore stores in full), plus headroom. A full OSD
    # blocks every write: size it generously, but mind the RSS (~2x).
    ceph.MEMSTORE_BYTES = int(
        (3 * max(s * fills[s] for s in sizes) + 2) * GiB)
    state = tempfile.mkdtemp(prefix='rbd-bench-', dir='/tmp')
    os.chmod(state, 0o755)  # libvirtd's helpers run as nobody
    services = services_main.up(os.path.join(state, 'services'),
                                with_ceph=True)
    CONF([], project='snapworker', default_config_files=[])
    CONF.set_override('transport_url', services['transport_url'])
    bench = Bench(services, state)
    results = []
    try:
        for size in sizes:
            name = f'bench-{size}g-{uuid.uuid4().hex[:6]}'
            t0 = time.monotonic()
            write_disk(bench.vms, name, size * GiB, fills[size])
            print(f'{size} GiB disk, {fills[size]:.0%} written in '
                  f'{time.monotonic() - t0:.1f} s', flush=True)
            try:
                for method in args.methods.split(','):
                    runs = []
                    for _ in range(args.repeat):
                        if method == 'nova':
                            runs.append(bench.run_nova(name))
                        else:
                            runs.append(bench.run_worker(
                                name, method.split('/')[1]))
                    row = {'size_gib': size, 'fill': fills[size],
                           'method': method, 'runs': runs}
                    for key in ('active', 'held', 'independent'):
                        row[key] = statistics.median(r[key] for r in runs)
                    results.append(row)
                    print(f"{size:>3} GiB {method:<18} active "
                          f"{row['active']:7.2f} s  held {row['held']:7.3f} s"
                          f"  independent {row['independent']:7.2f} s",
                          flush=True)
            finally:
                remove_all(bench.vms, name)
    finally:
        bench.close()
        services_main.down(os.path.join(state, 'services'))
        shutil.rmtree(state, ignore_errors=True)
    print()
    print('| size | written | method | request -> active | guest held | '
          'independent of disk |')
    print('|---|---|---|---|---|---|')
    for row in results:
        print(f"| {row['size_gib']} GiB | {row['fill']:.0%} | "
              f"{row['method']} | "
              f"{row['active']:.2f} s | {row['held']:.3f} s | "
              f"{row['independent']:.2f} s |")
    doc = json.dumps(results, indent=2)
    if args.json:
        with open(args.json, 'w') as f:
            f.write(doc)
    else:
        print(doc)


if __name__ == '__main__':
    main()
