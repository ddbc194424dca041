#!/usr/bin/env python3
"""Nova's extract-then-upload against streaming, on a Nova-style overlay.

Builds a raw ``_base`` file (2 GiB virtual, ~512 MiB of data) and a qcow2
overlay adding ~128 MiB, then times, each with a cold page cache:

  convert   ``qemu-img convert -O qcow2`` into a scratch file, then read the
            scratch file (what ``LibvirtDriver.snapshot()`` uploads today)
  qcow2     ``Qcow2Stream`` over ``NbdChainView``, read to nowhere
  raw       ``RawStream`` over ``NbdChainView``, read to nowhere

Each run executes in a fresh child process so ``ru_maxrss`` is that run's
own peak (the larger of the Python process and the qemu-img / qemu-nbd it
started).  Prints a table and a JSON document.  Run as root to drop the
page cache through /proc/sys/vm/drop_caches; otherwise the image files are
evicted with ``posix_fadvise(DONTNEED)``.

    .venv/bin/python benchmarks/stream_vs_convert.py [--repeat 3] \\
        [--workdir /var/tmp] [--json out.json]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import pagecache  # noqa: E402  (this folder is sys.path[0])

from snapworker.streams import nbd  # noqa: E402
from snapworker.streams import qcow2  # noqa: E402
from snapworker.streams import raw  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
READ_SIZE = 4 * MiB
METHODS = ('convert', 'qcow2', 'raw')


def run(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def qemu_io_writes(writes, scale):
    """``-c 'write -P pattern offset length'`` arguments, scaled down."""
    args = []
    for pattern, offset, length in writes:
        args += ['-c', 'write -P %d %d %d' % (pattern, offset // scale,
                                              length // scale)]
    return args


def build_images(workdir, scale):
    """A raw base with 8 data ranges, an overlay rewriting/adding 4."""
    base = os.path.join(workdir, 'base.raw')
    top = os.path.join(workdir, 'disk.qcow2')
    run('qemu-img', 'create', '-q', '-f', 'raw', base, str(2 * GiB // scale))
    run('qemu-io', '-f', 'raw', *qemu_io_writes(
        [(1 + i, i * 256 * MiB, 64 * MiB) for i in range(8)], scale), base)
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw',
        top, str(2 * GiB // scale))
    run('qemu-io', '-f', 'qcow2', *qemu_io_writes(
        [(0x80 + i, offset, 32 * MiB) for i, offset in enumerate(
            (16 * MiB, 300 * MiB, 1100 * MiB, 1900 * MiB))], scale), top)
    return base, top


def drain(stream):
    out = 0
    while chunk := stream.read(READ_SIZE):
        out += len(chunk)
    return out


def measure_convert(top, workdir):
    scratch = os.path.join(workdir, 'scratch.qcow2')
    try:
        run('qemu-img', 'convert', '-t', 'none', '-f', 'qcow2', '-O',
            'qcow2', top, scratch)
        scratch_bytes = os.stat(scratch).st_blocks * 512
        with open(scratch, 'rb') as f:
            out = 0
            while chunk := f.read(READ_SIZE):
                out += len(chunk)
        return {'bytes_read': None, 'bytes_out': out,
                'scratch_bytes': scratch_bytes}
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def measure_stream(top, encoder):
    view = nbd.NbdChainView(nbd.qemu_nbd_argv(top, 'qcow2'))
    with encoder(view) as stream:
        out = drain(stream)
        assert out == stream.size, (out, stream.size)
    return {'bytes_read': view.bytes_read, 'bytes_out': out,
            'scratch_bytes': 0}


def child(method, top, workdir):
    """Run one measurement in this (fresh) process; print JSON."""
    cache = pagecache.drop_cache([top, os.path.join(workdir, 'base.raw')])
    begin = time.monotonic()
    if method == 'convert':
        result = measure_convert(top, workdir)
    else:
        encoder = qcow2.Qcow2Stream if method == 'qcow2' else raw.RawStream
        result = measure_stream(top, encoder)
    result['seconds'] = time.monotonic() - begin
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result['peak_rss_kib'] = max(own, kids)
    result['python_rss_kib'] = own
    result['cache'] = cache
    print(json.dumps(result))


def measure(method, top, workdir):
    proc = subprocess.run(
        [sys.executable, __file__, '--child', method, '--top', top,
         '--workdir', workdir], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout)


def chain_data_bytes(top):
    out = subprocess.run(['qemu-img', 'map', '--output=json', top],
                         check=True, capture_output=True, text=True).stdout
    return sum(e['length'] for e in json.loads(out) if not e['zero'])


def summarise(runs):
    row = dict(runs[-1])
    row['seconds'] = statistics.median(r['seconds'] for r in runs)
    row['peak_rss_kib'] = max(r['peak_rss_kib'] for r in runs)
    row['all_seconds'] = [round(r['seconds'], 3) for r in runs]
    return row


def report(results, data_bytes):
    print('%-8s %8s %11s %11s %11s %10s' % (
        'method', 'seconds', 'read MiB', 'out MiB', 'scratch MiB',
        'peak RSS MiB'))
    for method, row in results.items():
        read = row['bytes_read']
        if read is None:
            # convert reads the chain's data once, then its own copy back
            read = data_bytes + row['bytes_out']
        print('%-8s %8.2f %11.1f %11.1f %11.1f %10.1f' % (
            method, row['seconds'], read / MiB, row['bytes_out'] / MiB,
            row['scratch_bytes'] / MiB, row['peak_rss_kib'] / 1024))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--workdir', default='/var/tmp')
    parser.add_argument('--scale', type=int, default=1,
                        help='divide every size by this (quick smoke runs)')
    parser.add_argument('--json', help='also write the results here')
    parser.add_argument('--child', choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument('--top', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.top, args.workdir)
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        _, top = build_images(workdir, args.scale)
        data_bytes = chain_data_bytes(top)
        runs = {method: [] for method in METHODS}
        for _ in range(args.repeat):
            for method in METHODS:
                runs[method].append(measure(method, top, workdir))
        results = {m: summarise(r) for m, r in runs.items()}
    report(results, data_bytes)
    document = {'chain_data_bytes': data_bytes, 'repeat': args.repeat,
                'results': results}
    print(json.dumps(document, indent=2))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(document, f, indent=2)


if __name__ == '__main__':
    main()
