"""RBD disks on a real Ceph, a real Glance with an rbd store, a real worker.

What is proven here rather than assumed:

* the clone plan moves no data (``bytes_read == 0``, no scratch), the
  Glance image's RBD data is the disk's data, and the image survives the
  deletion of the instance disk under every flatten policy;
* ``background`` registers before flattening: the clone's ``snap`` was
  taken before the flatten and still stops referencing the parent, because
  clones are made with deep-flatten;
* ``never`` (clone v2): Nova's own deletion of the instance disk
  (``RBD().remove`` after removing its snapshots, as
  nova.storage.rbd_utils does) fails with ImageHasSnapshots unless the
  deleting client sets ``rbd_move_parent_to_trash_on_remove``; with it the
  disk goes to the trash, the image stays readable and librbd purges the
  disk when Glance deletes the image;
* a failure after the clone (Glance refusing the location) leaves no
  snapshot, no clone and no image;
* the stream plan into the file store gives the disk's content back, in
  raw and qcow2, reading only allocated objects.

The shared Glance has ``local`` (default) and ``ceph`` stores; the worker
finds the rbd store in its cluster through Glance's store details (the
test user is admin), and ``[rbd] glance_store = local`` makes it stream.
"""

import json
import os
import subprocess
import time
import uuid

import rados
import rbd
from oslo_context import context as o_context
from oslo_utils import units

from tests.functional import base
from tests.functional import rbd_helpers
from tests.services import glance as glance_service

MiB = units.Mi
SIZE = 32 * MiB
#: (offset, length, byte): data written to every test disk; the rest is
#: never written (holes).
WRITES = ((0, MiB, 0x11), (9 * MiB, 2 * MiB, 0x22), (SIZE - MiB, MiB, 0x33))
END = 'snapshot.create.end'
ERROR = 'snapshot.create.error'


class RbdTestCase(rbd_helpers.RbdTestMixin, base.FunctionalTestCase):

    # -- helpers --------------------------------------------------------------

    def make_rbd_disk(self):
        return super().make_rbd_disk(SIZE, WRITES)

    def wait_gone(self, ioctx, name, timeout=30):
        deadline = time.monotonic() + timeout
        while name in rbd.RBD().list(ioctx):
            if time.monotonic() > deadline:
                self.fail(f'{name} still exists\n{self.worker.log_tail()}')
            time.sleep(0.1)

    def nova_delete(self, name, move_parent_to_trash=False):
        """Delete an instance disk the way nova.storage.rbd_utils does.

        Nova removes its own resize snapshot, then ``RBD().remove``. Its
        ceph.conf decides ``rbd_move_parent_to_trash_on_remove``.
        """
        conn = rados.Rados(
            conffile=self.cluster.conf_path, rados_id=self.cluster.client_user,
            conf={'keyring': self.cluster.client_keyring,
                  'rbd_move_parent_to_trash_on_remove':
                      str(move_parent_to_trash).lower()})
        conn.connect()
        try:
            with conn.open_ioctx('vms') as ioctx:
                with rbd.Image(ioctx, name) as image:
                    for snap in list(image.list_snaps()):
                        if snap['name'] == 'nova-resize':
                            image.remove_snap(snap['name'])
                self._remove_retrying_busy(ioctx, name)
        finally:
            conn.shutdown()

    @staticmethod
    def _remove_retrying_busy(ioctx, name, timeout=10):
        """Nova retries ImageBusy too ([libvirt] rbd_destroy_volume_retries):
        a client that just closed the image may still hold its watch."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return rbd.RBD().remove(ioctx, name)
            except rbd.ImageBusy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def snapshot_ok(self, name, target_format='raw'):
        instance, _ = self.define_rbd_domain(name)
        image_id = self.create_image()
        events = self.snapshot(instance, image_id, target_format)
        end = events[-1]
        self.assertEqual(END, end.event_type,
                         f'{end.payload}\n{self.worker.log_tail()}')
        self.assertIn('snapshot.source_released',
                      [e.event_type for e in events])
        self.assertEqual('active', self.image_status(image_id))
        return image_id, end.payload

    def assert_cloned(self, image_id, end, content):
        self.assertEqual('clone', end['strategy'])
        self.assertEqual('rbd', end['source_kind'])
        self.assertEqual(0, end['bytes_read'])
        self.assertEqual(0, end['scratch_bytes'])
        self.assertEqual(0, end['bytes_uploaded'])
        image = self.glance.images.get(image_id)
        self.assertEqual('ceph', image['stores'])
        self.assertEqual('raw', image['disk_format'])
        self.assertEqual(SIZE, image['size'])
        self.assertEqual(
            [f'rbd://{self.cluster.fsid}/images/{image_id}/snap'],
            [loc['url'] for loc in image['locations']])
        self.assertEqual(content, self.read_rbd(self.images, image_id,
                                                'snap'))

    def assert_glance_delete_removes_clone(self, image_id):
        self.glance.images.delete(image_id)
        self.assertNotIn(image_id, rbd.RBD().list(self.images))

    def assertStreamedBack(self, image_id, end, content, fmt):
        self.assertEqual(0, end['scratch_bytes'])
        self.assertLess(end['bytes_read'], SIZE)
        self.assertGreaterEqual(end['bytes_read'], 4 * MiB)
        raw = os.path.join(self.workdir, f'{image_id}.src.raw')
        with open(raw, 'wb') as f:
            f.write(content)
        self.addCleanup(os.unlink, raw)
        stored = self.download(image_id, fmt)
        self.assertTrue(base.images_identical(raw, stored))

    def parent_of(self, image_id, snapshot='snap'):
        with rbd.Image(self.images, image_id, snapshot=snapshot,
                       read_only=True) as image:
            try:
                return image.parent_info()
            except rbd.ImageNotFound:
                return None


class CloneBackgroundFlattenTest(RbdTestCase):
    """The default: active at once, flattened by the worker afterwards."""

    def test_clone_then_background_flatten(self):
        name, content = self.make_rbd_disk()
        image_id, end = self.snapshot_ok(name)
        self.assert_cloned(image_id, end, content)
        self.assertEqual('background', end['flatten_policy'])
        # Old API: the test user has no service role.
        self.assertEqual('patch', end['location_api'])
        self.assertFalse(end['image_hashed'])
        self.assertLess(end['source_held_seconds'], end['duration_seconds'])
        # The flatten finishes in the background, the source snapshot goes,
        # and the clone's snap (taken before the flatten) has no parent.
        self.wait_no_worker_snaps(name)
        self.assertIsNone(self.parent_of(image_id))
        self.nova_delete(name)
        self.assertNotIn(name, rbd.RBD().list(self.vms))
        self.assertEqual(content, self.read_rbd(self.images, image_id,
                                                'snap'))
        self.assertEqual(content, b''.join(self.glance.images.data(image_id)))
        self.assert_glance_delete_removes_clone(image_id)

    def test_v217_location_api_with_service_role(self):
        self.context = o_context.RequestContext(
            user_id=glance_service.IDENTITY_HEADERS['X-User-Id'],
            project_id=glance_service.IDENTITY_HEADERS['X-Project-Id'],
            roles=['admin', 'member', 'reader', 'service'],
            auth_token='unused')
        name, content = self.make_rbd_disk()
        image_id, end = self.snapshot_ok(name)
        self.assert_cloned(image_id, end, content)
        self.assertEqual('v2.17', end['location_api'])
        self.wait_no_worker_snaps(name)
        # Glance's location_import task hashes the image after activating
        # it (reading it through the clone); a delete before the task has
        # ended can fail (see glance_service.wait_for_tasks). Its hash is
        # Glance's business (tests/functional/test_glance_rbd_store.py):
        # the image was active before the task began.
        glance_service.wait_for_tasks(self.glance, image_id)
        self.assert_glance_delete_removes_clone(image_id)

    def test_qcow2_target_streams_from_rbd(self):
        name, content = self.make_rbd_disk()
        image_id, end = self.snapshot_ok(name, 'qcow2')
        self.assertEqual('stream', end['strategy'])
        # The rbd store is where RBD snapshots go; only the format differs.
        self.assertEqual('ceph', self.glance.images.get(image_id)['stores'])
        self.assertStreamedBack(image_id, end, content, 'qcow2')
        self.assertEqual([], self.worker_snaps(name))


class CloneSyncFlattenTest(RbdTestCase):

    worker_conf = {'rbd.flatten': 'sync'}

    def test_clone_flattened_before_registration(self):
        name, content = self.make_rbd_disk()
        image_id, end = self.snapshot_ok(name)
        self.assert_cloned(image_id, end, content)
        self.assertEqual('sync', end['flatten_policy'])
        # Nothing pending: independent of the disk when it became active.
        self.assertEqual([], self.worker_snaps(name))
        self.assertIsNone(self.parent_of(image_id))
        self.nova_delete(name)
        self.assertEqual(content, self.read_rbd(self.images, image_id,
                                                'snap'))
        self.assert_glance_delete_removes_clone(image_id)


class CloneDepthBoundTest(RbdTestCase):

    worker_conf = {'rbd.max_clone_depth': '1'}

    def test_too_deep_clone_is_flattened_synchronously(self):
        parent, content = self.make_rbd_disk()
        with rbd.Image(self.vms, parent) as image:
            image.create_snap('base')
        name = f'{uuid.uuid4()}_disk'
        rbd.RBD().clone(self.vms, parent, 'base', self.vms, name)
        self.addCleanup(rbd_helpers.remove_rbd, self.vms, parent)
        self.addCleanup(rbd_helpers.remove_rbd, self.vms, name)
        image_id, end = self.snapshot_ok(name)
        self.assert_cloned(image_id, end, content)
        self.assertEqual('sync', end['flatten_policy'])
        self.assertIn('max_clone_depth', end['plan_reason'])
        self.assertIsNone(self.parent_of(image_id))
        self.assert_glance_delete_removes_clone(image_id)


class CloneNeverFlattenTest(RbdTestCase):

    worker_conf = {'rbd.flatten': 'never'}

    def test_clone_v2_outlives_the_instance_disk(self):
        name, content = self.make_rbd_disk()
        image_id, end = self.snapshot_ok(name)
        self.assert_cloned(image_id, end, content)
        self.assertEqual('never', end['flatten_policy'])
        # Still a clone of the disk, but no visible snapshot pins the disk.
        self.assertEqual('vms', self.parent_of(image_id)[0])
        self.assertEqual([], self.worker_snaps(name))
        # Nova without rbd_move_parent_to_trash_on_remove cannot delete.
        self.assertRaises(rbd.ImageHasSnapshots, self.nova_delete, name)
        # With it, the disk goes to the trash and the image stays readable.
        self.nova_delete(name, move_parent_to_trash=True)
        self.assertNotIn(name, rbd.RBD().list(self.vms))
        self.assertEqual(content, self.read_rbd(self.images, image_id,
                                                'snap'))
        self.assertEqual(content, b''.join(self.glance.images.data(image_id)))
        self.assert_glance_delete_removes_clone(image_id)
        # The trashed disk is purged once its last clone is gone.
        self.assertEqual([], [n for n in self._trash_names('vms')
                              if n == name])

    def _trash_names(self, pool):
        # Pacific's rbd.RBD().trash_list() raises IndexError on USER_PARENT
        # entries, so ask the CLI.
        out = subprocess.run(
            ['rbd', '-c', self.cluster.conf_path, '--id', 'admin',
             '--keyring', self.cluster.admin_keyring, 'trash', 'ls', '-a',
             '--format', 'json', pool],
            check=True, capture_output=True, text=True).stdout
        return [entry['name'] for entry in json.loads(out)]


class CloneFailureCleanupTest(RbdTestCase):
    """Glance refuses the location after the clone exists.

    The worker user here is a plain project member (no admin: Glance's
    store details are refused), so the operator's ``glance_pool`` is
    trusted, and it is wrong: the clone lands in ``vms`` and Glance answers
    "Invalid location". Everything must be undone.
    """

    worker_conf = {'rbd.glance_store': 'ceph', 'rbd.glance_pool': 'vms'}

    def test_refused_location_leaves_nothing(self):
        self.context = o_context.RequestContext(
            user_id=glance_service.IDENTITY_HEADERS['X-User-Id'],
            project_id=glance_service.IDENTITY_HEADERS['X-Project-Id'],
            roles=['member', 'reader'], auth_token='unused')
        name, content = self.make_rbd_disk()
        instance, _ = self.define_rbd_domain(name)
        image_id = self.create_image()
        events = self.snapshot(instance, image_id, 'raw')
        error = events[-1]
        self.assertEqual(ERROR, error.event_type)
        self.assertEqual('GlanceError', error.payload['error_code'],
                         error.payload['error_message'])
        self.assertEqual('clone', error.payload['strategy'])
        self.assertIn('snapshot.source_released',
                      [e.event_type for e in events])
        self.assertEqual('deleted', self.image_status(image_id))
        # The error event is sent before the plan's cleanup runs.
        self.wait_gone(self.vms, image_id)
        self.assertNotIn(image_id, rbd.RBD().list(self.images))
        # Measured: the source snapshot may show for ~0.1 s in librbd's
        # snapshot trash (removed while the clone's detach completed);
        # librbd purges it by itself. Nothing may stay.
        deadline = time.monotonic() + 10
        while True:
            with rbd.Image(self.vms, name, read_only=True) as image:
                snaps = list(image.list_snaps())
            if not snaps or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual([], snaps)
        self.assertEqual(content, self.read_rbd(self.vms, name))


class StreamToFileStoreTest(RbdTestCase):

    worker_conf = {'rbd.glance_store': 'local'}

    def test_raw_and_qcow2_streamed_into_file_store(self):
        name, content = self.make_rbd_disk()
        for fmt in ('raw', 'qcow2'):
            image_id, end = self.snapshot_ok(name, fmt)
            self.assertEqual('stream', end['strategy'])
            self.assertEqual(fmt, end['target_format'])
            self.assertEqual('local',
                             self.glance.images.get(image_id)['stores'])
            self.assertTrue(end['image_hashed'])
            self.assertStreamedBack(image_id, end, content, fmt)
            self.assertEqual([], self.worker_snaps(name))
