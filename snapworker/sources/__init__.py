"""Disk sources: one module per kind of disk, behind sources.base.Source."""

from snapworker import exception
from snapworker.sources import block as block_source
from snapworker.sources import file as file_source


def open_source(root_disk, conf):
    """The Source for an instance's root disk, as its domain describes it.

    :param root_disk: a ``hypervisor.RootDisk``.
    """
    if root_disk.kind == 'file':
        return file_source.FileSource(root_disk.path, conf)
    if root_disk.kind == 'block':
        return block_source.BlockSource(root_disk.path,
                                        root_disk.driver_format, conf)
    raise exception.UnsupportedDisk(
        path=root_disk.path or root_disk.name or '?',
        reason=f'{root_disk.kind} disks are not supported')
