"""Block devices: what Nova's LVM image backend gives an instance.

A block device has no allocation map the kernel will tell (SEEK_DATA is
EINVAL on one), so it is read in full; it is still streamed, never copied.
Its path comes from the domain XML and must be a block device under /dev:
a domain pointing a "block" disk at a regular file is refused.
"""

import os
import stat

from snapworker import exception
from snapworker import streams
from snapworker.sources import base
from snapworker.sources import file as file_source
from snapworker.streams import extents

_DEVICE_DIR = '/dev'


class BlockSource(base.Source):
    kind = 'block'

    def __init__(self, path, driver_format, conf):
        self.path = path
        self._driver_format = driver_format or 'raw'
        self._conf = conf
        self.facts = None

    def inspect(self):
        real = os.path.realpath(self.path)
        if os.path.commonpath([real, _DEVICE_DIR]) != _DEVICE_DIR:
            raise exception.UnsupportedDisk(
                path=self.path, reason=f'{real} is not under {_DEVICE_DIR}')
        try:
            mode = os.stat(real).st_mode
        except OSError as e:
            raise exception.UnsupportedDisk(path=self.path,
                                            reason=str(e)) from e
        if not stat.S_ISBLK(mode):
            raise exception.UnsupportedDisk(path=self.path,
                                            reason='not a block device')
        if self._driver_format != 'raw':
            raise exception.UnsupportedDisk(
                path=self.path,
                reason=f'{self._driver_format} on a block device')
        with extents.BlockDeviceView(real) as view:
            size = view.virtual_size
        self.facts = base.SourceFacts(kind=self.kind, format='raw',
                                      virtual_size=size, location=real)
        return self.facts

    def plan(self, target_format, store=None, release_first=False):
        if release_first:
            return file_source.release_first_plan(target_format, self.facts,
                                                  self._conf)
        path = self.facts.location
        chunk = self._conf.worker.chunk_size
        return base.StreamPlan(
            target_format,
            f'block device to {target_format}: read once, in full',
            lambda: streams.open_stream(extents.BlockDeviceView(path),
                                        target_format, chunk))
