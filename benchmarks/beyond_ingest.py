#!/usr/bin/env python3
"""Beyond Glance's ingest (issue 12), measured side by side in one run.

Cases (rows of the table and of ``--json``)::

  ingest-10G   a Nova-style overlay (qcow2 on a raw _base), 10 GiB virtual,
               1 GiB of data -> raw into Glance's RBD store, by
                 nova           Nova 34's real LibvirtDriver.snapshot() cold
                                path (qemu-img convert into
                                snapshots_directory, then the upload;
                                benchmarks/snapshot_vs_nova.py runs it)
                 worker-api     snapworker streaming through Glance's API
                 worker-direct  snapworker writing Glance's pool itself
                                ([rbd] direct_write)
  ingest-20G   the same data on a 20 GiB disk, worker-direct (and the
               digest alone): does the time follow the data?
  digest-10G   md5 + sha512 of 10 GiB (what any raw image of that disk
               costs to hash, zeros included): the floor of the direct
               write, which must give Glance the hash of the whole disk
  stream       the 10 GiB overlay read as raw (qemu-nbd + the worker's
               pipelined NBD reads) into a pipe, against ``nbdcopy``
  pagecache    a 1 GiB raw disk snapshotted (worker-api): the page cache
               the source leaves behind ([worker] read_cache = bypass)
  held         a guest Nova suspended for the snapshot (managed save), a
               2 GiB overlay with 1 GiB of data, raw into the rbd store:
               how long it waits, with a reflink copy (instances path on
               a loop-mounted XFS, reflink=1), the convert plan (a copy in
               scratch_dir, Nova's way) and a plain stream

Every row has ``case``, ``method``, ``seconds``, ``bytes_read`` (storage
bytes the method's processes read, cold cache), ``bytes_written`` (local
storage writes plus the bytes allocated in the RBD image), ``scratch_bytes``,
``peak_rss_bytes``, ``page_cache_bytes_after`` (of the disk's files),
``guest_held_seconds`` and ``load`` (1-minute load average before the row).

Setup, on the services ``tools/setup-env`` installs (run as root, from the
repository root)::

    .venv/bin/python benchmarks/beyond_ingest.py [--json out.json]
        [--virtual 10G] [--data 1G] [--case ingest ...]

The services come from ``python -m tests.services up --with-ceph
--glance-rbd-thin --glance-rbd-default``: Glance's default store is its rbd
store (Nova names no store, so that is where Nova's snapshot goes) and it
skips zero chunks (``rbd_thin_provisioning``): the test OSD is memstore,
all data in RAM, and a 10 GiB image of written zeros would not fit. This is
the setting most favourable to the Glance paths (Glance still receives and
hashes every zero, but does not write them).

Every image is checked: its ``os_hash_value`` (sha512 of the raw disk) is
the same for all three methods, and the direct write's RBD data is read
back and hashed by this script. A method whose image differs fails the run.
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import benchkit  # noqa: E402  (this folder is sys.path[0])
import snapshot_vs_nova as svn  # noqa: E402
from pagecache import drop_cache  # noqa: E402

MiB = benchkit.MiB
GiB = benchkit.GiB
ROW_FIELDS = ('case', 'method', 'seconds', 'bytes_read', 'bytes_written',
              'scratch_bytes', 'peak_rss_bytes', 'page_cache_bytes_after',
              'guest_held_seconds')
CASES = ('ingest', 'digest', 'stream', 'pagecache', 'held')


def row(case, method, **fields):
    out = {name: None for name in ROW_FIELDS}
    out.update(case=case, method=method, load=benchkit.loadavg(), **fields)
    return out


# -- RBD side (the benchmark looks at what each method left in Ceph) ---------

class Pool:
    """Glance's ``images`` pool, as admin: allocation, read-back hash."""

    def __init__(self, ceph):
        import rados
        self.conn = rados.Rados(conffile=ceph['conf_path'],
                                rados_id='admin',
                                conf={'keyring': ceph['admin_keyring']})
        self.conn.connect()
        self.ioctx = self.conn.open_ioctx('images')

    def allocated(self, name):
        import rbd
        found = []
        with rbd.Image(self.ioctx, name, read_only=True) as image:
            image.diff_iterate(0, image.size(), None,
                               lambda _o, length, exists:
                               found.append(length if exists else 0))
        return sum(found)

    def sha512(self, name):
        """sha512 of ``name@snap``'s whole content, holes as zeros."""
        import rbd
        digest = hashlib.sha512()
        zeros = bytes(8 * MiB)
        with rbd.Image(self.ioctx, name, snapshot='snap',
                       read_only=True) as image:
            size = image.size()
            data = []
            image.diff_iterate(0, size, None,
                               lambda o, length, exists:
                               exists and data.append((o, length)))
            pos = 0
            for offset, length in sorted(data):
                _zeros(digest, zeros, offset - pos)
                for at in range(offset, offset + length, 8 * MiB):
                    digest.update(image.read(
                        at, min(8 * MiB, offset + length - at)))
                pos = offset + length
            _zeros(digest, zeros, size - pos)
        return digest.hexdigest()

    def close(self):
        self.ioctx.close()
        self.conn.shutdown()


def _zeros(digest, zeros, length):
    while length > 0:
        step = min(length, len(zeros))
        digest.update(zeros if step == len(zeros) else bytes(step))
        length -= step


# -- the cases ----------------------------------------------------------------

def ingest(ctx, label, disk, methods):
    """Each method snapshots ``disk`` to raw in Glance's rbd store."""
    rows, hashes = [], {}
    for method in methods:
        image_id = ctx['images'].create(f'{label}-{method}',
                                        disk.instance_uuid)
        drop_cache(disk.files)
        try:
            if method == 'nova':
                r = _nova(ctx, disk, image_id)
            else:
                r = _worker(ctx, ctx['workers'][method], disk, image_id)
            image = ctx['images'].get(image_id)
            if image['status'] != 'active' or image['stores'] != 'ceph':
                raise RuntimeError(f'{method}: image {image["status"]} in '
                                   f'{image["stores"]}')
            store_bytes = ctx['pool'].allocated(image_id)
            hashes[method] = image['os_hash_value']
            if method == 'worker-direct':
                back = ctx['pool'].sha512(image_id)
                if back != image['os_hash_value']:
                    raise RuntimeError('direct: RBD data does not hash to '
                                       'the registered os_hash_value')
            r['bytes_written'] += store_bytes
            r['store_bytes'] = store_bytes
            r['page_cache_bytes_after'] = benchkit.cached_bytes(disk.files)
            rows.append(row(label, method, **r))
            benchkit.log(f'  {label} {method}: {r["seconds"]:.2f} s')
        finally:
            ctx['images'].delete(image_id)
    if len(set(hashes.values())) > 1:
        raise RuntimeError(f'{label}: images differ: {hashes}')
    return rows


def _nova(ctx, disk, image_id):
    nova = ctx['nova']
    benchkit.reset_peak_rss(nova.proc.pid)
    result = nova.snapshot(
        instance_uuid=disk.instance_uuid, image_id=image_id,
        image_format='raw',
        snapshots_directory=os.path.join(ctx['work'], 'snapshots'))
    if result['error']:
        raise RuntimeError(f'Nova: {result["error"]}')
    return {'seconds': round(result['total'], 2),
            'bytes_read': result['bytes_read'],
            'bytes_written': result['bytes_written'],
            'scratch_bytes': result['scratch_peak'],
            'peak_rss_bytes': benchkit.peak_rss(nova.proc.pid),
            'guest_held_seconds': round(result['source_held'], 2),
            'extract_seconds': round(result['extract'], 2),
            'upload_seconds': round(result['upload'], 2)}


def _worker(ctx, worker, disk, image_id):
    result = worker.snapshot(disk.instance_uuid, image_id, 'raw')
    if result['error']:
        raise RuntimeError(f'worker: {result["error"]}')
    payload = result['payload']
    return {'seconds': round(result['total'], 2),
            'bytes_read': result['bytes_read'],
            'bytes_written': result['bytes_written'],
            'scratch_bytes': result['scratch_peak'],
            'peak_rss_bytes': result['peak_rss'],
            'guest_held_seconds': payload['source_held_seconds'],
            'strategy': payload['strategy'],
            'payload_bytes_read': payload['bytes_read'],
            'payload_bytes_written': payload.get('bytes_written')}


def digest_only(label, size):
    """md5 + sha512 of ``size`` zero bytes, as the worker's digest thread
    computes them (streams/digest.py): the hashing floor."""
    from snapworker.streams import digest as streams_digest

    zeros = bytes(4 * MiB)
    began = time.monotonic()
    cpu = time.process_time()
    digest = streams_digest.BackgroundDigest('sha512')
    try:
        for _ in range(size // len(zeros)):
            digest.update(zeros)
        digest.finish()
    finally:
        digest.close()
    return row(label, 'digest-only',
               seconds=round(time.monotonic() - began, 2),
               cpu_seconds=round(time.process_time() - cpu, 2),
               bytes_read=0, bytes_written=0, scratch_bytes=0)


def stream_vs_nbdcopy(disk):
    """The overlay as raw into a pipe: the worker's stream, then nbdcopy."""
    from snapworker.streams import nbd
    from snapworker.streams import raw

    rows = []
    sink = subprocess.Popen(['sh', '-c', 'cat > /dev/null'],
                            stdin=subprocess.PIPE)
    drop_cache(disk.files)
    began = time.monotonic()
    view = nbd.NbdChainView(nbd.qemu_nbd_argv(disk.path, 'qcow2'))
    with benchkit.PeakSampler(lambda: benchkit.peak_rss(os.getpid())) as rss:
        stream = raw.RawStream(view, chunk_size=4 * MiB)
        size = stream.size
        try:
            while True:
                data = stream.read(4 * MiB)
                if not data:
                    break
                sink.stdin.write(data)
        finally:
            stream.close()
            sink.stdin.close()
            sink.wait()
    seconds = time.monotonic() - began
    rows.append(row('stream', 'worker-stream', seconds=round(seconds, 2),
                    bytes_read=view.bytes_read, bytes_written=0,
                    scratch_bytes=0, peak_rss_bytes=rss.peak,
                    rate_mib_s=round(size / seconds / MiB, 1)))
    drop_cache(disk.files)
    began = time.monotonic()
    proc = subprocess.run(
        ['sh', '-c', f'nbdcopy -- [ qemu-nbd -r -f qcow2 {disk.path} ] - '
                     f'| cat > /dev/null'], check=True)
    seconds = time.monotonic() - began
    del proc
    rows.append(row('stream', 'nbdcopy', seconds=round(seconds, 2),
                    bytes_written=0, scratch_bytes=0,
                    rate_mib_s=round(size / seconds / MiB, 1)))
    return rows


def pagecache(ctx):
    """A 1 GiB raw disk (all data) snapshotted through Glance's API."""
    disk = benchkit.raw_disk(os.path.join(ctx['work'], 'instances'), GiB,
                             GiB)
    benchkit.define_domain(ctx['conn'], disk, svn.PROJECT_ID)
    try:
        rows = ingest(ctx, 'pagecache-1G', disk, ('worker-api',))
    finally:
        benchkit.remove_disk(disk)
    r = rows[0]
    r['page_cache_share'] = round(
        r['page_cache_bytes_after'] / max(1, r['payload_bytes_read']), 4)
    return rows


def held(ctx, state, work):
    """A suspended guest's wait: reflink copy vs convert vs stream."""
    xfs = os.path.join(work, 'xfs')
    image = os.path.join(work, 'xfs.img')
    os.makedirs(xfs)
    with open(image, 'wb') as f:
        f.truncate(8 * GiB)
    benchkit.run('mkfs.xfs', '-q', '-m', 'reflink=1', image)
    benchkit.run('mount', '-o', 'loop', image, xfs)
    workers = []
    try:
        ext4 = os.path.join(work, 'instances')
        plans = (('reflink', xfs, {}),
                 ('convert', ext4, {}),
                 ('stream', ext4, {'worker.suspended_guest_plan': 'stream'}))
        rows = []
        for method, instances, extra in plans:
            worker = svn.Worker(work, state, host=f'bench-held-{method}',
                                extra=extra, instances_path=instances)
            workers.append(worker)
            worker.start()
            disk = benchkit.nova_overlay(instances, 2 * GiB, GiB)
            benchkit.define_domain(ctx['conn'], disk, svn.PROJECT_ID)
            dom = ctx['conn'].lookupByUUIDString(disk.instance_uuid)
            dom.create()
            dom.managedSave(0)
            try:
                ctx['workers'][method] = worker
                r = ingest(ctx, 'held-2G', disk, (method,))[0]
                rows.append(r)
            finally:
                dom.managedSaveRemove(0)
                benchkit.remove_disk(disk)
        return rows
    finally:
        for worker in workers:
            worker.stop()
        subprocess.run(['umount', '-l', xfs], check=False)


# -- main ---------------------------------------------------------------------

def machine():
    return {**benchkit.host(),
            'ceph_osd': 'memstore (RAM), 1 OSD, pool size 1',
            'glance': 'uWSGI, 1 process, unauthenticated pipeline, rbd '
                      'default store, rbd_thin_provisioning = True'}


def table(rows):
    head = '%-13s %-14s %8s %9s %9s %9s %8s %9s %7s %5s' % (
        'case', 'method', 'seconds', 'read', 'written', 'scratch', 'RSS',
        'cache', 'held', 'load')
    lines = [head]

    def mib(n):
        return '-' if n is None else '%.0fM' % (n / MiB)

    for r in rows:
        lines.append('%-13s %-14s %8s %9s %9s %9s %8s %9s %7s %5s' % (
            r['case'], r['method'], r['seconds'], mib(r['bytes_read']),
            mib(r['bytes_written']), mib(r['scratch_bytes']),
            mib(r['peak_rss_bytes']), mib(r['page_cache_bytes_after']),
            '-' if r['guest_held_seconds'] is None
            else r['guest_held_seconds'], r['load']))
    return '\n'.join(lines)


def ratios(rows, virtual):
    """The issue's targets, from the rows."""
    by = {(r['case'], r['method']): r for r in rows}
    out = {}
    small, big = f'ingest-{virtual // GiB}G', f'ingest-{2 * virtual // GiB}G'

    def get(case, method):
        r = by.get((case, method))
        return r and r['seconds']

    nova, direct = get(small, 'nova'), get(small, 'worker-direct')
    api = get(small, 'worker-api')
    if nova and direct:
        out['nova_over_direct'] = round(nova / direct, 2)
    if nova and api:
        out['nova_over_api'] = round(nova / api, 2)
    d20 = get(big, 'worker-direct')
    if direct and d20:
        out['direct_big_over_small'] = round(d20 / direct, 2)
    digest = get(f'digest-{virtual // GiB}G', 'digest-only')
    if direct and digest:
        out['direct_minus_digest_seconds'] = round(direct - digest, 2)
    s, n = by.get(('stream', 'worker-stream')), by.get(('stream', 'nbdcopy'))
    if s and n:
        out['stream_rate_over_nbdcopy'] = round(
            s['rate_mib_s'] / n['rate_mib_s'], 2)
    p = by.get(('pagecache-1G', 'worker-api'))
    if p:
        out['page_cache_share_1G'] = p['page_cache_share']
    for method in ('reflink', 'convert', 'stream'):
        r = by.get(('held-2G', method))
        if r:
            out[f'held_seconds_{method}'] = r['guest_held_seconds']
    return out


def benchmark(args, work):
    state_dir = os.path.join(work, 'services')
    with benchkit.services(state_dir, with_ceph=True, extra_args=(
            '--glance-rbd-thin', '--glance-rbd-default')) as state:
        return _benchmark(args, work, state)


def _benchmark(args, work, state):
    import libvirt

    conn = libvirt.open(state['libvirt_uri'])
    instances = os.path.join(work, 'instances')
    nova = svn.NovaCompute(work, state)
    workers = {
        'worker-api': svn.Worker(work, state, host='bench-api'),
        'worker-direct': svn.Worker(work, state, host='bench-direct', extra={
            'rbd.direct_write': 'True', 'rbd.glance_pool': 'images'}),
    }
    pool = Pool(state['ceph'])
    rows = []
    try:
        for worker in workers.values():
            worker.start()
        ctx = {'nova': nova, 'workers': workers, 'work': work,
               'conn': conn, 'pool': pool,
               'images': svn.Images(state['glance_noauth_url'], work)}
        if 'ingest' in args.case or 'stream' in args.case:
            benchkit.log(f'building the {args.virtual // GiB} GiB overlay')
            disk10 = benchkit.nova_overlay(instances, args.virtual, args.data)
            benchkit.define_domain(conn, disk10, svn.PROJECT_ID)
        if 'ingest' in args.case:
            nova.start()
            rows += ingest(ctx, f'ingest-{args.virtual // GiB}G', disk10,
                           ('worker-direct', 'worker-api', 'nova'))
            benchkit.log(f'building the {2 * args.virtual // GiB} GiB '
                         f'overlay')
            disk20 = benchkit.nova_overlay(instances, 2 * args.virtual,
                                           args.data)
            benchkit.define_domain(conn, disk20, svn.PROJECT_ID)
            rows += ingest(ctx, f'ingest-{2 * args.virtual // GiB}G',
                           disk20, ('worker-direct',))
            benchkit.remove_disk(disk20)
        if 'digest' in args.case:
            rows.append(digest_only(f'digest-{args.virtual // GiB}G',
                                    args.virtual))
            rows.append(digest_only(f'digest-{2 * args.virtual // GiB}G',
                                    2 * args.virtual))
        if 'stream' in args.case:
            rows += stream_vs_nbdcopy(disk10)
        if 'pagecache' in args.case:
            rows += pagecache(ctx)
        if 'held' in args.case:
            rows += held(ctx, state, work)
        return rows
    finally:
        for worker in workers.values():
            worker.stop()
        nova.stop()
        pool.close()
        conn.close()


def parse_size(text):
    return svn.parse_size(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--virtual', type=parse_size, default=10 * GiB)
    parser.add_argument('--data', type=parse_size, default=GiB)
    parser.add_argument('--case', action='append', choices=CASES)
    parser.add_argument('--workdir', default='/var/tmp')
    parser.add_argument('--json', help='also write the rows here')
    parser.add_argument('--keep', action='store_true')
    args = parser.parse_args(argv)
    args.case = args.case or list(CASES)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp(prefix='beyond-ingest-', dir=args.workdir)
    os.chmod(work, 0o755)  # libvirtd runs as nobody
    began = time.monotonic()
    try:
        rows = benchmark(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    summary = ratios(rows, args.virtual)
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': machine(), 'virtual': args.virtual,
                       'data': args.data, 'rows': rows, 'ratios': summary,
                       'wall_seconds': round(time.monotonic() - began, 1)},
                      f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
