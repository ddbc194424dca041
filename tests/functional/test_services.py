"""The test services work: a real Glance takes and serves an image, the
unprivileged libvirtd keeps a domain for other connections.

Everything else in the functional suite builds on these two, so a broken
service setup shows here first, with the service's log in the error.
"""

import hashlib
import io
import os
import shutil
import tempfile
import unittest

import glanceclient.exc
import libvirt

from tests.services import glance
from tests.services import libvirtd

DOMAIN_XML = """
<domain type='test'>
  <name>snapworker-services-check</name>
  <memory unit='MiB'>64</memory>
  <os><type>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/nova/instances/abc/disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


class ServicesTestCase(unittest.TestCase):
    """Start Glance and libvirtd once for the class (Glance takes ~3 s)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.state_dir = tempfile.mkdtemp(prefix="snapworker-services-")
        try:
            cls.glance_svc = glance.start(
                os.path.join(cls.state_dir, "glance"))
            cls.libvirtd_svc = libvirtd.start(cls.state_dir)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for name in ("libvirtd_svc", "glance_svc"):
            if hasattr(cls, name):
                getattr(cls, name).stop()
        shutil.rmtree(cls.state_dir, ignore_errors=True)
        super().tearDownClass()

    def test_glance_upload_and_download(self):
        client = self.glance_svc.client()
        data = os.urandom(3 * 1024 * 1024)
        image = client.images.create(name="services-check",
                                     disk_format="raw",
                                     container_format="bare")
        self.addCleanup(client.images.delete, image.id)

        client.images.upload(image.id, io.BytesIO(data))

        image = glance.wait_for_status(client, image.id, "active")
        self.assertEqual(len(data), image.size)
        self.assertEqual("sha512", image.os_hash_algo)
        self.assertEqual(hashlib.sha512(data).hexdigest(),
                         image.os_hash_value)
        self.assertEqual(data, b"".join(client.images.data(image.id)))

    def test_glance_refuses_requests_without_identity_headers(self):
        client = glanceclient.Client("2", endpoint=self.glance_svc.url,
                                     token="unused")
        with self.assertRaises(glanceclient.exc.HTTPUnauthorized):
            list(client.images.list())

    def test_libvirtd_keeps_domain_across_connections(self):
        conn = libvirt.open(self.libvirtd_svc.uri)
        self.addCleanup(conn.close)
        conn.defineXML(DOMAIN_XML)
        self.addCleanup(self._undefine, "snapworker-services-check")

        other = libvirt.open(self.libvirtd_svc.uri)
        self.addCleanup(other.close)
        dom = other.lookupByName("snapworker-services-check")

        self.assertEqual(libvirt.VIR_DOMAIN_SHUTOFF, dom.state()[0])
        self.assertIn("/var/lib/nova/instances/abc/disk", dom.XMLDesc())

    def _undefine(self, name):
        conn = libvirt.open(self.libvirtd_svc.uri)
        try:
            conn.lookupByName(name).undefine()
        finally:
            conn.close()
