"""Options of the [worker] group: RPC, admission, limits, journal."""

from oslo_config import cfg
from oslo_utils import units

group = cfg.OptGroup('worker', title='Snapshot worker options')

opts = [
    cfg.StrOpt('topic',
               default='snapworker',
               help='RPC topic the worker listens on. Each worker listens '
                    'on this topic with ``server`` set to its ``host``, '
                    'because a local disk can only be read on its host.'),
    cfg.IntOpt('max_concurrent_snapshots',
               default=2,
               min=1,
               help='Snapshots run at the same time on this host. Requests '
                    'beyond this wait, in arrival order. Each running '
                    'snapshot reads one disk and holds one upload to '
                    'Glance, so this bounds disk and network load.'),
    cfg.FloatOpt('progress_interval',
                 default=5.0,
                 min=0.0,
                 help='Seconds between two ``snapshot.progress`` '
                      'notifications of one snapshot.'),
    cfg.IntOpt('active_timeout',
               default=600,
               min=1,
               help='Seconds to wait, after the image data is in Glance, '
                    'for Glance to report the image ``active``.'),
    cfg.StrOpt('suspended_guest_plan',
               default='release_first',
               choices=[
                   ('release_first',
                    'Copy the disk into scratch_dir first (Nova\'s way) '
                    'and upload the copy: the guest resumes as soon as '
                    'the local copy exists.'),
                   ('stream',
                    'Stream as for a shut-off instance: no scratch space, '
                    'one read, but the guest waits for the whole upload.'),
               ],
               help='Plan for a file or block disk whose guest Nova '
                    'suspended for the snapshot (the domain has a managed '
                    'save image) and resumes when the worker releases the '
                    'disk. A stream holds the disk until Glance has taken '
                    'every byte; a local copy releases it after one disk '
                    'read. RBD disks are released at once either way (an '
                    'RBD snapshot), and instances Nova found shut off '
                    'always stream.'),
    cfg.BoolOpt('compress_qcow2',
                default=False,
                help='Compress qcow2 snapshots, like Nova\'s [libvirt] '
                     'snapshot_compression. Compressed clusters cannot be '
                     'generated in one pass, so this falls back to '
                     '``qemu-img convert -c`` through scratch_dir: smaller '
                     'images at the cost of a full scratch copy.'),
    cfg.IntOpt('chunk_size',
               default=4 * units.Mi,
               min=65536,
               help='Bytes read from a disk at a time. Memory used by one '
                    'snapshot is a small multiple of this, whatever the '
                    'size of the disk.'),
    cfg.StrOpt('journal_dir',
               default='/var/lib/snapworker/journal',
               help='Directory of the journal: one small JSON record per '
                    'snapshot in progress, naming what it has created so '
                    'far (scratch directories, RBD snapshots and clones). '
                    'A worker that was killed or crashed cleans up after '
                    'the snapshots it was running when it starts again, '
                    'from these records. It must survive a reboot (not a '
                    'tmpfs) and be private to this worker: records hold '
                    'the requesting user\'s token, and the worker makes '
                    'the directory mode 0700.'),
    cfg.StrOpt('read_cache',
               default='bypass',
               choices=[
                   ('bypass', 'Leave the page cache as it was: the worker '
                              'drops what it read, QEMU helpers read with '
                              'O_DIRECT (where the filesystem allows).'),
                   ('keep', 'Read through the page cache.'),
               ],
               help='Whether snapshot reads may fill the host\'s page '
                    'cache, which belongs to the running guests.'),
    cfg.StrOpt('io_priority',
               default='best-effort:7',
               regex=r'^(normal|idle|best-effort:[0-7])$',
               help='I/O priority of snapshot reads (``ionice`` classes): '
                    '``normal`` leaves it as it is, ``idle`` reads only '
                    'when no one else does, ``best-effort:N`` (0 high to 7 '
                    'low) shares. Set on the job\'s thread and inherited '
                    'by the qemu-img and qemu-nbd it starts.'),
    cfg.IntOpt('max_read_bytes_per_second',
               default=0,
               min=0,
               help='Cap on the bytes per second one snapshot reads from '
                    'its disk (streams, and qemu-img convert\'s -r); 0 '
                    'means no cap.'),
    cfg.BoolOpt('verify_upload',
                default=True,
                help='Hash every byte uploaded (md5 and [glance] '
                     'hash_algorithm, on a thread of its own) and fail the '
                     'snapshot when the active image\'s checksum or '
                     'os_hash_value differ: the image is then deleted. '
                     'Costs about as much CPU as Glance\'s own hashing.'),
    cfg.IntOpt('max_request_age',
               default=120,
               min=0,
               help='Seconds after it was sent (RPC 1.1 ``sent_at``) that a '
                    'request is still run when it reaches a slot. Casts '
                    'wait in the queue while the worker is down, and Nova '
                    'gives up after ``[snapworker] accept_timeout`` (120 '
                    's by default) and deletes the image: an older request '
                    'ends with an error and touches nothing. Keep it at '
                    'Nova\'s accept_timeout. 0 runs requests of any age.'),
    cfg.IntOpt('max_virtual_size',
               default=units.Ti,
               min=0,
               help='Largest virtual disk size, in bytes, the worker '
                    'snapshots (default 1 TiB, Glance\'s default '
                    '``image_size_cap``). A qcow2 header can claim any '
                    'size, and a raw target of a huge sparse disk streams '
                    'zeros until Glance\'s store is full; such a disk is '
                    'refused before a byte moves. A request from Nova also '
                    'bounds it by the root disk size the flavor gave the '
                    'instance. 0 means no limit.'),
    cfg.ListOpt('block_device_prefixes',
                default=[],
                help='Path prefixes a block device root disk (Nova\'s '
                     '``images_type = lvm``) must start with, as the '
                     'domain XML names it: Nova\'s volume group, e.g. '
                     '``/dev/nova-vg/`` (end a directory with ``/``). '
                     'Empty refuses every block device, so no other '
                     'device of the host can be read.'),
    cfg.IntOpt('helper_address_space',
               default=2 * units.Gi,
               min=64 * units.Mi,
               help='Address space limit, in bytes, of qemu-img and '
                    'qemu-nbd, which parse images the guest wrote. Nova '
                    'runs ``qemu-img info`` under 1 GiB; a compressing '
                    '``qemu-img convert`` also maps a stack per thread of '
                    'its thread pool (8 MiB each, up to 64 threads), so '
                    'the default leaves it room (qemu-nbd peaks at ~270 '
                    'MiB).'),
    cfg.IntOpt('helper_cpu_time',
               default=3600,
               min=1,
               help='CPU time limit, in seconds, of qemu-img and qemu-nbd. '
                    'A convert of a large disk with compression needs '
                    'minutes of CPU; the limit stops a helper a crafted '
                    'image keeps busy.'),
    cfg.IntOpt('helper_stall_timeout',
               default=120,
               min=1,
               help='Seconds a helper (qemu-nbd answering one request, '
                    'qemu-img convert doing I/O) may make no progress '
                    'before it is killed and its snapshot fails, freeing '
                    'its slot.'),
]


def register_opts(conf):
    conf.register_group(group)
    conf.register_opts(opts, group=group)


def list_opts():
    return {group: opts}
