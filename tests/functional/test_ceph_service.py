"""The throw-away Ceph cluster really does what the RBD strategy needs.

Why: every RBD functional test stands on tests/services/ceph.py; if snapshot,
protect and clone into the Glance pool do not work there with the client key
(not admin), the failures elsewhere would be misleading.
"""

import os
import shutil
import tempfile

import rados
import rbd
import testtools
from oslo_utils import units

from tests.services import ceph

MiB = units.Mi
SIZE = 8 * MiB
SNAP = "snap"


class TestCephService(testtools.TestCase):
    """Start a cluster, do one snapshot/clone round trip, stop it cleanly."""

    def setUp(self):
        super().setUp()
        state_dir = tempfile.mkdtemp(prefix="ceph-", dir="/tmp")
        self.addCleanup(shutil.rmtree, state_dir, ignore_errors=True)
        self.cluster = ceph.start(state_dir)
        self.addCleanup(self._stop_and_check)
        self.conn = self.cluster.connect()
        self.addCleanup(self.conn.shutdown)

    def _stop_and_check(self):
        pids = list(self.cluster.pids.values())
        self.cluster.stop()
        for pid in pids:
            self.assertFalse(ceph._running(pid), f"pid {pid} still running")

    def _ioctx(self, pool):
        ioctx = self.conn.open_ioctx(pool)
        self.addCleanup(ioctx.close)
        return ioctx

    def test_snapshot_protect_clone_read_back(self):
        vms, images = self._ioctx("vms"), self._ioctx("images")
        data = os.urandom(SIZE)
        rbd.RBD().create(vms, "disk", SIZE)
        with rbd.Image(vms, "disk") as img:
            self.assertTrue(img.features() & rbd.RBD_FEATURE_FAST_DIFF)
            img.write(data, 0)
            img.create_snap(SNAP)
            img.protect_snap(SNAP)
        rbd.RBD().clone(vms, "disk", SNAP, images, "clone")
        with rbd.Image(images, "clone", read_only=True) as clone:
            self.assertEqual(data, clone.read(0, SIZE))
        rbd.RBD().remove(images, "clone")
        with rbd.Image(vms, "disk") as img:
            img.unprotect_snap(SNAP)
            img.remove_snap(SNAP)
        rbd.RBD().remove(vms, "disk")
        self.assertEqual([], rbd.RBD().list(vms))
        self.assertEqual([], rbd.RBD().list(images))

    def test_clone_v2_needs_no_protect(self):
        """Clone v2 (min compat client mimic) clones an unprotected snap."""
        vms, images = self._ioctx("vms"), self._ioctx("images")
        rbd.RBD().create(vms, "disk", MiB)
        with rbd.Image(vms, "disk") as img:
            img.create_snap(SNAP)
        rbd.RBD().clone(vms, "disk", SNAP, images, "clone")
        rbd.RBD().remove(images, "clone")
        with rbd.Image(vms, "disk") as img:
            img.remove_snap(SNAP)
        rbd.RBD().remove(vms, "disk")

    def test_client_key_is_scoped_to_the_rbd_pools(self):
        """The client key has rbd caps on vms/images only, not admin rights."""
        ret, _, _ = self.conn.mon_command(
            '{"prefix": "osd pool create", "pool": "x", "pg_num": 1}', b"")
        self.assertNotEqual(0, ret)
        self.assertRaises(rados.Error, self.conn.open_ioctx, "x")

    def test_to_dict_round_trip(self):
        d = self.cluster.to_dict()
        self.assertEqual(self.cluster.fsid, d["fsid"])
        self.assertEqual(["vms", "images"], d["pools"])
        self.assertEqual({"mon.a", "mgr.x", "osd.0"}, set(d["pids"]))
        again = ceph.CephCluster.from_dict(d)
        self.assertEqual(self.cluster.conf_path, again.conf_path)
