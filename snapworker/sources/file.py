"""Disk files (Nova's ``images_type`` raw, qcow2 and flat) and their chains.

The disk and every file of its backing chain must lie inside
``instances_path``; a qcow2 whose backing file points elsewhere (say
/etc/shadow) is refused before anything is read.
"""

import json
import os
import shutil

from snapworker import exception
from snapworker import streams
from snapworker import utils
from snapworker.sources import base
from snapworker.streams import extents
from snapworker.streams import nbd
from snapworker.streams import passthrough

_READABLE_FORMATS = ('raw', 'qcow2')


#: Scratch directories are ``<scratch_dir>/convert-<image id>``: named
#: before they exist, so the journal can list one before it is created.
_SCRATCH_PREFIX = 'convert-'


def _inside(path, directory):
    directory = os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def remove_scratch_dir(conf, path):
    """Remove a scratch directory a job of a crashed worker left.

    The path comes from a journal file, so only a ``convert-*`` directory
    directly inside ``scratch_dir`` is ever removed; gone already is fine.
    """
    parent = os.path.realpath(conf.scratch_dir)
    real = os.path.realpath(path)
    if (os.path.dirname(real) != parent
            or not os.path.basename(real).startswith(_SCRATCH_PREFIX)):
        raise ValueError(f'{path} is not a scratch directory of '
                         f'{conf.scratch_dir}')
    try:
        shutil.rmtree(real)
    except FileNotFoundError:
        pass


class FileSource(base.Source):
    kind = 'file'

    def __init__(self, path, conf, allowed_dir=None):
        """:param allowed_dir: where the chain may live; instances_path
            unless an operator names a disk directly (``snapworker
            stream``).
        """
        self.path = path
        self._conf = conf
        self._allowed_dir = allowed_dir or conf.instances_path
        self.facts = None
        self._self_contained = False

    def _check_inside_instances_path(self, path):
        real = os.path.realpath(path)
        if not _inside(real, self._allowed_dir):
            raise exception.DiskOutsideInstancesPath(
                path=path, real_path=real,
                instances_path=self._allowed_dir)
        return real

    def _qemu_img_info(self):
        out = utils.execute('qemu-img', 'info', '--output=json',
                            '--backing-chain', '--force-share', self.path)
        return json.loads(out)

    def inspect(self):
        real = self._check_inside_instances_path(self.path)
        if not os.path.isfile(real):
            raise exception.UnsupportedDisk(path=self.path,
                                            reason='not a regular file')
        chain = self._qemu_img_info()
        for layer in chain:
            self._check_layer(layer)
        top = chain[0]
        # Internal snapshots would be uploaded with the file (old guest
        # data the user did not ask to publish), and a dirty lazy-refcount
        # image needs repair first: both are read through qemu-nbd, which
        # exports only the active layer, never as the file itself.
        self._self_contained = (len(chain) == 1 and not top.get('snapshots')
                                and not top.get('dirty-flag'))
        self.facts = base.SourceFacts(
            kind=self.kind, format=top['format'],
            virtual_size=top['virtual-size'], location=real,
            backing_chain=tuple(layer['filename'] for layer in chain[1:]))
        return self.facts

    def _check_layer(self, layer):
        filename = layer['filename']
        # A json: or protocol filename (nbd:, http:) is not a local file.
        if not filename.startswith('/'):
            raise exception.UnsupportedDisk(
                path=self.path, reason=f'backing file {filename!r} is not '
                                       f'a local file')
        self._check_inside_instances_path(filename)
        fmt = layer.get('format')
        if fmt not in _READABLE_FORMATS:
            raise exception.UnsupportedDisk(
                path=self.path, reason=f'{filename} has format {fmt}')
        if layer.get('encrypted'):
            raise exception.UnsupportedDisk(
                path=self.path, reason=f'{filename} is encrypted')
        data = layer.get('format-specific', {}).get('data', {})
        if data.get('data-file'):
            raise exception.UnsupportedDisk(
                path=self.path, reason=f'{filename} has an external data '
                                       f'file')
        if data.get('corrupt'):
            raise exception.UnsupportedDisk(
                path=self.path, reason=f'{filename} is marked corrupt')

    def plan(self, target_format, store=None, release_first=False):
        """Pick the plan; only compressed qcow2 output needs scratch space.

        A guest suspended for the snapshot (``release_first``) resumes
        sooner after a local copy than after a whole upload, so it gets
        the convert plan: Nova's way, chosen for that reason.

        ============================  =======  ============================
        source                        target   body
        ============================  =======  ============================
        qcow2, no backing file        qcow2    the file itself
        raw                           raw      the file, holes not read
        raw                           qcow2    generated qcow2 from the
                                               file's SEEK_DATA map
        qcow2 with a backing chain,   qcow2    generated qcow2 from the
        internal snapshots or dirty            chain, read via qemu-nbd
        qcow2 (any chain)             raw      the chain via qemu-nbd
        anything, compression asked   qcow2    convert (scratch copy)
        ============================  =======  ============================
        """
        facts = self.facts
        chunk = self._conf.worker.chunk_size
        path = facts.location
        if target_format == 'qcow2' and self._conf.worker.compress_qcow2:
            return ConvertPlan(
                target_format,
                'compressed qcow2 requested: a single-pass stream cannot '
                'compress, converted through scratch space',
                facts, self._conf.scratch_dir, chunk, extra_args=('-c',))
        if release_first:
            return release_first_plan(target_format, facts, self._conf)
        if facts.format == 'qcow2' and self._self_contained and (
                target_format == 'qcow2'):
            return base.StreamPlan(
                target_format,
                'qcow2 without backing file: the disk file itself is the '
                'image',
                lambda: passthrough.FileStream(path, chunk))
        if facts.format == 'raw':
            return base.StreamPlan(
                target_format,
                f'raw file to {target_format}: streamed from its data map, '
                f'holes not read',
                lambda: streams.open_stream(
                    extents.RawFileView(path), target_format, chunk))
        return base.StreamPlan(
            target_format,
            f'qcow2 with {len(facts.backing_chain)} backing file(s) to '
            f'{target_format}: active layer flattened through a read-only '
            f'qemu-nbd export',
            lambda: streams.open_stream(
                nbd.NbdChainView(path, facts.format), target_format, chunk))


def release_first_plan(target_format, facts, conf):
    """The convert plan, for a guest that waits for its disk."""
    return ConvertPlan(
        target_format,
        'guest suspended for the snapshot: local copy first, so it '
        'resumes after one disk read rather than after the upload',
        facts, conf.scratch_dir, conf.worker.chunk_size)


class ConvertPlan(base.Plan):
    """Nova's way: ``qemu-img convert`` into scratch, then upload the copy.

    Kept for what a single-pass stream cannot produce. The scratch copy
    lives in its own directory under ``scratch_dir``, journalled before it
    is made, and is removed by ``cleanup`` whatever happened (or, after a
    crash, by recovery through ``remove_scratch_dir``).
    """

    strategy = 'convert'

    def __init__(self, target_format, reason, facts, scratch_dir,
                 chunk_size, extra_args=()):
        super().__init__(target_format, reason)
        self._facts = facts
        self._scratch_dir = scratch_dir
        self._chunk_size = chunk_size
        self._extra_args = tuple(extra_args)
        self._workdir = None

    def run(self, job):
        workdir = os.path.join(os.path.abspath(self._scratch_dir),
                               _SCRATCH_PREFIX + job.image_id)
        job.track(base.SCRATCH_DIR, workdir)
        os.makedirs(self._scratch_dir, exist_ok=True)
        # Only a job for the same image can have made it, and the journal
        # lets one such job run at a time: what is there is a leftover.
        shutil.rmtree(workdir, ignore_errors=True)
        os.mkdir(workdir, 0o700)
        self._workdir = workdir
        copy = os.path.join(self._workdir, f'image.{self.target_format}')
        read = utils.execute_counting_reads(
            'qemu-img', 'convert', '-t', 'none', '-f', self._facts.format,
            '-O', self.target_format, *self._extra_args,
            self._facts.location, copy)
        job.add_bytes_read(read)
        job.add_scratch_bytes(os.stat(copy).st_blocks * 512)
        job.source_released()
        with passthrough.FileStream(copy, self._chunk_size) as body:
            job.upload(body, self.target_format)

    def cleanup(self):
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
