"""Block devices: what Nova's LVM image backend gives an instance.

A block device has no allocation map the kernel will tell (SEEK_DATA is
EINVAL on one), so it is read in full; it is still streamed, never copied.
Its path comes from the domain XML and must lie under one of ``[worker]
block_device_prefixes`` (Nova's volume group): no other device of the
host is ever opened.
"""

from snapworker import exception
from snapworker import streams
from snapworker.sources import base
from snapworker.sources import chain
from snapworker.sources import convert
from snapworker.streams import extents


class BlockSource(chain.PinnedSource):
    kind = 'block'

    def __init__(self, path, driver_format, conf):
        super().__init__(conf)
        self.path = path
        self._driver_format = driver_format or 'raw'

    def _open(self):
        if self._driver_format != 'raw':
            raise exception.UnsupportedDisk(
                path=self.path,
                reason=f'{self._driver_format} on a block device')
        return chain.open_block_device(
            self.path, self._conf.worker.block_device_prefixes)

    def plan(self, target_format, store=None, release_first=False,
             store_id=None):
        """Stream (or directly write, ``[rbd] direct_write``) the device;
        the convert plan for compression or a suspended guest.

        A device has no allocation map: the direct plan reads it in full
        and skips the all-zero pieces, so the RBD image stays thin.
        """
        pinned = self.pinned
        if target_format == 'qcow2' and self._conf.worker.compress_qcow2:
            return convert.compressed_plan(self, self._conf)
        if release_first:
            return convert.release_first_plan(target_format, self,
                                              self._conf)
        device = pinned.top.proc_path
        chunk = self._conf.worker.chunk_size
        drop = self.bypass_cache

        def view():
            return extents.BlockDeviceView(device, drop_cache=drop)

        return self.direct_plan(target_format, store, store_id, view) or (
            base.StreamPlan(
                target_format,
                f'block device to {target_format}: read once, in full',
                lambda: streams.open_stream(view(), target_format, chunk)))
