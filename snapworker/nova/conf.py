"""Options of the [snapworker] group in nova.conf, and its RPC version cap.

They configure how nova-compute hands cold snapshots to the worker of its
own host and how long it waits for it. The worker itself is configured in
snapworker.conf; the messaging settings the two must share are listed in
``snapworker.nova``'s docstring.

These, and ``[upgrade_levels] snapworker`` beside Nova's own version
caps, are the only options the Nova side adds to nova-compute:
``register_opts`` is called once, by ``driver.py``.
"""

from oslo_config import cfg

from snapworker import rpcapi
from snapworker.nova import disks

group = cfg.OptGroup(
    'snapworker',
    title='snapworker options',
    help='Cold snapshots delegated by SnapworkerLibvirtDriver to the '
         'snapworker-worker of this compute host.')

opts = [
    cfg.StrOpt('topic',
               default=rpcapi.DEFAULT_TOPIC,
               help='RPC topic of the workers: the worker\'s [worker] '
                    'topic. Requests go to the worker whose host is this '
                    'nova-compute\'s ``host``.'),
    cfg.ListOpt('disk_types',
                default=list(disks.DELEGATED_TYPES),
                help='Root disk types, as Nova names them, whose cold '
                     'snapshots go to the worker: qcow2 and raw (file '
                     'disks, streamed), rbd (``images_type = rbd``: '
                     'copy-on-write clone when Glance has an rbd store in '
                     'the same Ceph cluster and the target is raw, else a '
                     'sparse stream) and lvm (any block device under /dev, '
                     'streamed). Other types, such as ploop, and types '
                     'removed from this list take Nova\'s own path.'),
    cfg.IntOpt('accept_timeout',
               default=120,
               min=1,
               help='Seconds to wait for the worker to start a snapshot '
                    '(``snapshot.create.start``). A worker that is not '
                    'running never answers: the cast is dropped or waits '
                    'in its queue. After this the snapshot fails, the '
                    'guest is resumed and Nova deletes the image. It '
                    'includes the time a request waits behind the '
                    'worker\'s [worker] max_concurrent_snapshots.'),
    cfg.IntOpt('liveness_timeout',
               default=5,
               min=0,
               help='Seconds to wait for the worker to answer a status '
                    'call (RPC 1.1) before the guest is suspended: with '
                    'no worker on this host the snapshot fails at once '
                    'and the guest is never touched. 0 skips the check '
                    '(accept_timeout then tells).'),
    cfg.IntOpt('timeout_base',
               default=300,
               min=1,
               help='Seconds a started snapshot may take regardless of its '
                    'size; see timeout_per_gib.'),
    cfg.IntOpt('timeout_per_gib',
               default=60,
               min=0,
               help='Seconds added to timeout_base per GiB of the disk\'s '
                    'virtual size. A started snapshot that has not ended '
                    'in time fails and Nova deletes the image.'),
    cfg.IntOpt('status_poll_interval',
               default=10,
               min=1,
               help='Seconds without a notification after which Glance is '
                    'asked for the image status, in case a notification '
                    'was lost: ``saving`` or ``active`` means the worker '
                    'started or finished, a deleted image means it '
                    'failed.'),
]


def register_opts(conf):
    conf.register_group(group)
    conf.register_opts(opts, group=group)
    rpcapi.register_opts(conf)


def list_opts():
    """Entry point for oslo-config-generator (namespace snapworker.nova)."""
    return [(group, opts)] + rpcapi.list_opts()
