"""Disk sources: one module per kind of disk, behind sources.base.Source."""

import sys

from snapworker import exception
from snapworker.sources import block as block_source
from snapworker.sources import file as file_source


def open_source(root_disk, conf):
    """The Source for an instance's root disk, as its domain describes it.

    :param root_disk: a ``hypervisor.RootDisk``.
    """
    if root_disk.kind == 'file':
        return file_source.FileSource(root_disk.path, conf)
    if root_disk.kind == 'rbd' and root_disk.pool and root_disk.name:
        # Imported here: only workers with RBD disks need librados.
        from snapworker.sources import rbd as rbd_source
        return rbd_source.RbdSource(root_disk.pool, root_disk.name, conf)
    if root_disk.kind == 'block':
        return block_source.BlockSource(root_disk.path,
                                        root_disk.driver_format, conf)
    raise exception.UnsupportedDisk(
        path=root_disk.path or root_disk.name or '?',
        reason=f'{root_disk.kind} disks are not supported')


def stop_background_work():
    """Give background work of the sources (RBD flattens) a bounded end.

    Called when the worker stops. Only a module that was loaded can have
    started any, and loading rbd.py needs librados: so it is looked up,
    never imported, here.
    """
    rbd_source = sys.modules.get('snapworker.sources.rbd')
    if rbd_source is not None:
        rbd_source.FLATTENER.stop()
