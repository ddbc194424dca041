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
                    'pool and, for the clone plan, write access to the '
                    'Glance images pool.'),
    cfg.StrOpt('keyring',
               help='Keyring of ``user``; unset uses the keyring named in '
                    'ceph.conf.'),
    cfg.IntOpt('connect_timeout',
               default=10,
               min=1,
               help='Seconds to wait for the Ceph cluster to answer.'),
]


def register_opts(conf):
    conf.register_group(group)
    conf.register_opts(opts, group=group)


def list_opts():
    return {group: opts}
