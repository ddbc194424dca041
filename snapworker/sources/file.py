"""Disk files (Nova's ``images_type`` raw, qcow2 and flat) and their chains.

The disk and every file of its backing chain are checked and pinned by
``chain.open_file_chain`` before anything reads them: inside
``instances_path``, regular files, formats given (the disk's by the domain
XML, each backing file's by its parent's header), no protocols. Every plan
reads the pinned descriptors.
"""

from snapworker import streams
from snapworker import utils
from snapworker.sources import base
from snapworker.sources import chain
from snapworker.sources import convert
from snapworker.sources import reflink
from snapworker.streams import extents
from snapworker.streams import nbd
from snapworker.streams import passthrough


class FileSource(chain.PinnedSource):
    kind = 'file'

    def __init__(self, path, driver_format, conf, allowed_dir=None):
        """:param driver_format: the format the domain XML gives the disk.
        :param allowed_dir: where the chain may live; instances_path
            unless an operator names a disk directly (``snapworker
            stream``).
        """
        super().__init__(conf)
        self.path = path
        self._driver_format = driver_format
        self._allowed_dir = allowed_dir or conf.instances_path

    def _open(self):
        return chain.open_file_chain(self.path, self._driver_format,
                                     self._allowed_dir)

    def plan(self, target_format, store=None, release_first=False,
             store_id=None):
        """Pick the plan; only compressed qcow2 output needs scratch space.

        A guest suspended for the snapshot (``release_first``) resumes
        sooner after a local copy than after a whole upload: an instant
        reflink copy where the instances path allows it (``reflink.py``;
        the copy is then written directly or streamed, as the disk itself
        would be), else the convert plan, Nova's way, chosen for that
        reason.

        ============================  =======  ============================
        source                        target   image stream
        ============================  =======  ============================
        qcow2, no backing file        qcow2    the file itself
        raw                           raw      the file, holes not read
        raw                           qcow2    generated qcow2 from the
                                               file's SEEK_DATA map
        qcow2 with a backing chain,   qcow2    generated qcow2 from the
        internal snapshots or dirty            chain, read via qemu-nbd
        qcow2 (any chain)             raw      the chain via qemu-nbd
        anything, compression asked   qcow2    convert (scratch copy)
        any, Glance store is rbd and  raw      direct: only data written
        ``[rbd] direct_write``                 into Glance's pool
        ============================  =======  ============================

        A suspended guest still gets its reflink or convert plan first:
        the direct write, like a stream, holds the disk until it is read
        (after a reflink copy it reads the copy instead).
        """
        if target_format == 'qcow2' and self._conf.worker.compress_qcow2:
            return convert.compressed_plan(self, self._conf)
        if release_first:
            if reflink.supported(self._conf):
                return reflink.ReflinkPlan(target_format, self, self._conf,
                                           store, store_id)
            return convert.release_first_plan(target_format, self,
                                              self._conf)
        pinned = self.pinned
        return self.direct_plan(
            target_format, store, store_id,
            lambda: self.raw_view(pinned)) or self.stream_plan(
                pinned, target_format)

    def stream_plan(self, pinned, target_format):
        """The stream plan for ``pinned`` (this disk's chain, or a copy)."""
        chunk = self._conf.worker.chunk_size
        top = pinned.top.proc_path
        drop = self.bypass_cache
        if pinned.format == 'qcow2' and pinned.self_contained and (
                target_format == 'qcow2'):
            return base.StreamPlan(
                target_format,
                'qcow2 without backing file: the disk file itself is the '
                'image',
                lambda: passthrough.FileStream(top, chunk, drop_cache=drop))
        if pinned.format == 'raw':
            reason = (f'raw file to {target_format}: streamed from its data '
                      f'map, holes not read')
        else:
            reason = (f'qcow2 with {len(pinned.backing_paths)} backing '
                      f'file(s) to {target_format}: active layer flattened '
                      f'through a read-only qemu-nbd export')
        return base.StreamPlan(
            target_format, reason,
            lambda: streams.open_stream(self.raw_view(pinned),
                                        target_format, chunk))

    def raw_view(self, pinned):
        """The guest content of ``pinned`` (this disk's chain, or a copy):
        the file's own data map for raw, the flattened chain through
        qemu-nbd otherwise."""
        if pinned.format == 'raw':
            return extents.RawFileView(pinned.top.proc_path,
                                       drop_cache=self.bypass_cache)
        return self._nbd_view(pinned)

    def _nbd_view(self, pinned):
        conf = self._conf
        spec = pinned.qemu_spec(direct=self.bypass_cache)
        return nbd.NbdChainView(
            utils.confined(nbd.qemu_nbd_argv(spec), conf),
            timeout=conf.worker.helper_stall_timeout)
