"""Block-device sources (a real loop device), as Nova's LVM backend gives."""

import subprocess

from tests.functional import base


class BlockDeviceTest(base.FunctionalTestCase):
    """Nova's LVM backend gives a raw block device; a loop device is one."""

    def _loop_device(self, backing_file):
        dev = subprocess.run(['losetup', '--find', '--show', '--read-only',
                              backing_file], check=True, capture_output=True,
                             text=True).stdout.strip()
        self.addCleanup(subprocess.run, ['losetup', '-d', dev])
        return dev

    def test_block_device_to_raw_and_qcow2(self):
        backing = self.make_disk('lv-backing', 'raw', size='24M',
                                 writes=('write -P 0x66 0 2M',
                                         'write -P 0x77 20M 1M'))
        dev = self._loop_device(backing)
        disk_xml = (f"<disk type='block' device='disk'>"
                    f"<driver name='qemu' type='raw'/>"
                    f"<source dev='{dev}'/><target dev='vda'/></disk>")
        for target in ('raw', 'qcow2'):
            instance, _ = self.define_domain(disk_xml=disk_xml)
            image_id = self.create_image()
            events = self.snapshot(instance, image_id, target)
            end = events[-1].payload
            self.assertEqual('snapshot.create.end', events[-1].event_type,
                             end)
            self.assertEqual(('block', 'stream', 0),
                             (end['source_kind'], end['strategy'],
                              end['scratch_bytes']))
            stored = self.download(image_id, target)
            self.assertTrue(base.images_identical(backing, stored))

    def test_block_disk_that_is_a_regular_file_is_refused(self):
        disk = self.make_disk('not-a-device', 'raw')
        disk_xml = (f"<disk type='block' device='disk'>"
                    f"<driver name='qemu' type='raw'/>"
                    f"<source dev='{disk}'/><target dev='vda'/></disk>")
        instance, _ = self.define_domain(disk_xml=disk_xml)
        image_id = self.create_image()
        events = self.snapshot(instance, image_id)
        self.assertEqual('UnsupportedDisk', events[-1].payload['error_code'])
        self.assertEqual('deleted', self.image_status(image_id))
