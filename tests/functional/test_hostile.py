"""Attacks on a real worker: hostile disk bytes, swapped files, forged and
malformed requests.

A guest writes every byte of its disk, and anyone on the message bus can
cast a request. Each test makes one such attack against a real worker
process (real RabbitMQ, Glance, libvirtd, qemu) and asserts what a user
cares about: exactly the instance's own bytes in the image, or a clear
error with the image deleted only if it was the request's own, nothing
left behind (scratch, helpers), and the next request served.
"""

import filecmp
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

import glanceclient
from oslo_context import context as o_context
from oslo_utils import units

from snapworker import events
from snapworker import notifications
from snapworker.conf import CONF
from tests.functional import base
from tests.services import glance as glance_service

MiB = units.Mi
OTHER_PROJECT = '0a1b2c3d4e5f40718293a4b5c6d7e8f9'


class HostileTestCase(base.FunctionalTestCase):

    def setUp(self):
        super().setUp()
        # An ordinary member of the test project: no admin bypass.
        self.context = o_context.RequestContext(
            user_id=glance_service.IDENTITY_HEADERS['X-User-Id'],
            project_id=glance_service.IDENTITY_HEADERS['X-Project-Id'],
            roles=['member', 'reader'], auth_token='unused')

    def _raw_disk(self, name, content, size=4 * MiB):
        path = os.path.join(self.instances_path, name)
        with open(path, 'wb') as f:
            f.write(content)
            f.truncate(size)
        self.addCleanup(self._remove, path)
        return path

    def _final(self, events):
        return events[-1].event_type, events[-1].payload

    def assertServedNext(self):
        """The worker still works: a small honest snapshot succeeds."""
        disk = self.make_disk(f'next-{time.monotonic_ns()}', 'raw',
                              size='1M')
        instance, _ = self.define_domain(path=disk, fmt='raw')
        image = self.create_image()
        event_type, payload = self._final(self.snapshot(instance, image))
        self.assertEqual(notifications.END, event_type, payload)

    def assertClean(self):
        self.assertNoScratchLeft()
        self.assertNoHelperLeft()
        self.assertServedNext()

    def _qcow2_header_naming(self, backing):
        """The first MiB of a qcow2 file whose backing file is ``backing``."""
        path = os.path.join(self.workdir, f'hdr-{time.monotonic_ns()}')
        args = ['create', '-q', '-f', 'qcow2', '-u']
        if backing:
            args += ['-b', backing, '-F', 'raw']
        base.qemu_img(*args, path, '4M')
        with open(path, 'rb') as f:
            header = f.read(MiB)
        os.unlink(path)
        return header

    # -- 1. the format is given, never guessed --------------------------------

    def test_raw_disk_with_qcow2_header_naming_another_instance(self):
        victim = self._raw_disk('victim-disk', b'VICTIM DATA ' * 1000)
        for backing in (victim, None):
            disk = self._raw_disk(f'disk-{bool(backing)}',
                                  self._qcow2_header_naming(backing),
                                  size=MiB)
            # What the worker's plan sends is exactly the raw disk: no
            # other tenant's data, and not the 384 KiB "qcow2" the header
            # claims to be.
            out = os.path.join(self.workdir, f'body-{bool(backing)}')
            self.addCleanup(self._remove, out)
            proc = subprocess.run(
                [os.path.join(os.path.dirname(sys.executable), 'snapworker'),
                 'stream', disk, '--source-format', 'raw', '-o', out],
                capture_output=True, text=True)
            self.assertEqual(0, proc.returncode, proc.stderr)
            self.assertTrue(filecmp.cmp(disk, out, shallow=False))
            instance, _ = self.define_domain(path=disk, fmt='raw')
            image = self.create_image()
            event_type, payload = self._final(self.snapshot(instance, image))
            if backing:
                # Glance's own safety check then refuses raw data that
                # looks like a qcow2 with a backing file: the snapshot
                # fails cleanly, the image deleted.
                self.assertEqual(
                    ('snapshot.create.error', 'ImageDataRejected', MiB),
                    (event_type, payload['error_code'],
                     payload['bytes_total']))
                self.assertEqual('deleted', self.image_status(image))
            else:
                self.assertEqual(notifications.END, event_type, payload)
                self.assertTrue(filecmp.cmp(
                    disk, self.download(image, 'raw'), shallow=False))
            self.assertEqual('raw', payload['source_format'])
        self.assertClean()

    # -- 2. pinned: a swap after validation changes nothing read --------------

    def test_swap_to_outside_file_never_uploads_outside_bytes(self):
        secret = os.path.join(self.workdir, 'outside-secret')
        with open(secret, 'wb') as f:
            f.write(b'SECRET!!' * (MiB // 8))
        disk = self._raw_disk('swapped', b'INSIDE..' * (MiB // 8), size=MiB)
        with open(disk, 'rb') as f:
            inside = f.read()
        aside = disk + '.real'
        instance, _ = self.define_domain(path=disk, fmt='raw')
        stop = threading.Event()

        def swapper():
            # Flip the disk's name between the real file and a symlink
            # to a file outside the instances path, as fast as possible.
            while not stop.is_set():
                os.rename(disk, aside)
                os.symlink(secret, disk)
                time.sleep(0.0005)
                os.unlink(disk)
                os.rename(aside, disk)
                time.sleep(0.0005)

        thread = threading.Thread(target=swapper)
        thread.start()
        outcomes = []
        try:
            for _ in range(12):
                image = self.create_image()
                event_type, payload = self._final(
                    self.snapshot(instance, image))
                outcomes.append(payload['error_code'] or 'active')
                if event_type == notifications.END:
                    with open(self.download(image, 'raw'), 'rb') as f:
                        self.assertEqual(inside, f.read())
                else:
                    self.assertEqual('deleted', self.image_status(image))
        finally:
            stop.set()
            thread.join()
        self.assertLessEqual(set(outcomes), {
            'active', 'SourceChanged', 'DiskOutsideInstancesPath',
            'UnsupportedDisk'}, outcomes)
        self.assertClean()

    # -- 3. nothing unchecked is opened, nothing hangs ------------------------

    def test_fifo_and_silent_nbd_backing_fail_fast(self):
        fifo = os.path.join(self.instances_path, '_base', 'fifo')
        os.mkfifo(fifo)
        self.addCleanup(os.unlink, fifo)
        listener = socket.create_server(('127.0.0.1', 0))
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        for backing in (fifo, f'nbd://127.0.0.1:{port}/export'):
            # -u: qemu-img itself must not open the backing file either.
            top = os.path.join(self.instances_path,
                               f'top-{time.monotonic_ns()}')
            base.qemu_img('create', '-q', '-f', 'qcow2', '-u', '-b', backing,
                          '-F', 'raw', top, '16M')
            self.addCleanup(self._remove, top)
            instance, _ = self.define_domain(path=top)
            image = self.create_image()
            started = time.monotonic()
            event_type, payload = self._final(self.snapshot(instance, image,
                                                            timeout=30))
            self.assertLess(time.monotonic() - started, 10)
            self.assertEqual(('snapshot.create.error', 'UnsupportedDisk'),
                             (event_type, payload['error_code']))
            self.assertEqual('deleted', self.image_status(image))
        listener.settimeout(0.2)
        self.assertRaises(TimeoutError, listener.accept)
        self.assertClean()

    def test_huge_virtual_size_is_refused_before_a_byte_moves(self):
        disk = self.make_disk('huge', 'qcow2', size='2T', writes=())
        instance, _ = self.define_domain(path=disk)
        image = self.create_image()
        event_type, payload = self._final(self.snapshot(instance, image,
                                                        'raw'))
        self.assertEqual(('snapshot.create.error', 'DiskTooLarge', 0),
                         (event_type, payload['error_code'],
                          payload['bytes_uploaded']))
        self.assertIn('max_virtual_size', payload['error_message'])
        self.assertEqual('deleted', self.image_status(image))
        # The flavor's root disk bounds it too (RPC 1.1).
        small = self.make_disk('small', 'qcow2', size='8M', writes=())
        instance, _ = self.define_domain(path=small)
        image = self.create_image()
        event_type, payload = self._final(self.snapshot(
            instance, image, max_virtual_size=4 * MiB))
        self.assertEqual('DiskTooLarge', payload['error_code'])
        self.assertIn('flavor', payload['error_message'])
        self.assertClean()

    # -- 4. owner checks ------------------------------------------------------

    def test_other_projects_instance_is_refused(self):
        disk = self.make_disk('theirs', 'raw', size='1M')
        instance, _ = self.define_domain(path=disk, fmt='raw',
                                         owner=OTHER_PROJECT)
        image = self.create_image()
        event_type, payload = self._final(self.snapshot(instance, image))
        self.assertEqual(('snapshot.create.error', 'InstanceNotOwned', 0),
                         (event_type, payload['error_code'],
                          payload['bytes_read']))
        # The image was the request's own (queued, its project's): gone.
        self.assertEqual('deleted', self.image_status(image))
        # An admin may snapshot it, as Nova lets admins.
        admin = o_context.RequestContext(
            user_id=self.context.user_id, project_id=self.context.project_id,
            roles=['admin', 'member'], auth_token='unused')
        image = self.create_image()
        event_type, payload = self._final(self.snapshot(instance, image,
                                                        context=admin))
        self.assertEqual(notifications.END, event_type, payload)
        self.assertClean()

    def test_other_projects_image_is_left_untouched(self):
        other = glanceclient.Client('2', endpoint=self.services['glance_url'],
                                    token='unused')
        other.http_client.session.headers.update(
            dict(glance_service.IDENTITY_HEADERS,
                 **{'X-Project-Id': OTHER_PROJECT}))
        image = other.images.create(name='theirs')['id']
        self.addCleanup(self._delete_image, image)
        disk = self.make_disk('mine', 'raw', size='1M')
        instance, _ = self.define_domain(path=disk, fmt='raw')
        # A member does not even see it; an admin sees whose it is.
        admin = o_context.RequestContext(
            user_id=self.context.user_id, project_id=self.context.project_id,
            roles=['admin', 'member'], auth_token='unused')
        for context, code, status in ((self.context, 'ImageNotFound', None),
                                      (admin, 'ImageNotOwned', 'queued')):
            event_type, payload = self._final(self.snapshot(
                instance, image, context=context))
            self.assertEqual((notifications.REFUSED, code, status),
                             (event_type, payload['error_code'],
                              payload['image_status']))
            self.assertEqual(0, payload['bytes_read'])
            self.assertEqual('queued', other.images.get(image)['status'])
        self.assertClean()

    # -- 5. only the image the job fills --------------------------------------

    def test_duplicate_delivery_after_success_keeps_the_image(self):
        disk = self.make_disk('dup', 'qcow2')
        instance, _ = self.define_domain(path=disk)
        image = self.create_image()
        self.assertEqual(notifications.END,
                         self._final(self.snapshot(instance, image))[0])
        before = self.glance.images.get(image)
        event_type, payload = self._final(self.snapshot(instance, image))
        self.assertEqual((notifications.REFUSED, 'ImageNotQueued', 'active'),
                         (event_type, payload['error_code'],
                          payload['image_status']))
        after = self.glance.images.get(image)
        self.assertEqual(('active', before['os_hash_value']),
                         (after['status'], after['os_hash_value']))
        digest = hashlib.sha512()
        for chunk in self.glance.images.data(image):
            digest.update(chunk)
        self.assertEqual(before['os_hash_value'], digest.hexdigest())
        self.assertClean()

    def test_duplicate_delivery_while_running_is_refused(self):
        disk = self.make_disk('dup-run', 'qcow2', size='64M',
                              writes=('write -P 0x61 0 48M',))
        instance, _ = self.define_domain(path=disk)
        image = self.create_image()
        with events.Subscription(CONF, image_id=image) as sub:
            for _ in range(2):
                self.api.create_snapshot(self.context, self.worker.host,
                                         instance, image)
            received = list(sub.until_finished(60))
            # The original's own end follows the duplicate's refusal.
            if received[-1].event_type == notifications.REFUSED:
                received += list(sub.until_finished(60))
        types = [e.event_type for e in received]
        self.assertIn(notifications.REFUSED, types)
        refused = received[types.index(notifications.REFUSED)].payload
        self.assertEqual('SnapshotInProgress', refused['error_code'])
        self.assertEqual(notifications.END, types[-1])
        self.assertEqual(1, types.count(notifications.START))
        self.assertEqual('active', self.image_status(image))
        self.assertClean()

    # -- 6. malformed requests ------------------------------------------------

    def test_wrong_typed_fields_end_in_an_error(self):
        disk = self.make_disk('typed', 'raw', size='1M')
        instance, _ = self.define_domain(path=disk, fmt='raw')
        for fields in ({'target_format': 5}, {'target_format': 'vmdk'},
                       {'max_virtual_size': 'big'},
                       {'max_virtual_size': -1},
                       {'instance_uuid': ['x']}):
            image = self.create_image()
            fields = dict({'instance_uuid': instance,
                           'target_format': None}, **fields)
            target_format = fields.pop('target_format')
            uuid_ = fields.pop('instance_uuid')
            fields.setdefault('max_virtual_size', None)
            event_type, payload = self._final(self.snapshot(
                uuid_, image, target_format, **fields))
            self.assertEqual(('snapshot.create.error', 'InvalidRequest'),
                             (event_type, payload['error_code']), fields)
            self.assertEqual('deleted', self.image_status(image))
        self.assertClean()

    # -- 8. block devices only under the configured prefixes ------------------

    def test_block_device_outside_the_prefixes_is_refused(self):
        instance, _ = self.define_domain(disk_xml=(
            "<disk type='block' device='disk'>"
            "<driver name='qemu' type='raw'/>"
            "<source dev='/dev/null'/>"
            "<target dev='vda' bus='virtio'/></disk>"))
        image = self.create_image()
        event_type, payload = self._final(self.snapshot(instance, image))
        self.assertEqual(('snapshot.create.error', 'UnsupportedDisk'),
                         (event_type, payload['error_code']))
        self.assertIn('block_device_prefixes', payload['error_message'])
        self.assertClean()

