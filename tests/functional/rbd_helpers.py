"""What the RBD functional tests share: pools, disks, Nova-style domains.

A mixin for ``base.FunctionalTestCase`` subclasses: it connects to the
run's Ceph cluster as admin (the tests look at what the worker did,
with more rights than the worker has) and opens the ``vms`` (instance
disks) and ``images`` (Glance) pools.
"""

import time
import uuid

import rbd
from oslo_utils import units

from snapworker.sources import ceph as sw_ceph
from tests.services import ceph

MiB = units.Mi
#: The worker's own snapshots on instance disks start with this.
WORKER_SNAP_PREFIX = 'snapworker-'


class RbdTestMixin:

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.cluster = ceph.CephCluster.from_dict(cls.services['ceph'])
        cls.conn = cls.cluster.connect(admin=True)
        cls.vms = cls.conn.open_ioctx('vms')
        cls.images = cls.conn.open_ioctx('images')

    @classmethod
    def tearDownClass(cls):
        cls.vms.close()
        cls.images.close()
        cls.conn.shutdown()
        super().tearDownClass()

    def make_rbd_disk(self, size, writes):
        """``vms/<uuid>_disk`` as Nova names it, with ``writes``.

        :param writes: ``(offset, length, byte)`` runs; the rest of the
            disk is never written (holes).
        :returns: (name, the disk's whole content).
        """
        name = f'{uuid.uuid4()}_disk'
        rbd.RBD().create(self.vms, name, size)
        self.addCleanup(remove_rbd, self.vms, name)
        content = bytearray(size)
        with rbd.Image(self.vms, name) as image:
            for offset, length, byte in writes:
                data = bytes([byte]) * length
                image.write(data, offset)
                content[offset:offset + length] = data
        return name, bytes(content)

    def define_rbd_domain(self, name, running=False):
        """A domain whose root disk is Nova's rbd network disk."""
        return self.define_domain(running=running, disk_xml=(
            "<disk type='network' device='disk'>"
            "<driver name='qemu' type='raw'/>"
            f"<source protocol='rbd' name='vms/{name}'>"
            "<host name='127.0.0.1' port='6789'/></source>"
            "<target dev='vda' bus='virtio'/></disk>"))

    @staticmethod
    def read_rbd(ioctx, name, snapshot=None):
        with rbd.Image(ioctx, name, snapshot=snapshot,
                       read_only=True) as image:
            return image.read(0, image.size())

    def worker_snaps(self, name):
        """Visible snapshots of an instance disk that the worker made."""
        with rbd.Image(self.vms, name, read_only=True) as image:
            return [s['name'] for s in image.list_snaps()
                    if s['name'].startswith(WORKER_SNAP_PREFIX)]

    def wait_no_worker_snaps(self, name, timeout=60):
        """Until the worker (or its background flatten) dropped them."""
        deadline = time.monotonic() + timeout
        while self.worker_snaps(name):
            if time.monotonic() > deadline:
                self.fail(f'snapshots left on {name}: '
                          f'{self.worker_snaps(name)}\n'
                          f'{self.worker.log_tail()}')
            time.sleep(0.1)


def remove_rbd(ioctx, name, timeout=10):
    """Remove an image and its snapshots, as Nova deletes a disk.

    Retried on ImageBusy like Nova's ``rbd_destroy_volume_retries``: a
    client that just closed the image may still hold its watch. Gone
    already is fine; one that cannot go (a clone still depends on it) is
    left after ``timeout``, as this only cleans up after a test.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            # The worker's own removal (gone already is fine there).
            sw_ceph.remove_image(ioctx, name)
            return
        except (rbd.ImageBusy, rbd.ImageHasSnapshots):
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
