"""Disk sources: one module per kind of disk, behind sources.base.Source."""

import sys

from snapworker import exception
from snapworker.sources import base
from snapworker.sources import block as block_source
from snapworker.sources import convert
from snapworker.sources import file as file_source
from snapworker.sources import reflink


def open_source(root_disk, conf):
    """The Source for an instance's root disk, as its domain describes it.

    :param root_disk: a ``hypervisor.RootDisk``.
    """
    if root_disk.kind == 'file':
        return file_source.FileSource(root_disk.path,
                                      root_disk.driver_format, conf)
    if root_disk.kind == 'rbd' and root_disk.pool and root_disk.name:
        return _rbd().RbdSource(root_disk.pool, root_disk.name, conf)
    if root_disk.kind == 'block':
        return block_source.BlockSource(root_disk.path,
                                        root_disk.driver_format, conf)
    raise exception.UnsupportedDisk(
        path=root_disk.path or root_disk.name or '?',
        reason=f'{root_disk.kind} disks are not supported')


def _rbd():
    # Imported here: only workers with RBD disks need librados.
    from snapworker.sources import rbd as rbd_source
    return rbd_source


def remove_leftover(conf, kind, ref):
    """Remove one resource a job of a crashed worker left behind.

    What recovery (journal.py) calls for each ``job.track``-ed resource
    that no one took over; gone already is success.

    :raises ValueError: a kind or ref this worker never journals.
    """
    if kind == base.SCRATCH_DIR:
        convert.remove_scratch_dir(conf, ref)
    elif kind == base.REFLINK_DIR:
        reflink.remove_leftover(conf, ref)
    elif kind in (base.RBD_SNAPSHOT, base.RBD_CLONE):
        _rbd().remove_leftover(conf, kind, ref)
    else:
        raise ValueError(f'unknown resource kind {kind!r}')


def resume_background(conf, owner, kind, ref, details, done):
    """Restart background work a stopped worker did not finish.

    :param done: called by that work once it has finished with ``ref``.
    """
    if owner == base.FLATTENER and kind == base.RBD_SNAPSHOT:
        _rbd().resume_flatten(conf, ref, details['clone'], done)
    else:
        raise ValueError(f'cannot resume {owner} work on {kind} {ref}')


def stop_background_work():
    """Give background work of the sources (RBD flattens) a bounded end.

    Called when the worker stops. Only a module that was loaded can have
    started any, and loading rbd.py needs librados: so it is looked up,
    never imported, here.
    """
    rbd_source = sys.modules.get('snapworker.sources.rbd')
    if rbd_source is not None:
        rbd_source.FLATTENER.stop()
