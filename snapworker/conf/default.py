"""Options of the [DEFAULT] group: where this host keeps its disks."""

import socket

from oslo_config import cfg

opts = [
    cfg.StrOpt('host',
               default=socket.gethostname(),
               sample_default='<current_hostname>',
               help='Name of this compute host. It must equal nova-compute\'s '
                    '``host`` on the same machine: Nova addresses the worker '
                    'of the host whose disks it wants snapshotted by this '
                    'name.'),
    cfg.StrOpt('instances_path',
               default='/var/lib/nova/instances',
               help='Nova\'s ``instances_path``. A file-backed disk, and '
                    'every file of its backing chain, must resolve (after '
                    'following symlinks) to a path inside this directory, '
                    'or the worker refuses to read it.'),
    cfg.StrOpt('scratch_dir',
               default='/var/lib/snapworker/scratch',
               help='Directory for the few plans that need a full scratch '
                    'copy of the disk (``convert``). Each job uses its own '
                    'subdirectory and removes it, on success or failure.'),
    cfg.StrOpt('libvirt_uri',
               default='qemu:///system',
               help='libvirt connection URI, the same one nova-compute '
                    'uses. The worker reads domain state and disk sources '
                    'from it; it never changes a domain.'),
]


def register_opts(conf):
    conf.register_opts(opts)


def list_opts():
    return {'DEFAULT': opts}
