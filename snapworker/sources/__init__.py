"""Disk sources: one module per kind of disk, behind sources.base.Source."""

from snapworker import exception
from snapworker.sources import base
from snapworker.sources import block as block_source
from snapworker.sources import convert
from snapworker.sources import file as file_source
from snapworker.sources import reflink


def open_source(root_disk, conf, flattener=None):
    """The Source for an instance's root disk, as its domain describes it.

    :param root_disk: a ``hypervisor.RootDisk``.
    :param flattener: the worker's ``flattener.Flattener``, for RBD clones
        flattened in the background.
    """
    if root_disk.kind == 'file':
        return file_source.FileSource(root_disk.path,
                                      root_disk.driver_format, conf)
    if root_disk.kind == 'rbd' and root_disk.pool and root_disk.name:
        return _rbd().RbdSource(root_disk.pool, root_disk.name, conf,
                                flattener)
    if root_disk.kind == 'block':
        return block_source.BlockSource(root_disk.path,
                                        root_disk.driver_format, conf)
    raise exception.UnsupportedDisk(
        path=root_disk.path or root_disk.name or '?',
        reason=f'{root_disk.kind} disks are not supported')


# Imported when needed: only workers with RBD disks need librados.
def _rbd():
    from snapworker.sources import rbd as rbd_source
    return rbd_source


def _ceph():
    from snapworker.sources import ceph
    return ceph


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
    elif kind in (base.RBD_SNAPSHOT, base.RBD_CLONE, base.RBD_IMAGE):
        _ceph().remove_leftover(conf, kind, ref)
    else:
        raise ValueError(f'unknown resource kind {kind!r}')


def resume_background(flattener, owner, kind, ref, details, done):
    """Restart background work a stopped worker did not finish.

    The clone stayed valid (a partial flatten is), so a flatten simply
    starts over: flatten the clone, then remove the snapshot ``ref``.

    :param flattener: the worker's ``flattener.Flattener``.
    :param done: called by that work once it has finished with ``ref``.
    :raises ValueError: work or refs this worker never journals.
    """
    if owner == base.FLATTENER and kind == base.RBD_SNAPSHOT:
        ceph = _ceph()
        flattener.submit(ceph.worker_clone(details.get('clone')),
                         ceph.worker_snapshot(ref), on_done=done)
    else:
        raise ValueError(f'cannot resume {owner} work on {kind} {ref}')
