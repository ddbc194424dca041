"""The direct plan: when it is chosen, what it writes, what it undoes.

No Ceph here: the RBD side (``rbd_write.GlanceRbdImage``) is replaced by a
recorder, the disk is a real sparse raw file read through its real view.
The functional tests (tests/functional/sources/test_direct.py) write into
a real Glance's real RBD pool.
"""

import hashlib
import os
from unittest import mock

import fixtures
import testtools
from oslo_config import fixture as config_fixture

from snapworker import exception
from snapworker.conf import CONF
from snapworker.sources import base
from snapworker.sources import ceph
from snapworker.sources import direct
from snapworker.sources import file as file_source
from snapworker.sources import rbd_write
from snapworker.sources import reflink
from snapworker.streams import extents

MiB = 1024 * 1024
IMAGE_ID = '5b0f3f0e-2d5c-4b6e-9a51-0f8f2a1d3c4e'
RBD_STORE = {'id': 'ceph', 'default': False, 'type': 'rbd',
             'properties': {'pool': 'images', 'chunk_size': 8 * MiB,
                            'thin_provisioning': False}}
FILE_STORE = {'id': 'local', 'default': True, 'type': 'file',
              'properties': {'data_dir': '/var/lib/glance/images/'}}
IDS_ONLY = [{'id': 'local', 'default': True}, {'id': 'ceph'}]


class RbdTargetTestCase(testtools.TestCase):
    """Which store a direct write would go to, from Glance's answer."""

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(CONF))
        self.conf.config(direct_write=True, group='rbd')

    def _target(self, stores, store_id=None):
        return direct.rbd_target(stores, store_id, CONF)

    def test_off_by_default(self):
        self.conf.config(direct_write=False, group='rbd')
        self.assertIsNone(self._target([RBD_STORE], 'ceph'))

    def test_the_snapshot_store_when_it_is_rbd(self):
        self.assertEqual(
            direct.RbdTarget('ceph', 'images', 8 * MiB),
            self._target([FILE_STORE, RBD_STORE], 'ceph'))

    def test_glances_default_store_when_none_is_named(self):
        self.assertIsNone(self._target([FILE_STORE, RBD_STORE]))
        rbd_default = dict(RBD_STORE, default=True)
        self.assertEqual('images',
                         self._target([FILE_STORE | {'default': False},
                                       rbd_default]).pool)

    def test_a_file_store_is_uploaded_to(self):
        self.assertIsNone(self._target([FILE_STORE, RBD_STORE], 'local'))

    def test_unknown_store_types_need_the_operators_pool(self):
        self.assertIsNone(self._target(IDS_ONLY, 'ceph'))
        self.assertIsNone(self._target([], None))
        self.conf.config(glance_pool='images', group='rbd')
        self.assertEqual(direct.RbdTarget('ceph', 'images'),
                         self._target(IDS_ONLY, 'ceph'))
        self.assertEqual(direct.RbdTarget(None, 'images'),
                         self._target([], None))

    def test_stores_not_asked_means_no_direct_write(self):
        self.conf.config(glance_pool='images', group='rbd')
        self.assertIsNone(self._target(None, 'ceph'))

    def test_order_follows_the_stores_chunk_size(self):
        self.assertEqual(23, rbd_write.order_of(8 * MiB))
        self.assertEqual(22, rbd_write.order_of(4 * MiB))
        for odd in (None, 0, 3 * MiB, 1 << 40, 'x'):
            self.assertEqual(rbd_write.DEFAULT_ORDER,
                             rbd_write.order_of(odd))


class FileSourceDirectTestCase(testtools.TestCase):
    """A file source picks ``direct`` only where it applies."""

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(CONF))
        self.dir = self.useFixture(fixtures.TempDir()).path
        self.conf.config(instances_path=self.dir,
                         scratch_dir=os.path.join(self.dir, 'scratch'))
        self.conf.config(direct_write=True, group='rbd')
        self.path = os.path.join(self.dir, 'disk')
        with open(self.path, 'wb') as f:
            f.truncate(8 * MiB)

    def _plan(self, target='raw', stores=(RBD_STORE,), **kwargs):
        source = file_source.FileSource(self.path, 'raw', CONF)
        self.addCleanup(source.close)
        source.inspect()
        return source.plan(target, list(stores), store_id='ceph', **kwargs)

    def test_raw_into_an_rbd_store_is_written_directly(self):
        plan = self._plan()
        self.assertEqual(('direct', 'raw'),
                         (plan.strategy, plan.target_format))
        self.assertIn('rbd pool images', plan.reason)

    def test_qcow2_target_streams(self):
        self.assertEqual('stream', self._plan('qcow2').strategy)

    def test_a_suspended_guest_still_gets_its_copy_first(self):
        self.assertEqual('convert',
                         self._plan(release_first=True).strategy)

    def test_after_a_reflink_copy_the_copy_is_written_directly(self):
        self.useFixture(fixtures.MockPatch(
            'snapworker.sources.reflink.supported', return_value=True))
        plan = self._plan(release_first=True)
        self.assertEqual(('direct', 'raw'),
                         (plan.strategy, plan.target_format))
        self.assertIn('reflink copy', plan.reason)
        self.assertIn('rbd pool images', plan.reason)
        # No rbd store: the copy is streamed.
        self.assertEqual('stream', self._plan(
            release_first=True, stores=(FILE_STORE,)).strategy)

    def test_stores_asked_for_only_when_allowed(self):
        source = file_source.FileSource(self.path, 'raw', CONF)
        self.assertTrue(source.wants_glance_stores)
        self.conf.config(direct_write=False, group='rbd')
        self.assertFalse(source.wants_glance_stores)
        self.assertEqual('stream', self._plan().strategy)


class _Context(base.PlanContext):
    """Records the plan's calls, in order."""

    image_id = IMAGE_ID

    def __init__(self):
        super().__init__()
        self.calls = []
        self.fail_on = None

    def _record(self, *call):
        self.calls.append(call)
        if self.fail_on == call[0]:
            raise exception.SourceChanged(what='test')

    def upload(self, stream, disk_format, store=None, reads_source=True):
        raise AssertionError('a direct plan uploads nothing')

    def register_location(self, url, validation_data=None):
        self._record('register_location', url, validation_data)

    def source_released(self):
        self._record('source_released')

    def track(self, kind, ref):
        self._record('track', kind, ref)

    def handed_over(self, kind, ref, to, **details):
        self._record('handed_over', kind, ref, to)


class _FakeImage:
    """Stands for ``rbd_write.GlanceRbdImage``: keeps what is written."""

    def __init__(self, conf, pool, name, **kwargs):
        self.ref = ceph.RbdRef(pool, name)
        self.writes = []
        self.bytes_written = 0
        self.removed = self.closed = self.created = False
        self.fail_write = False
        _FakeImage.last = self

    def create(self, size, order, fsid=None):
        self.created = (size, order)

    def write(self, offset, data):
        if self.fail_write:
            raise exception.RbdError(operation='write', target='x',
                                     reason='pool full')
        self.writes.append((offset, bytes(data)))
        self.bytes_written += len(data)

    def finish(self):
        pass

    @property
    def url(self):
        return f'rbd://fsid/{self.ref.pool}/{self.ref.image}/snap'

    def remove(self):
        self.removed = True

    def close(self):
        self.closed = True


class _Map(extents.DiskView):
    """A view with a given map over given content (a hostile guest's)."""

    def __init__(self, content, extent_list):
        super().__init__()
        self.content = content
        self.map = extent_list

    @property
    def virtual_size(self):
        return len(self.content)

    def extents(self):
        return iter(self.map)

    def pread(self, offset, length):
        return self._count(self.content[offset:offset + length], offset,
                           length)

    def close(self):
        pass


class DirectPlanRunTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(CONF))
        self.conf.config(chunk_size=MiB, group='worker')
        self.useFixture(fixtures.MonkeyPatch(
            'snapworker.sources.rbd_write.GlanceRbdImage', _FakeImage))
        self.dir = self.useFixture(fixtures.TempDir()).path

    def _disk(self):
        """8 MiB raw: data at 1 MiB, a written-zero MiB at 4, a hole
        elsewhere."""
        path = os.path.join(self.dir, 'disk')
        content = bytearray(8 * MiB)
        content[MiB:2 * MiB] = b'\x5a' * MiB
        content[5 * MiB + 7:5 * MiB + 9] = b'hi'
        with open(path, 'wb') as f:
            f.truncate(len(content))
            f.seek(MiB)
            f.write(content[MiB:2 * MiB])
            f.seek(4 * MiB)
            f.write(bytes(MiB))
            f.write(content[5 * MiB:6 * MiB])
        return path, bytes(content)

    def _plan(self, open_view, size):
        return direct.DirectPlan(
            'test', open_view, size,
            direct.RbdTarget('ceph', 'images', 8 * MiB), CONF)

    def test_only_data_written_whole_disk_hashed(self):
        path, content = self._disk()
        ctx = _Context()
        plan = self._plan(lambda: extents.RawFileView(path), len(content))
        result = plan.run(ctx)
        plan.cleanup()
        image = _FakeImage.last
        self.assertEqual([(MiB, content[MiB:2 * MiB]),
                          (5 * MiB, content[5 * MiB:6 * MiB])],
                         image.writes)
        self.assertEqual((len(content), 23), image.created)
        self.assertEqual(base.PlanResult(store='ceph',
                                         bytes_written=2 * MiB), result)
        validation = {'checksum': hashlib.md5(content).hexdigest(),
                      'os_hash_algo': 'sha512',
                      'os_hash_value': hashlib.sha512(content).hexdigest()}
        ref = f'images/{IMAGE_ID}'
        self.assertEqual([
            ('track', base.RBD_IMAGE, ref),
            ('source_released',),
            ('handed_over', base.RBD_IMAGE, ref, base.GLANCE),
            ('register_location', f'rbd://fsid/images/{IMAGE_ID}/snap',
             validation)], ctx.calls)
        self.assertEqual(3 * MiB, ctx.bytes_read)
        self.assertEqual((False, True), (image.removed, image.closed))

    def test_a_failed_write_removes_the_image(self):
        path, content = self._disk()
        ctx = _Context()
        plan = self._plan(lambda: extents.RawFileView(path), len(content))
        real_create = _FakeImage.create

        def failing_create(image, *args, **kwargs):
            real_create(image, *args, **kwargs)
            image.fail_write = True

        self.useFixture(fixtures.MonkeyPatch(
            f'{__name__}._FakeImage.create', failing_create))
        self.assertRaises(exception.RbdError, plan.run, ctx)
        self.assertTrue(_FakeImage.last.removed)
        self.assertTrue(_FakeImage.last.closed)
        plan.cleanup()  # idempotent
        self.assertNotIn('register_location', [c[0] for c in ctx.calls])

    def test_a_failed_removal_keeps_the_first_error(self):
        path, content = self._disk()
        ctx = _Context()
        ctx.fail_on = 'source_released'
        plan = self._plan(lambda: extents.RawFileView(path), len(content))

        def remove(image):
            raise OSError('pool full')

        self.useFixture(fixtures.MonkeyPatch(
            f'{__name__}._FakeImage.remove', remove))
        self.assertRaises(exception.SourceChanged, plan.run, ctx)
        self.assertTrue(_FakeImage.last.closed)
        # Left for the journal to keep (the pipeline cleans up again).
        self.assertEqual([(base.RBD_IMAGE, str(_FakeImage.last.ref))],
                         plan.cleanup())

    def test_a_changed_reflink_copy_is_never_registered(self):
        # After a reflink release the direct plan reads the copy; the copy
        # is checked before the location is registered, not after.
        path, content = self._disk()
        ctx = _Context()
        copy = mock.Mock(**{'verify_unchanged.side_effect':
                            exception.SourceChanged(what='the copy')})
        plan = self._plan(lambda: extents.RawFileView(path), len(content))
        self.assertRaises(exception.SourceChanged, plan.run,
                          reflink.CopyContext(ctx, copy))
        self.assertEqual([], [c for c in ctx.calls
                              if c[0] in ('source_released',
                                          'register_location')])
        self.assertTrue(_FakeImage.last.removed)
        # Unchanged: released (the job ignores it), then registered.
        copy.verify_unchanged.side_effect = None
        ctx = _Context()
        plan = self._plan(lambda: extents.RawFileView(path), len(content))
        plan.run(reflink.CopyContext(ctx, copy))
        plan.cleanup()
        self.assertEqual(['source_released', 'handed_over',
                          'register_location'],
                         [c[0] for c in ctx.calls if c[0] != 'track'])

    def test_a_changed_source_removes_the_image(self):
        path, content = self._disk()
        ctx = _Context()
        ctx.fail_on = 'source_released'
        plan = self._plan(lambda: extents.RawFileView(path), len(content))
        self.assertRaises(exception.SourceChanged, plan.run, ctx)
        self.assertTrue(_FakeImage.last.removed)
        self.assertNotIn('handed_over', [c[0] for c in ctx.calls])

    def test_a_failed_registration_removes_the_image(self):
        path, content = self._disk()
        ctx = _Context()
        ctx.fail_on = 'register_location'
        plan = self._plan(lambda: extents.RawFileView(path), len(content))
        self.assertRaises(exception.SourceChanged, plan.run, ctx)
        self.assertTrue(_FakeImage.last.removed)

    def test_hostile_maps_write_nothing_outside(self):
        size = 4 * MiB
        content = b'\x01' * size
        ext = extents.Extent
        hostile = (
            [ext(0, size + MiB, True)],  # past the end
            [ext(0, MiB, True), ext(MiB // 2, 3 * MiB, True)],  # overlap
            [ext(0, MiB, True), ext(2 * MiB, 2 * MiB, True)],  # gap
            [ext(0, MiB, True)],  # short
            [ext(0, 0, True), ext(0, size, True)],  # empty
            [ext(-MiB, size + MiB, True)])  # negative
        for bad in hostile:
            ctx = _Context()
            plan = self._plan(lambda bad=bad: _Map(content, bad), size)
            self.assertRaises(exception.SourceReadError, plan.run, ctx)
            image = _FakeImage.last
            self.assertTrue(image.removed)
            for offset, data in image.writes:
                self.assertLessEqual(offset + len(data), size)
                self.assertGreaterEqual(offset, 0)

    def test_a_view_of_another_size_is_refused(self):
        content = b'\x01' * MiB
        plan = self._plan(
            lambda: _Map(content, [extents.Extent(0, MiB, True)]), 2 * MiB)
        self.assertRaises(exception.SourceReadError, plan.run, _Context())
        self.assertEqual([], _FakeImage.last.writes)


class LeftoverTestCase(testtools.TestCase):

    def test_a_journalled_image_is_removed_with_its_snapshot(self):
        with mock.patch.object(ceph, 'connect') as connect, \
                mock.patch.object(ceph, 'break_stale_lock') as unlock, \
                mock.patch.object(ceph, 'remove_image') as remove:
            from snapworker import sources
            sources.remove_leftover(CONF, base.RBD_IMAGE,
                                    f'images/{IMAGE_ID}')
            self.assertRaises(ValueError, sources.remove_leftover, CONF,
                              base.RBD_IMAGE, 'images/not-an-image-id')
        ioctx = connect.return_value.open_ioctx.return_value.__enter__()
        # A killed worker's exclusive lock is broken first.
        unlock.assert_called_once_with(ioctx, IMAGE_ID)
        remove.assert_called_once_with(ioctx, IMAGE_ID)
