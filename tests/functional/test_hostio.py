"""A snapshot leaves the host's page cache as it found it.

The disk files' pages are dropped first; after a real snapshot through
the worker (the worker's own reads for a raw disk, qemu-nbd with O_DIRECT
for a chain), what the disk files have in the page cache is measured
with fincore(1).
"""

import os
import subprocess

from oslo_utils import units

from snapworker import notifications
from tests.functional import base

MiB = units.Mi


def resident(path):
    return int(subprocess.run(
        ['fincore', '--bytes', '--noheadings', '--output', 'RES', path],
        capture_output=True, text=True, check=True).stdout)


def drop(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class PageCacheTest(base.FunctionalTestCase):

    def _snapshot_cold(self, disk, files, fmt, target):
        for path in files:
            drop(path)
        instance, _ = self.define_domain(path=disk, fmt=fmt)
        image = self.create_image()
        last = self.snapshot(instance, image, target)[-1]
        self.assertEqual(notifications.END, last.event_type, last.payload)
        left = sum(resident(path) for path in files)
        read = last.payload['bytes_read']
        self.assertGreater(read, 32 * MiB)
        # Target of the issue: under 5 % of what was read.
        self.assertLess(left, read * 0.05, (left, read))
        return last.payload

    def test_raw_disk_read_by_the_worker(self):
        disk = self.make_disk('cache-raw', 'raw', size='96M',
                              writes=('write -P 0x31 0 64M',))
        self._snapshot_cold(disk, [disk], 'raw', 'raw')

    def test_chain_read_by_qemu_nbd(self):
        base_file = self.make_disk('_base/cache', 'raw', size='96M',
                                   writes=('write -P 0x32 0 40M',))
        top = self.make_disk('cache-top', 'qcow2', size='96M',
                             backing=base_file,
                             writes=('write -P 0x33 48M 32M',))
        payload = self._snapshot_cold(top, [top, base_file], 'qcow2', 'raw')
        self.assertIn('qemu-nbd', payload['plan_reason'])
