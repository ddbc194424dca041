"""Options of the [rbd] group: Ceph access for RBD-backed disks."""

from oslo_config import cfg

group = cfg.OptGroup('rbd', title='Ceph RBD options')

opts = [
    cfg.StrOpt('ceph_conf',
               default='/etc/ceph/ceph.conf',
               help='ceph.conf of the cluster holding instance disks.'),
    cfg.StrOpt('user',
               default='nova',
               help='Ceph client name (without ``client.``) the worker '
                    'connects as. It needs read access to the instances '
                    'pool and, for the clone plan and ``direct_write``, '
                    'write access to the Glance images pool.'),
    cfg.StrOpt('keyring',
               help='Keyring of ``user``; unset uses the keyring named in '
                    'ceph.conf.'),
    cfg.IntOpt('connect_timeout',
               default=10,
               min=1,
               help='Seconds to wait for the Ceph cluster to answer '
                    '(librados ``client_mount_timeout``: the monitor '
                    'handshake is what hangs when the cluster is away).'),
    cfg.StrOpt('glance_store',
               help='Id of the Glance store (an ``enabled_backends`` name '
                    'of Glance) that snapshots of RBD disks go to. Unset: '
                    'an rbd store of Glance in the same Ceph cluster as '
                    'the disk if Glance has one (the snapshot is then a '
                    'copy-on-write clone, no data moves), else Glance\'s '
                    'default store. Set it to a non-rbd store to always '
                    'stream the data into that store instead.'),
    cfg.StrOpt('glance_pool',
               help='Pool of Glance\'s rbd store, in the same Ceph cluster '
                    'as the instance disks. Only needed when the worker '
                    'cannot read the store details from Glance (``GET '
                    '/v2/info/stores/detail`` needs the admin role, and '
                    'single-store Glances do not offer it); details Glance '
                    'reports take precedence. Unset and undiscoverable: '
                    'no clone plan, the data is streamed.'),
    cfg.BoolOpt('direct_write',
                default=False,
                help='Write snapshots of file and block disks (raw target) '
                     'straight into Glance\'s rbd store when the image '
                     'goes to one ([glance] snapshot_store, else Glance\'s '
                     'default store) in the cluster of ``ceph_conf``: the '
                     'worker creates the RBD image as Glance would, writes '
                     'only the disk\'s data (the image stays thin), hashes '
                     'the whole disk while reading and registers the '
                     'location with that checksum (the ``direct`` '
                     'strategy). Glance\'s API never sees the bytes, so '
                     'its ingest rate no longer bounds the snapshot. The '
                     'worker\'s Ceph ``user`` then needs write access to '
                     'Glance\'s pool, as Nova\'s ``direct_snapshot`` does; '
                     'Glance needs its location API (``show_multiple_'
                     'locations`` or the service role for API 2.17).'),
    cfg.IntOpt('direct_writes_in_flight',
               default=8,
               min=1,
               help='RBD writes the direct strategy keeps outstanding '
                    '(librbd aio_write); each holds one ``[worker] '
                    'chunk_size`` buffer.'),
    cfg.StrOpt('flatten',
               default='background',
               choices=[
                   ('background', 'The image is active right after the '
                                  'clone; a worker thread then flattens the '
                                  'clone (deep-flatten, snapshots '
                                  'included) and removes the snapshot of '
                                  'the instance disk.'),
                   ('sync', 'Flatten before the image is registered, as '
                            'Nova\'s direct_snapshot does: the image is '
                            'independent of the instance disk when it '
                            'becomes active, at the cost of copying the '
                            'allocated data inside Ceph first.'),
                   ('never', 'Keep the copy-on-write clone (needs clone '
                             'format v2, else sync is used). Deleting the '
                             'instance disk then only succeeds for clients '
                             'with ``rbd_move_parent_to_trash_on_remove = '
                             'true`` (Nova\'s ceph.conf): librbd moves the '
                             'disk to the trash and purges it when the last '
                             'clone goes.'),
               ],
               help='When the clone of a snapshot stops depending on the '
                    'instance disk it was cloned from.'),
    cfg.IntOpt('max_clone_depth',
               default=3,
               min=1,
               help='Longest parent chain a snapshot clone may have. An '
                    'instance disk Nova cloned from a Glance image has '
                    'depth 1 and its snapshot clone depth 2; every level '
                    'adds a redirected read for data not yet written '
                    'below it. A clone that would be deeper is flattened '
                    'before the image is registered, whatever ``flatten`` '
                    'says.'),
]


def register_opts(conf):
    conf.register_group(group)
    conf.register_opts(opts, group=group)


def list_opts():
    return {group: opts}
