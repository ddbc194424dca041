"""A real Glance with an rbd store on the test Ceph cluster does what the
``clone`` strategy relies on.

Why: the clone plan never moves data; it only works if Glance accepts an
``rbd://<fsid>/images/<name>/snap`` location for an image that already lives
in its pool, serves its data, and takes ownership of it (deleting the Glance
image deletes the RBD image). Two ways to register the location exist:

* PATCH ``add /locations/-`` (glanceclient ``images.add_location``): needs
  ``show_multiple_locations = True``; synchronous, the image is active at
  once, no checksum or hash is computed.
* POST ``/v2/images/{id}/locations`` (API v2.17, glanceclient
  ``images.add_image_location``): the image must be ``queued`` and the
  caller must carry the ``service`` role (for any non-http store); a
  ``location_import`` task then sets the location, makes the image active
  and, with ``do_secure_hash = True``, reads the whole image once to set
  checksum and os_hash_value.
"""

import hashlib
import io
import os
import shutil
import tempfile
import time
import uuid

import glanceclient
import glanceclient.exc
import rbd
import testtools
from oslo_utils import units

from tests.services import ceph
from tests.services import glance

MiB = units.Mi
SNAP = "snap"


class TestGlanceRbdStore(testtools.TestCase):
    """One Ceph cluster and one Glance (``local`` + ``ceph`` stores)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.state_dir = tempfile.mkdtemp(prefix="glance-rbd-", dir="/tmp")
        try:
            cls.cluster = ceph.start(os.path.join(cls.state_dir, "ceph"))
            try:
                cls.glance = glance.start(
                    os.path.join(cls.state_dir, "glance"),
                    rbd=cls.cluster.glance_rbd("images"))
            except BaseException:
                cls.cluster.stop()
                raise
        except BaseException:
            shutil.rmtree(cls.state_dir, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.glance.stop()
        finally:
            cls.cluster.stop()
            shutil.rmtree(cls.state_dir, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.client = self.glance.client()
        conn = self.cluster.connect()
        self.addCleanup(conn.shutdown)
        self.ioctx = conn.open_ioctx("images")
        self.addCleanup(self.ioctx.close)

    # --- helpers -------------------------------------------------------------

    def _new_image(self, name):
        """A queued raw image, deleted (with its RBD data) after the test."""
        image = self.client.images.create(
            name=name, disk_format="raw", container_format="bare")
        self.addCleanup(self._delete_image, image.id)
        return image

    def _delete_image(self, image_id):
        try:
            self.client.images.delete(image_id)
        except glanceclient.exc.HTTPNotFound:
            pass

    def _rbd_snapshot(self, data):
        """An RBD image in ``images`` holding data, snapshotted and protected.

        The way the clone strategy leaves it: Glance is told about
        ``<name>@snap`` and owns it from then on.
        """
        name = "src-" + uuid.uuid4().hex[:8]
        rbd.RBD().create(self.ioctx, name, len(data))
        self.addCleanup(self._remove_rbd_image, name)
        with rbd.Image(self.ioctx, name) as img:
            img.write(data, 0)
            img.create_snap(SNAP)
            img.protect_snap(SNAP)
        return name, f"rbd://{self.cluster.fsid}/images/{name}/{SNAP}"

    def _remove_rbd_image(self, name):
        """Undo _rbd_snapshot if Glance did not already delete the image."""
        if name not in rbd.RBD().list(self.ioctx):
            return
        with rbd.Image(self.ioctx, name) as img:
            for snap in img.list_snaps():
                if img.is_protected_snap(snap["name"]):
                    img.unprotect_snap(snap["name"])
                img.remove_snap(snap["name"])
        rbd.RBD().remove(self.ioctx, name)

    def _download(self, image_id):
        return b"".join(self.client.images.data(image_id))

    def _wait_for_hash(self, image_id, timeout=30):
        """The location_import task hashes after going active: wait for it."""
        deadline = time.monotonic() + timeout
        while True:
            image = self.client.images.get(image_id)
            if image.os_hash_value or time.monotonic() > deadline:
                return image
            time.sleep(0.1)

    def _assert_registered(self, image, url, data):
        self.assertEqual("active", image.status)
        self.assertEqual(len(data), image.size)
        self.assertEqual("ceph", image.stores)
        self.assertEqual([{"url": url, "metadata": {"store": "ceph"}}],
                         image.locations)
        self.assertEqual(data, self._download(image.id))

    def _assert_glance_owns(self, image_id, rbd_name):
        """Deleting the Glance image deletes the RBD image behind it."""
        self.client.images.delete(image_id)
        self.assertNotIn(rbd_name, rbd.RBD().list(self.ioctx))

    # --- tests ---------------------------------------------------------------

    def test_upload_to_ceph_store_lands_in_images_pool(self):
        data = os.urandom(3 * MiB)
        image = self._new_image("upload")
        self.client.images.upload(image.id, io.BytesIO(data), backend="ceph")
        image = glance.wait_for_status(self.client, image.id, "active")
        url = f"rbd://{self.cluster.fsid}/images/{image.id}/{SNAP}"
        self._assert_registered(image, url, data)
        with rbd.Image(self.ioctx, image.id, read_only=True) as img:
            self.assertEqual([SNAP], [s["name"] for s in img.list_snaps()])
            self.assertTrue(img.is_protected_snap(SNAP))
            self.assertEqual(data, img.read(0, len(data)))
        self._assert_glance_owns(image.id, image.id)

    def test_add_location_patch_registers_existing_snapshot(self):
        data = os.urandom(4 * MiB)
        name, url = self._rbd_snapshot(data)
        image = self._new_image("add-location-patch")
        self.client.images.add_location(image.id, url, {})
        image = self.client.images.get(image.id)
        self._assert_registered(image, url, data)
        self.assertIsNone(image.os_hash_value)
        self._assert_glance_owns(image.id, name)

    def test_add_location_post_registers_existing_snapshot(self):
        data = os.urandom(4 * MiB)
        name, url = self._rbd_snapshot(data)
        image = self._new_image("add-location-post")
        self.client.images.add_image_location(image.id, url)
        image = glance.wait_for_status(self.client, image.id, "active")
        image = self._wait_for_hash(image.id)
        self._assert_registered(image, url, data)
        self.assertEqual(hashlib.sha512(data).hexdigest(),
                         image.os_hash_value)
        # The hash is saved before the task ends: see wait_for_tasks.
        glance.wait_for_tasks(self.client, image.id)
        self._assert_glance_owns(image.id, name)

    def test_add_location_post_needs_service_role(self):
        _, url = self._rbd_snapshot(os.urandom(MiB))
        image = self._new_image("add-location-no-service")
        headers = dict(glance.IDENTITY_HEADERS, **{"X-Roles": "admin,member"})
        client = glanceclient.Client("2", endpoint=self.glance.url,
                                     token="unused")
        client.http_client.session.headers.update(headers)
        self.assertRaises(glanceclient.exc.HTTPForbidden,
                          client.images.add_image_location, image.id, url)
        self.assertEqual("queued", self.client.images.get(image.id).status)
