"""Which plan an RBD source picks, from Glance's stores and [rbd] options.

No Ceph here: the source's facts are set as ``inspect()`` would set them,
and ``plan()`` only looks at them, the configuration and the store list.
The functional tests (tests/functional/sources/test_rbd.py) run the plans.
"""

from unittest import mock

import testtools
from oslo_config import fixture as config_fixture

from snapworker import exception
from snapworker import sources
from snapworker.conf import CONF
from snapworker.hypervisor import RootDisk
from snapworker.sources import base
from snapworker.sources import ceph
from snapworker.sources import rbd as rbd_source
from snapworker.streams import rbd as rbd_stream

FSID = '0f4a8c52-6a11-4a4e-9a0e-6b3d2f1c9e77'
OTHER_FSID = '7d1b2e90-3c4f-4f1a-8e2d-5a6b7c8d9e0f'


def _rbd_store(store_id='ceph', pool='images', fsid=FSID, default=False):
    return {'id': store_id, 'default': default, 'type': 'rbd',
            'properties': {'pool': pool, 'fsid': fsid}}


FILE_STORE = {'id': 'local', 'default': True, 'type': 'file',
              'properties': {'data_dir': '/var/lib/glance/images/'}}
# What a non-admin gets: ids only.
IDS_ONLY = [{'id': 'local', 'default': True}, {'id': 'ceph', 'default': False}]


class RbdPlanTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(CONF))

    def _source(self, parents=(), flattener=True):
        source = rbd_source.RbdSource(
            'vms', 'uuid_disk', CONF,
            flattener=mock.Mock() if flattener else None)
        source.fsid = FSID
        source.facts = base.SourceFacts(
            kind='rbd', format='raw', virtual_size=1 << 30,
            location=source.location, backing_chain=tuple(parents))
        return source

    def _plan(self, target='raw', stores=(), parents=(), flattener=True):
        return self._source(parents, flattener).plan(target, list(stores))

    def test_open_source_gives_rbd_source(self):
        flattener = mock.Mock()
        source = sources.open_source(
            RootDisk(kind='rbd', pool='vms', name='uuid_disk'), CONF,
            flattener=flattener)
        self.assertIsInstance(source, rbd_source.RbdSource)
        self.assertEqual('rbd:vms/uuid_disk', source.location)
        self.assertTrue(source.wants_glance_stores)
        self.assertIs(flattener, source.flattener)

    def test_hostile_disk_name_is_unsupported(self):
        for pool, name in (('vms', '../disk'), ('vms', 'disk@snap'),
                           ('v/ms', 'disk')):
            self.assertRaises(
                exception.UnsupportedDisk, sources.open_source,
                RootDisk(kind='rbd', pool=pool, name=name), CONF)

    def test_rbd_store_same_cluster_raw_clones(self):
        plan = self._plan(stores=[FILE_STORE, _rbd_store()])
        self.assertEqual('clone', plan.strategy)
        self.assertEqual('images', plan._glance_pool)
        self.assertEqual('background', plan.policy)
        self.assertIn('ceph', plan.reason)

    def test_rbd_store_other_cluster_streams(self):
        plan = self._plan(stores=[FILE_STORE, _rbd_store(fsid=OTHER_FSID)])
        self.assertEqual('stream', plan.strategy)
        self.assertIsNone(plan._store_id)

    def test_qcow2_target_streams_into_the_rbd_store(self):
        plan = self._plan('qcow2', stores=[FILE_STORE, _rbd_store()])
        self.assertEqual('stream', plan.strategy)
        self.assertEqual('ceph', plan._store_id)

    def test_default_rbd_store_preferred(self):
        plan = self._plan(stores=[_rbd_store('a', pool='pa'),
                                  _rbd_store('b', pool='pb', default=True)])
        self.assertEqual('pb', plan._glance_pool)

    def test_configured_file_store_streams_into_it(self):
        self.conf.config(glance_store='local', group='rbd')
        plan = self._plan(stores=[FILE_STORE, _rbd_store()])
        self.assertEqual('stream', plan.strategy)
        self.assertEqual('local', plan._store_id)

    def test_configured_rbd_store_clones(self):
        self.conf.config(glance_store='ceph', group='rbd')
        plan = self._plan(stores=[FILE_STORE, _rbd_store(pool='glance')])
        self.assertEqual('clone', plan.strategy)
        self.assertEqual('glance', plan._glance_pool)

    def test_store_details_hidden_glance_pool_option_used(self):
        self.conf.config(glance_pool='images', group='rbd')
        plan = self._plan(stores=IDS_ONLY)
        self.assertEqual('clone', plan.strategy)
        self.assertEqual('images', plan._glance_pool)

    def test_no_details_no_option_streams(self):
        for stores in (IDS_ONLY, []):
            plan = self._plan(stores=stores)
            self.assertEqual('stream', plan.strategy)

    def test_glance_details_win_over_glance_pool_option(self):
        self.conf.config(glance_pool='wrong', group='rbd')
        plan = self._plan(stores=[FILE_STORE, _rbd_store()])
        self.assertEqual('images', plan._glance_pool)
        # And a Glance without an rbd store is believed, too.
        plan = self._plan(stores=[FILE_STORE])
        self.assertEqual('stream', plan.strategy)

    def test_single_store_glance_with_pool_option_clones(self):
        self.conf.config(glance_pool='images', group='rbd')
        plan = self._plan(stores=[])
        self.assertEqual('clone', plan.strategy)

    def test_flatten_policy_from_config(self):
        for policy in ('background', 'sync', 'never'):
            self.conf.config(flatten=policy, group='rbd')
            plan = self._plan(stores=[_rbd_store()])
            self.assertEqual(policy, plan.policy)

    def test_background_without_a_flattener_is_sync(self):
        plan = self._plan(stores=[_rbd_store()], flattener=False)
        self.assertEqual('sync', plan.policy)
        self.assertIn('no background flattener', plan.reason)

    def test_clone_depth_bound_forces_sync(self):
        self.conf.config(max_clone_depth=2, group='rbd')
        plan = self._plan(stores=[_rbd_store()],
                          parents=['images/base@snap'])
        self.assertEqual('background', plan.policy)
        plan = self._plan(stores=[_rbd_store()],
                          parents=['images/a@snap', 'vms/b@x'])
        self.assertEqual('sync', plan.policy)
        self.assertIn('max_clone_depth', plan.reason)



class RbdCleanupTestCase(testtools.TestCase):
    """Every cleanup step runs, whichever failed before it."""

    def test_close_shuts_down_even_if_the_pool_does_not_close(self):
        source = rbd_source.RbdSource('vms', 'uuid_disk', CONF)
        source.ioctx = mock.Mock(**{'close.side_effect': OSError('gone')})
        source.conn = conn = mock.Mock()
        with self.assertLogs(rbd_source.LOG.logger, 'ERROR'):
            source.close()
        conn.shutdown.assert_called_once_with()
        self.assertIsNone(source.ioctx)
        source.close()
        conn.shutdown.assert_called_once_with()

    def test_clone_plan_cleanup_steps_are_isolated(self):
        source = rbd_source.RbdSource('vms', 'uuid_disk', CONF)
        source.ioctx = mock.Mock()
        plan = rbd_source.ClonePlan('raw', 'why', source, 'images', 'sync')
        plan._clone = 'image-id'
        plan._snap = 'snapworker-image-id'
        plan._glance_ioctx = glance_ioctx = mock.Mock(
            **{'close.side_effect': OSError('gone')})
        removed = []

        def remove_image(ioctx, name):
            removed.append(name)
            raise OSError('clone busy')

        def remove_snapshot(ioctx, name, snap):
            removed.append(f'{name}@{snap}')
            raise OSError('snapshot busy')

        with mock.patch.object(ceph, 'remove_image', remove_image), \
                mock.patch.object(ceph, 'remove_snapshot', remove_snapshot), \
                self.assertLogs('snapworker', 'ERROR') as logs:
            leftovers = plan.cleanup()
        self.assertEqual(['image-id', 'uuid_disk@snapworker-image-id'],
                         removed)
        glance_ioctx.close.assert_called_once_with()
        self.assertEqual(3, len(logs.records))
        self.assertIn('vms/uuid_disk@snapworker-image-id', logs.output[1])
        # What could not go is said, for the journal to keep.
        expected = [(base.RBD_CLONE, 'images/image-id'),
                    (base.RBD_SNAPSHOT, 'vms/uuid_disk@snapworker-image-id')]
        self.assertEqual(expected, leftovers)
        # Nothing is tried twice, and the answer stays the same.
        self.assertEqual(expected, plan.cleanup())
        self.assertEqual(2, len(removed))


class RbdViewExtentsTestCase(testtools.TestCase):
    """diff_iterate callbacks become contiguous, covering extents."""

    def _view(self, size, reported):
        class Image:
            closed = False

            def size(self):
                return size

            def diff_iterate(self, offset, length, from_snapshot, cb,
                             include_parent, whole_object):
                assert include_parent and whole_object
                for ext in reported:
                    cb(*ext)

            def read(self, offset, length):
                return bytes(length)

            def close(self):
                self.closed = True

        return rbd_stream.RbdView(Image())

    def test_holes_filled_and_neighbours_merged(self):
        mib = 1 << 20
        view = self._view(16 * mib, [(0, 4 * mib, True),
                                     (4 * mib, 4 * mib, True),
                                     (12 * mib, 8 * mib, True)])
        self.assertEqual(
            [(0, 8 * mib, True), (8 * mib, 4 * mib, False),
             (12 * mib, 4 * mib, True)],
            [tuple(e) for e in view.extents()])

    def test_empty_image_is_one_hole(self):
        view = self._view(5000, [])
        self.assertEqual([(0, 5000, False)],
                         [tuple(e) for e in view.extents()])

    def test_reads_counted_and_image_closed_once(self):
        with self._view(5000, []) as view:
            image = view._image
            self.assertEqual(bytes(100), view.pread(10, 100))
            self.assertEqual(100, view.bytes_read)
        self.assertTrue(image.closed)
        view.close()
