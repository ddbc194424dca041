"""Nova's way, kept for what a stream cannot do: convert into scratch.

``qemu-img convert`` copies the disk into ``scratch_dir`` and the copy is
uploaded. A single-pass stream cannot write compressed qcow2 clusters, and
a guest Nova suspended for the snapshot resumes sooner after one local
read than after a whole upload (``[worker] suspended_guest_plan``). File
and block sources both use it.
"""

import os
import shutil

from snapworker import utils
from snapworker.sources import base
from snapworker.streams import passthrough

#: Scratch directories are ``<scratch_dir>/convert-<image id>``: named
#: before they exist, so the journal can list one before it is created.
SCRATCH_PREFIX = 'convert-'


def remove_scratch_dir(conf, path):
    """Remove a job's scratch directory: its own cleanup, or recovery's
    after a crash.

    The path may come from a journal file, so only a ``convert-*``
    directory directly inside ``scratch_dir`` is ever removed; gone
    already is fine.
    """
    parent = os.path.realpath(conf.scratch_dir)
    real = os.path.realpath(path)
    if (os.path.dirname(real) != parent
            or not os.path.basename(real).startswith(SCRATCH_PREFIX)):
        raise ValueError(f'{path} is not a scratch directory of '
                         f'{conf.scratch_dir}')
    try:
        shutil.rmtree(real)
    except FileNotFoundError:
        pass


def release_first_plan(target_format, source, conf):
    """The convert plan, for a guest that waits for its disk."""
    return ConvertPlan(
        target_format,
        'guest suspended for the snapshot: local copy first, so it '
        'resumes after one disk read rather than after the upload',
        source, conf)


def compressed_plan(source, conf):
    return ConvertPlan(
        'qcow2',
        'compressed qcow2 requested: a single-pass stream cannot '
        'compress, converted through scratch space',
        source, conf, extra_args=('-c',))


class ConvertPlan(base.Plan):
    """``qemu-img convert`` of the pinned chain, then upload the copy.

    qemu-img reads the chain through the pinned descriptors (the chain's
    ``json:`` spec), confined like every helper. The scratch copy lives in
    its own directory under ``scratch_dir``, journalled before it is made,
    and is removed by ``cleanup`` whatever happened (or, after a crash, by
    recovery through ``remove_scratch_dir``).
    """

    strategy = 'convert'

    def __init__(self, target_format, reason, source, conf, extra_args=()):
        """:param source: a ``chain.PinnedSource``, inspected."""
        super().__init__(target_format, reason)
        self._source = source
        self._conf = conf
        self._extra_args = tuple(extra_args)
        self._workdir = None

    def run(self, ctx):
        scratch_dir = self._conf.scratch_dir
        workdir = os.path.join(os.path.abspath(scratch_dir),
                               SCRATCH_PREFIX + ctx.image_id)
        ctx.track(base.SCRATCH_DIR, workdir)
        # Cleanup's from here on, even if what follows fails half-way.
        self._workdir = workdir
        os.makedirs(scratch_dir, exist_ok=True)
        # Only a job for the same image can have made it, and the journal
        # lets one such job run at a time: what is there is a leftover.
        shutil.rmtree(workdir, ignore_errors=True)
        os.mkdir(workdir, 0o700)
        copy = os.path.join(workdir, f'image.{self.target_format}')
        rate = self._conf.worker.max_read_bytes_per_second
        spec = self._source.pinned.qemu_spec(
            direct=self._source.bypass_cache)
        read = utils.run_counting_reads(
            ['qemu-img', 'convert', '-t', 'none', '-O', self.target_format,
             *(('-r', str(rate)) if rate else ()), *self._extra_args, spec,
             copy],
            self._conf, what='qemu-img convert', check=ctx.check_cancelled)
        ctx.add_bytes_read(read)
        ctx.add_scratch_bytes(os.stat(copy).st_blocks * 512)
        ctx.source_released()
        chunk = self._conf.worker.chunk_size
        with passthrough.FileStream(copy, chunk) as stream:
            # The copy's reads are not the disk's: qemu-img's were.
            ctx.upload(stream, self.target_format, reads_source=False)

    def cleanup(self):
        workdir, self._workdir = self._workdir, None
        if workdir:
            self._remove(base.SCRATCH_DIR, workdir, remove_scratch_dir,
                         self._conf, workdir)
        return super().cleanup()
