"""The body of tools/run-demo (see there); prints one JSON line last.

Options size the instance disk, so the same end-to-end run also serves the
memory benchmark (``--size 10G``): the JSON reports the worker's peak RSS.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import glanceclient
import libvirt

from tests.services import __main__ as services
from tests.services import glance as glance_service
from tests.services import worker as worker_service

BIN = os.path.dirname(sys.executable)
HOST = 'demo-compute'


def log(message):
    print(message, file=sys.stderr, flush=True)


def run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def make_nova_disk(instances, size, base_data):
    """A qcow2 overlay on a raw base, as Nova's default image backend.

    The base holds ``base_data`` of data; the overlay rewrites 64M of it
    and zeroes 16M, as a guest would.
    """
    base = os.path.join(instances, '_base', 'a1b2c3d4e5')
    disk = os.path.join(instances, str(uuid.uuid4()), 'disk')
    os.makedirs(os.path.dirname(base))
    os.makedirs(os.path.dirname(disk))
    run('qemu-img', 'create', '-q', '-f', 'raw', base, size)
    run('qemu-io', '-f', 'raw', '-c', f'write -P 0x42 0 {base_data}', base)
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw',
        disk, size)
    run('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x17 64M 64M',
        '-c', 'write -z 128M 16M', disk)
    return disk


def define_domain(conn, disk):
    """A shut-off domain; ``conn`` must stay open for it to persist.

    libvirt's test driver drops its state when its last connection closes.
    """
    instance_uuid = str(uuid.uuid4())
    conn.defineXML(
        f"<domain type='test'><name>instance-demo</name>"
        f"<uuid>{instance_uuid}</uuid><memory>65536</memory>"
        f"<os><type>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        f"</devices></domain>")
    return instance_uuid


def main(argv=None):
    parser = argparse.ArgumentParser(prog='tools/run-demo')
    parser.add_argument('--size', default='1G',
                        help='virtual size of the instance disk')
    parser.add_argument('--base-data', default='192M',
                        help='data written into the _base file')
    parser.add_argument('--format', choices=('raw', 'qcow2'),
                        help='target format (default: as the disk)')
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix='snapworker-demo-', dir='/var/tmp')
    os.chmod(work, 0o755)
    state_dir = os.path.join(work, 'services')
    worker = conn = None
    result = {'identical': False}
    try:
        state = services.up(state_dir, with_ceph=False)
        instances = os.path.join(work, 'instances')
        disk = make_nova_disk(instances, args.size, args.base_data)
        conn = libvirt.open(state['libvirt_uri'])
        instance_uuid = define_domain(conn, disk)
        log(f'instance {instance_uuid}: disk {disk} (qcow2 overlay on '
            f'raw _base), domain shut off')

        conf = os.path.join(work, 'snapworker.conf')
        worker_service.write_config(
            conf, host=HOST, services=state, instances_path=instances,
            scratch_dir=os.path.join(work, 'scratch'),
            extra={'worker.progress_interval': 1, 'debug': False})
        worker = worker_service.WorkerProcess(
            conf, os.path.join(work, 'worker.log')).start()
        log(f'snapworker-worker running as host {HOST}')

        client = glance_service.GlanceService(
            url=state['glance_url'], state_dir='', log_path='', pid=0,
            pipeline='trusted-headers').client()
        image_id = client.images.create(name='demo-snapshot')['id']
        log(f'image {image_id} queued; casting the snapshot:')

        headers = glance_service.IDENTITY_HEADERS
        t0 = time.monotonic()
        cli = subprocess.run(
            [os.path.join(BIN, 'snapworker'), '--config-file', conf,
             # The CLI's demo mode for a Glance without Keystone.
             '--os-auth-type', 'none',
             '--noauth-user-id', headers['X-User-Id'],
             '--noauth-project-id', headers['X-Project-Id'],
             '--noauth-roles', 'admin,member',
             'snapshot', instance_uuid, '--host', HOST,
             '--image-id', image_id, '--timeout', '3600', '--format', 'json',
             *(['--disk-format', args.format] if args.format else [])],
            capture_output=True, text=True)
        wall = time.monotonic() - t0
        worker_rss = worker.peak_rss()
        events = [json.loads(line) for line in cli.stdout.splitlines()]
        for event in events:
            p = event['payload']
            log(f"  {event['event_type']:<26} strategy={p['strategy']} "
                f"read={p['bytes_read']} uploaded={p['bytes_uploaded']} "
                f"scratch={p['scratch_bytes']}")
        final = events[-1]['payload'] if events else {}
        status = client.images.get(image_id)['status'] if events and (
            events[-1]['event_type'] == 'snapshot.create.end') else 'deleted'
        identical = False
        if status == 'active':
            stored = os.path.join(work, 'downloaded.img')
            with open(stored, 'wb') as f:
                for chunk in client.images.data(image_id):
                    f.write(chunk)
            identical = subprocess.run(
                ['qemu-img', 'compare', disk, stored],
                capture_output=True).returncode == 0
            client.images.delete(image_id)
        result = {
            'image_id': image_id, 'status': status,
            'strategy': final.get('strategy'),
            'source_format': final.get('source_format'),
            'target_format': final.get('target_format'),
            'virtual_size': final.get('virtual_size'),
            'bytes_read': final.get('bytes_read'),
            'bytes_uploaded': final.get('bytes_uploaded'),
            'scratch_bytes': final.get('scratch_bytes'),
            'source_held_seconds': final.get('source_held_seconds'),
            'duration_seconds': final.get('duration_seconds'),
            'request_to_end_seconds': round(wall, 3),
            'identical': identical,
            'worker_peak_rss_bytes': worker_rss,
            'error': final.get('error_message'),
        }
    except (RuntimeError, subprocess.CalledProcessError,
            glanceclient.exc.BaseException, libvirt.libvirtError) as e:
        result['error'] = str(e)
    finally:
        if worker is not None:
            worker.stop()
        if conn is not None:
            conn.close()
        services.down(state_dir)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, sort_keys=True))
    return 0 if result.get('identical') else 1


if __name__ == '__main__':
    sys.exit(main())
