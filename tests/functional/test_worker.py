"""A real worker process, real RabbitMQ, Glance, libvirtd and qemu.

Each test casts through the real RPC client, follows the notifications on
the real bus and downloads what Glance stored, comparing it with the
instance disk by guest content (``qemu-img compare``).
"""

import io
import os
import uuid

from tests.functional import base

EVENT_ORDER = ['snapshot.create.start', 'snapshot.source_released',
               'snapshot.create.end']


class SnapshotToGlanceTest(base.FunctionalTestCase):

    def _snapshot_ok(self, disk, fmt, target_format=None):
        instance, _ = self.define_domain(path=disk, fmt=fmt)
        image_id = self.create_image()
        events = self.snapshot(instance, image_id, target_format)
        types = [e.event_type for e in events
                 if e.event_type != 'snapshot.progress']
        self.assertEqual(EVENT_ORDER, types, events[-1].payload)
        end = events[-1].payload
        self.assertEqual('active', self.image_status(image_id))
        stored = self.download(image_id, end['target_format'])
        self.assertTrue(base.images_identical(disk, stored))
        image = self.glance.images.get(image_id)
        self.assertEqual(end['target_format'], image['disk_format'])
        self.assertEqual(0, end['scratch_bytes'])
        # What Glance stored hashes to what the worker sent.
        self.assertTrue(end['data_verified'])
        self.assertNoScratchLeft()
        return end

    def test_qcow2_disk_is_uploaded_as_is(self):
        disk = self.make_disk('qcow2-disk', 'qcow2')
        end = self._snapshot_ok(disk, 'qcow2')
        self.assertEqual('stream', end['strategy'])
        self.assertEqual(os.path.getsize(disk), end['bytes_uploaded'])

    def test_raw_disk_is_streamed_without_reading_holes(self):
        disk = self.make_disk('raw-disk', 'raw', size='64M',
                              writes=('write -P 0x11 0 1M',
                                      'write -P 0x22 32M 1M'))
        end = self._snapshot_ok(disk, 'raw')
        self.assertEqual('stream', end['strategy'])
        self.assertEqual(64 * 1024 * 1024, end['bytes_uploaded'])
        # Two 1 MiB runs of data (plus at most a little rounding).
        self.assertLess(end['bytes_read'], 4 * 1024 * 1024)

    def test_nova_default_overlay_to_qcow2_and_raw(self):
        base_file = self.make_disk('_base/0123abcd', 'raw', size='32M',
                                   writes=('write -P 0x33 0 4M',
                                           'write -P 0x44 16M 2M'))
        for target in ('qcow2', 'raw'):
            overlay = self.make_disk(
                f'overlay-{target}', 'qcow2', size='32M',
                backing=base_file,
                writes=('write -P 0x55 1M 1M', 'write -z 16M 512k'))
            end = self._snapshot_ok(overlay, 'qcow2', target)
            self.assertEqual('stream', end['strategy'])
            self.assertEqual(target, end['target_format'])
            self.assertEqual(32 * 1024 * 1024, end['virtual_size'])

    def test_suspended_guest_is_released_before_the_upload(self):
        # What Nova's _suspend_guest_for_snapshot leaves: a managed save.
        disk = self.make_disk('suspended', 'qcow2', size='64M',
                              writes=('write -P 0x5a 0 32M',))
        instance, dom = self.define_domain(path=disk, running=True)
        dom.managedSave(0)
        image_id = self.create_image()
        events = self.snapshot(instance, image_id)
        self.assertEqual(EVENT_ORDER, [e.event_type for e in events
                                       if e.event_type != 'snapshot.progress'])
        released, end = events[1].payload, events[-1].payload
        self.assertEqual('convert', end['strategy'])
        self.assertIn('guest suspended', end['plan_reason'])
        self.assertEqual(0, released['bytes_uploaded'])
        self.assertLess(end['source_held_seconds'], end['duration_seconds'])
        self.assertGreater(end['scratch_bytes'], 0)
        stored = self.download(image_id, 'qcow2')
        self.assertTrue(base.images_identical(disk, stored))
        self.assertNoScratchLeft()

    def test_compressed_qcow2_goes_through_scratch_and_cleans_it(self):
        # The worker of this class does not compress; a second worker
        # would be needed to test compress_qcow2 end to end: see
        # CompressingWorkerTest.
        disk = self.make_disk('raw-for-qcow2', 'raw')
        end = self._snapshot_ok(disk, 'raw', 'qcow2')
        self.assertEqual('stream', end['strategy'])


class CompressingWorkerTest(base.FunctionalTestCase):

    worker_conf = {'worker.compress_qcow2': 'True'}

    def test_convert_plan_reports_scratch_and_removes_it(self):
        disk = self.make_disk('disk', 'qcow2')
        instance, _ = self.define_domain(path=disk, fmt='qcow2')
        image_id = self.create_image()
        events = self.snapshot(instance, image_id)
        end = events[-1].payload
        self.assertEqual('snapshot.create.end', events[-1].event_type, end)
        self.assertEqual('convert', end['strategy'])
        self.assertGreater(end['scratch_bytes'], 0)
        self.assertGreater(end['bytes_read'], 0)
        stored = self.download(image_id, 'qcow2')
        self.assertTrue(base.images_identical(disk, stored))
        self.assertNoScratchLeft()


class FailuresTest(base.FunctionalTestCase):
    """Every refusal: error notification, image deleted, worker serving."""

    def _snapshot_fails(self, instance, image_id, code):
        events = self.snapshot(instance, image_id)
        last = events[-1]
        self.assertEqual('snapshot.create.error', last.event_type,
                         last.payload)
        self.assertEqual(code, last.payload['error_code'])
        self.assertEqual('deleted', self.image_status(image_id))
        self.assertNoScratchLeft()
        return last.payload['error_message']

    def _worker_still_serves(self):
        disk = self.make_disk(f'ok-{self.id()[-8:]}', 'qcow2')
        instance, _ = self.define_domain(path=disk)
        image_id = self.create_image()
        events = self.snapshot(instance, image_id)
        self.assertEqual('snapshot.create.end', events[-1].event_type)

    def test_running_domain(self):
        disk = self.make_disk('running', 'qcow2')
        instance, _ = self.define_domain(path=disk, running=True)
        message = self._snapshot_fails(instance, self.create_image(),
                                       'InstanceNotShutOff')
        self.assertIn('running', message)
        self._worker_still_serves()

    def test_disk_outside_instances_path(self):
        instance, _ = self.define_domain(path='/etc/passwd', fmt='raw')
        message = self._snapshot_fails(instance, self.create_image(),
                                       'DiskOutsideInstancesPath')
        self.assertIn('/etc/passwd', message)
        self._worker_still_serves()

    def test_image_not_queued(self):
        disk = self.make_disk('active-image', 'qcow2')
        instance, _ = self.define_domain(path=disk)
        image_id = self.create_image(disk_format='raw',
                                     container_format='bare')
        self.glance.images.upload(image_id, io.BytesIO(b'x' * 512))
        last = self.snapshot(instance, image_id)[-1]
        # Not this request's image to fill: refused, and left as it is.
        self.assertEqual(('snapshot.create.refused', 'ImageNotQueued',
                          'active'),
                         (last.event_type, last.payload['error_code'],
                          last.payload['image_status']))
        self.assertIn('left untouched', last.payload['error_message'])
        self.assertEqual('active', self.image_status(image_id))
        self._worker_still_serves()

    def test_unknown_instance(self):
        message = self._snapshot_fails(str(uuid.uuid4()),
                                       self.create_image(),
                                       'InstanceNotFound')
        self.assertIn('no libvirt domain', message)
        self._worker_still_serves()

    def test_unsupported_format(self):
        disk = self.make_disk('vmdk-disk', 'vmdk', writes=())
        instance, _ = self.define_domain(path=disk, fmt='vmdk')
        message = self._snapshot_fails(instance, self.create_image(),
                                       'UnsupportedDisk')
        self.assertIn('vmdk', message)
