"""Releasing a suspended guest at once on a reflink filesystem.

A guest Nova suspended for the snapshot waits until the worker no longer
needs its disk. Where ``instances_path`` is on a filesystem that shares
extents between files (XFS with ``reflink=1``, Btrfs), a ``FICLONE`` copy
of the top of the chain is a point-in-time copy made in milliseconds,
whatever the disk's size: the guest is released right after it, and the
plan the disk itself would get reads the copy (its backing files, Nova's
``_base``, never change): the direct write into Glance's RBD pool when it
applies, else the stream.
No data is copied: the copy shares every block with the disk until the
resumed guest writes, and only the blocks it rewrites cost space. The
payload reports those shared bytes (``shared_bytes``) apart from
``scratch_bytes`` (0).

The copy lives on the disk's own filesystem (a clone cannot cross
filesystems), in ``<instances_path>/.snapworker/reflink-<image id>/``:
journalled before it is made, removed by ``cleanup`` or, after a crash,
by ``remove_leftover``.
"""

import dataclasses
import fcntl
import os
import shutil
import tempfile

from oslo_log import log as logging

from snapworker import exception
from snapworker.sources import base
from snapworker.sources import chain

LOG = logging.getLogger(__name__)

# <linux/fs.h>: _IOW(0x94, 9, int)
FICLONE = 0x40049409
DIR_NAME = '.snapworker'
PREFIX = 'reflink-'


def _parent(conf):
    return os.path.join(os.path.realpath(conf.instances_path), DIR_NAME)


#: Probe results by instances path: a filesystem does not change kind.
_SUPPORTED = {}


def supported(conf):
    """Whether files in ``instances_path`` can be cloned (probed once)."""
    parent = _parent(conf)
    if parent not in _SUPPORTED:
        _SUPPORTED[parent] = _probe(parent)
    return _SUPPORTED[parent]


def _probe(parent):
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent) as src, \
                tempfile.TemporaryFile(dir=parent) as dst:
            src.write(b'\0' * 4096)
            src.flush()
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
    except OSError as e:
        LOG.debug('No reflink copies in %s: %s', parent, e)
        return False
    return True


def remove_leftover(conf, path):
    """Remove a copy's directory: the job's cleanup, or recovery's after
    a crash (the path then comes from a journal file). Gone is fine."""
    real = os.path.realpath(path)
    if (os.path.dirname(real) != _parent(conf)
            or not os.path.basename(real).startswith(PREFIX)):
        raise ValueError(f'{path} is not a reflink directory of '
                         f'{conf.instances_path}')
    try:
        shutil.rmtree(real)
    except FileNotFoundError:
        pass


class ReflinkPlan(base.Plan):
    """Clone the top file, release the guest, then write the clone's
    chain directly into Glance's RBD pool or stream it."""

    strategy = 'stream'

    def __init__(self, target_format, source, conf, stores=None,
                 store_id=None):
        """:param source: the inspected ``file.FileSource``.
        :param stores: Glance's stores and the one asked for, as the
            source's ``plan`` gets them: they decide the direct write.
        """
        self._source = source
        self._conf = conf
        self._workdir = None
        self._copy = None
        # The copy's plan, chosen now (its strategy is reported before it
        # runs); its view opens the copy, which exists once it runs.
        self._direct = source.direct_plan(
            target_format, stores, store_id,
            lambda: source.raw_view(self._copy))
        then = 'streamed'
        if self._direct is not None:
            self.strategy = self._direct.strategy
            then = f'written directly: {self._direct.reason}'
        super().__init__(
            target_format,
            f'guest suspended for the snapshot: released after an instant '
            f'reflink copy of its disk, which is then {then}')

    def run(self, ctx):
        pinned = self._source.pinned
        workdir = os.path.join(_parent(self._conf), PREFIX + ctx.image_id)
        ctx.track(base.REFLINK_DIR, workdir)
        # Cleanup's from here on, even if what follows fails half-way.
        self._workdir = workdir
        shutil.rmtree(workdir, ignore_errors=True)
        os.mkdir(workdir, 0o700)
        path = os.path.join(workdir, 'disk')
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.ioctl(fd, FICLONE, pinned.top.fd)
            shared = os.fstat(fd).st_blocks * 512
        finally:
            os.close(fd)
        self._copy = copy = chain.open_file_chain(
            path, pinned.format, self._conf.instances_path)
        # The copy must be the same disk: the same size, the same backing
        # files, pinned.
        if copy.virtual_size != pinned.virtual_size or [
                layer.identity for layer in copy.layers[1:]] != [
                layer.identity for layer in pinned.layers[1:]]:
            raise exception.SourceChanged(
                what=f'the reflink copy of {pinned.top.path} is not the '
                     f'same disk (size or backing files)')
        # A point-in-time copy exists: the guest may run again.
        ctx.source_released()
        inner = self._direct or self._source.stream_plan(
            copy, self.target_format)
        result = inner.run(CopyContext(ctx, copy)) or base.PlanResult()
        return dataclasses.replace(result, shared_bytes=shared)

    def cleanup(self):
        """The copy first (local, quick), then what the copy's plan made
        (the direct write's RBD image, if it could not be registered)."""
        copy, self._copy = self._copy, None
        if copy is not None:
            copy.close()
        workdir, self._workdir = self._workdir, None
        if workdir:
            self._remove(base.REFLINK_DIR, workdir, remove_leftover,
                         self._conf, workdir)
        if self._direct is not None:
            # Its leftovers join this plan's (it never raises).
            self._leftovers += [item for item in self._direct.cleanup()
                                if item not in self._leftovers]
        return super().cleanup()


class CopyContext:
    """The job's context, as the plan that reads the copy sees it.

    That plan says ``source_released`` once it has read its source (the
    job's real release happened at the copy, so the job ignores it): here
    the copy is checked unchanged first, before the plan registers or
    finishes anything (the direct write registers its location after it).
    Everything else is the job's.
    """

    def __init__(self, ctx, copy):
        self._ctx = ctx
        self._copy = copy

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def source_released(self):
        self._copy.verify_unchanged()
        self._ctx.source_released()
