"""The ``direct`` strategy on a real Ceph, a real Glance (rbd store), a real
worker: file disks written straight into Glance's pool.

What is proven here rather than assumed:

* a Nova-style overlay (qcow2 on a raw ``_base``, with zero writes over
  base data) and a raw file with allocated zeros become active images in
  the ``ceph`` store whose bytes are the disk's, in an RBD image named and
  shaped as glance_store makes them (protected ``snap``), holding only the
  disk's data (thin: allocated bytes are the bytes the worker wrote, no
  zero written);
* Glance's ``checksum`` and ``os_hash_value`` are the md5 and sha512 of
  the disk's raw bytes (the worker hashed the whole virtual stream);
* the source changing during the write fails the snapshot with no RBD
  image left and the Glance image deleted;
* a disk claiming more than the checked size creates nothing in Ceph;
* a worker killed mid-write removes the journalled RBD image when it
  starts again.
"""

import hashlib
import os
import subprocess

import rbd

from snapworker import events
from snapworker.conf import CONF
from tests.functional import base
from tests.functional import rbd_helpers
from tests.functional import test_crash_recovery

MiB = 1024 * 1024
END = 'snapshot.create.end'
ERROR = 'snapshot.create.error'
START = 'snapshot.create.start'
DIRECT_CONF = {'rbd.direct_write': 'True',
               'glance.snapshot_store': 'ceph'}


class DirectTestMixin(rbd_helpers.RbdTestMixin):

    def rbd_images(self):
        return rbd.RBD().list(self.images)

    def data_objects(self, name):
        """Numbers of the RADOS objects that hold ``images/<name>``'s data
        (a thin image has one only where something was written)."""
        with rbd.Image(self.images, name, read_only=True) as image:
            prefix = image.stat()['block_name_prefix'] + '.'
        return sorted(int(obj.key[len(prefix):], 16)
                      for obj in self.images.list_objects()
                      if obj.key.startswith(prefix))

    @staticmethod
    def nonzero_objects(content, object_size=8 * MiB):
        """Objects of ``content`` that hold a byte that is not zero."""
        zeros = bytes(object_size)
        return [n for n in range(0, -(-len(content) // object_size))
                if content[n * object_size:(n + 1) * object_size]
                != zeros[:len(content[n * object_size:
                                      (n + 1) * object_size])]]

    def raw_bytes(self, disk, fmt):
        """The disk's guest content, as ``qemu-img convert -O raw``."""
        out = os.path.join(self.workdir, os.path.basename(disk) + '.raw')
        subprocess.run(['qemu-img', 'convert', '-f', fmt, '-O', 'raw', disk,
                        out], check=True)
        self.addCleanup(self._remove, out)
        with open(out, 'rb') as f:
            return f.read()

    def assert_direct_image(self, image_id, payload, content):
        """Active in ``ceph``, hashed as Glance would, thin, identical."""
        self.assertEqual(('direct', 'ceph', 'raw'),
                         (payload['strategy'], payload['store'],
                          payload['target_format']))
        self.assertEqual(0, payload['scratch_bytes'])
        image = self.glance.images.get(image_id)
        self.assertEqual(('active', 'ceph', len(content)),
                         (image['status'], image['stores'], image['size']))
        self.assertEqual(hashlib.md5(content).hexdigest(), image['checksum'])
        self.assertEqual(('sha512', hashlib.sha512(content).hexdigest()),
                         (image['os_hash_algo'], image['os_hash_value']))
        self.assertTrue(payload['image_hashed'])
        # As glance_store makes its images: named by the image id, a
        # protected ``snap``, Glance's location pointing at it.
        with rbd.Image(self.images, image_id, read_only=True) as rbd_image:
            self.assertEqual(
                [('snap', True)],
                [(s['name'], rbd_image.is_protected_snap(s['name']))
                 for s in rbd_image.list_snaps()])
            self.assertEqual(23, rbd_image.stat()['order'])
        self.assertEqual(
            f'rbd://{self.cluster.fsid}/images/{image_id}/snap',
            image['locations'][0]['url'])
        self.assertEqual(content,
                         self.read_rbd(self.images, image_id, 'snap'))
        # Thin: only objects holding data exist (zeros were not written).
        self.assertEqual(self.nonzero_objects(content),
                         self.data_objects(image_id))
        return image


class DirectWriteTest(DirectTestMixin, base.FunctionalTestCase):

    worker_conf = DIRECT_CONF

    def _snapshot(self, disk, fmt):
        instance, _ = self.define_domain(path=disk, fmt=fmt)
        image_id = self.create_image()
        final = self.snapshot(instance, image_id, 'raw')[-1]
        self.assertEqual(END, final.event_type,
                         f'{final.payload}\n{self.worker.log_tail()}')
        return image_id, final.payload

    def test_nova_overlay_is_written_thin_and_hashed(self):
        base_disk = self.make_disk('_base/direct-base', 'raw', size='64M',
                                   writes=('write -P 0x11 0 8M',
                                           'write -P 0x22 40M 4M'))
        top = self.make_disk('direct-top', 'qcow2', size='64M',
                             backing=base_disk,
                             writes=('write -P 0x5a 16M 4M',
                                     'write -z 2M 2M',
                                     'write -P 0x33 63M 1M'))
        content = self.raw_bytes(top, 'qcow2')
        image_id, payload = self._snapshot(top, 'qcow2')
        self.assert_direct_image(image_id, payload, content)
        # 8 + 4 MiB of base data with 2 MiB zeroed, 4 + 1 MiB more.
        self.assertEqual(15 * MiB, payload['bytes_written'])
        self.assertTrue(base.images_identical(
            top, self.download(image_id, 'raw')))
        # Glance owns it: deleting the image deletes the RBD image.
        self.glance.images.delete(image_id)
        self.assertNotIn(image_id, self.rbd_images())

    def test_raw_file_allocated_zeros_are_not_written(self):
        disk = self.make_disk('direct-raw', 'raw', size='32M',
                              writes=('write -P 0x44 0 4M',
                                      'write -P 0 8M 8M',
                                      'write -P 0x55 20M 1M'))
        content = self.raw_bytes(disk, 'raw')
        image_id, payload = self._snapshot(disk, 'raw')
        self.assert_direct_image(image_id, payload, content)
        self.assertEqual(5 * MiB, payload['bytes_written'])
        # The allocated zeros were read (they are data to the file
        # system) but not written.
        self.assertGreaterEqual(payload['bytes_read'], 13 * MiB)

    def test_qcow2_target_is_uploaded(self):
        disk = self.make_disk('direct-q', 'qcow2', size='8M')
        instance, _ = self.define_domain(path=disk, fmt='qcow2')
        image_id = self.create_image()
        final = self.snapshot(instance, image_id, 'qcow2')[-1]
        self.assertEqual((END, 'stream'),
                         (final.event_type, final.payload['strategy']))


class DirectFailureTest(DirectTestMixin, base.FunctionalTestCase):
    """Failures while (or before) writing leave nothing in Ceph."""

    worker_conf = dict(DIRECT_CONF, **{
        # Slow enough to change the disk while it is written.
        'worker.max_read_bytes_per_second': str(8 * MiB),
        'worker.max_virtual_size': str(256 * MiB)})

    def test_source_changed_mid_write_leaves_nothing(self):
        disk = self.make_disk('direct-changing', 'raw', size='48M',
                              writes=('write -P 0x66 0 40M',))
        instance, _ = self.define_domain(path=disk, fmt='raw')
        image_id = self.create_image()
        with events.Subscription(CONF, image_id=image_id) as sub:
            self.api.create_snapshot(self.context, self.worker.host,
                                     instance, image_id, target_format='raw')
            self.wait_for(lambda: image_id in self.rbd_images(),
                          'the RBD image')
            os.utime(disk)
            final = list(sub.until_finished(120))[-1]
        self.assertEqual((ERROR, 'SourceChanged'),
                         (final.event_type, final.payload['error_code']),
                         self.worker.log_tail())
        self.assertEqual('direct', final.payload['strategy'])
        self.assertNotIn(image_id, self.rbd_images())
        self.assertEqual('deleted', self.image_status(image_id))

    def test_oversized_disk_creates_nothing(self):
        disk = self.make_disk('direct-huge', 'qcow2', size='1T',
                              writes=('write -P 0x77 1023G 1M',))
        instance, _ = self.define_domain(path=disk, fmt='qcow2')
        image_id = self.create_image()
        final = self.snapshot(instance, image_id, 'raw')[-1]
        self.assertEqual((ERROR, 'DiskTooLarge'),
                         (final.event_type, final.payload['error_code']))
        self.assertNotIn(image_id, self.rbd_images())


class DirectCrashTest(DirectTestMixin,
                      test_crash_recovery.CrashRecoveryTestCase):
    """A worker killed while it writes: the restarted one removes the
    journalled RBD image and deletes the Glance image."""

    worker_conf = dict(DIRECT_CONF, **{
        'worker.max_read_bytes_per_second': str(8 * MiB)})

    def test_sigkill_during_direct_write_removes_rbd_image(self):
        disk = self.make_disk('direct-crash', 'raw', size='64M',
                              writes=('write -P 0x21 0 48M',))
        instance, _ = self.define_domain(path=disk, fmt='raw')
        image_id = self.create_image()
        with events.Subscription(CONF, image_id=image_id) as sub:
            self.start_snapshot(sub, instance, image_id, 'raw')
            self.wait_for(lambda: image_id in self.rbd_images(),
                          'the RBD image')
            self.kill_worker()
            self.assertIn(image_id, self.rbd_images())
            self.assertEqual([f'{image_id}.json'], self.journal_records())

            self.restart_worker()
            payload = self.wait_restarted_error(sub, image_id)
        self.assertIn(f'rbd_image images/{image_id}',
                      payload['error_message'])
        self.assertNotIn(image_id, self.rbd_images())
        self.assertEqual('deleted', self.image_status(image_id))
        self.assertEqual([], self.journal_records())
