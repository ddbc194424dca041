"""RBD references, and what the Ceph side accepts from a journal file.

No Ceph here: references are parsed and formatted, and the functions
recovery calls must refuse what the worker never journals before they
connect anywhere.
"""

from unittest import mock

import fixtures
import testtools

from snapworker import exception
from snapworker import sources
from snapworker.conf import CONF
from snapworker.sources import base
from snapworker.sources import ceph

FSID = '0f4a8c52-6a11-4a4e-9a0e-6b3d2f1c9e77'
OTHER_FSID = '7d1b2e90-3c4f-4f1a-8e2d-5a6b7c8d9e0f'
IMAGE_ID = '3c2d1e0f-aaaa-4bbb-8ccc-123456789abc'


class RbdRefTestCase(testtools.TestCase):

    def test_spec_round_trip(self):
        for text in ('vms/uuid_disk', 'vms/uuid_disk@snapworker-x',
                     'images/base@snap'):
            self.assertEqual(text, str(ceph.RbdRef.parse(text)))
        ref = ceph.RbdRef.parse('vms/uuid_disk@snapworker-x')
        self.assertEqual(('vms', 'uuid_disk', 'snapworker-x', None),
                         (ref.pool, ref.image, ref.snapshot, ref.fsid))

    def test_url_round_trip(self):
        url = f'rbd://{FSID}/images/{IMAGE_ID}/snap'
        ref = ceph.RbdRef.parse(url, fsid=FSID)
        self.assertEqual(ceph.RbdRef('images', IMAGE_ID, 'snap', FSID), ref)
        self.assertEqual(url, ref.url)
        self.assertEqual(f'images/{IMAGE_ID}@snap', str(ref))

    def test_url_parts_are_quoted(self):
        ref = ceph.RbdRef('my pool', 'disk%1', 'a b', FSID)
        self.assertEqual(f'rbd://{FSID}/my%20pool/disk%251/a%20b', ref.url)
        self.assertEqual(ref, ceph.RbdRef.parse(ref.url))

    def test_url_needs_fsid_and_snapshot(self):
        self.assertRaises(ValueError, getattr,
                          ceph.RbdRef('images', IMAGE_ID, 'snap'), 'url')
        self.assertRaises(ValueError, getattr,
                          ceph.RbdRef('images', IMAGE_ID, fsid=FSID), 'url')

    def test_at_names_a_snapshot_of_the_image(self):
        ref = ceph.RbdRef('vms', 'disk')
        self.assertEqual('vms/disk@s', str(ref.at('s')))
        self.assertIsNone(ref.snapshot)

    def test_hostile_specs_refused(self):
        for text in ('', 'no-pool', '/image', 'pool/', 'pool/image@',
                     '@snap', 'a/b/c', 'pool//image', 'pool/image/@snap',
                     '../image', 'pool/..', 'pool/.', 'pool/..@snap',
                     'pool/image@..', 'pool/image@a/b', 'pool/ima\nge',
                     'pool/image@x\x00', 'pool@x/image', 'pool/a@b@c'):
            self.assertRaises(ValueError, ceph.RbdRef.parse, text)

    def test_hostile_urls_refused(self):
        for url in (f'rbd://{FSID}/images/{IMAGE_ID}',
                    f'rbd://{FSID}/images/{IMAGE_ID}/snap/extra',
                    f'rbd://{FSID}//images/{IMAGE_ID}/snap',
                    f'rbd://{FSID}/images/{IMAGE_ID}/snap/',
                    f'rbd://{FSID}/images//snap',
                    f'rbd://{FSID}/images/{IMAGE_ID}/',
                    f'rbd:///images/{IMAGE_ID}/snap',
                    f'rbd://{FSID}/../{IMAGE_ID}/snap',
                    f'rbd://{FSID}/images/%2E%2E/snap',
                    f'rbd://{FSID}/images/a%2Fb/snap',
                    f'rbd://{FSID}/images/a%40b/snap',
                    f'rbd://{FSID}/images/a%0Ab/snap',
                    f'rbd://not-a-fsid/images/{IMAGE_ID}/snap',
                    f'rbd://{IMAGE_ID}',
                    f'RBD://{FSID}/images/{IMAGE_ID}/snap'):
            self.assertRaises(ValueError, ceph.RbdRef.parse, url)

    def test_wrong_fsid_refused(self):
        url = f'rbd://{OTHER_FSID}/images/{IMAGE_ID}/snap'
        self.assertRaises(ValueError, ceph.RbdRef.parse, url, fsid=FSID)
        self.assertEqual(OTHER_FSID, ceph.RbdRef.parse(url).fsid)

    def test_not_a_string_refused(self):
        for value in (None, 3, b'vms/disk'):
            self.assertRaises(ValueError, ceph.RbdRef.parse, value)

    def test_snapshot_names_are_recognisable(self):
        self.assertEqual('snapworker-1234', ceph.snap_name('1234'))
        self.assertTrue(ceph.snap_name('x').startswith(ceph.SNAP_PREFIX))


class RbdLeftoverTestCase(testtools.TestCase):
    """What the RBD side accepts from a journal file, without Ceph."""

    def test_only_snapworker_snapshots_and_clones(self):
        with mock.patch.object(ceph, 'connect') as connect:
            for kind, ref in ((base.RBD_SNAPSHOT, 'vms/disk@nova-resize'),
                              (base.RBD_SNAPSHOT, 'vms/disk'),
                              (base.RBD_SNAPSHOT,
                               f'rbd://{FSID}/vms/disk/snapworker-x'),
                              (base.RBD_SNAPSHOT, '../disk@snapworker-x'),
                              (base.RBD_CLONE, 'images/not-an-image-id'),
                              (base.RBD_CLONE, f'images/{IMAGE_ID}@snap'),
                              (base.RBD_CLONE, 'no-pool'),
                              ('rbd_volume', f'images/{IMAGE_ID}')):
                self.assertRaises(ValueError, sources.remove_leftover,
                                  CONF, kind, ref)
        connect.assert_not_called()

    def test_flatten_resumed_with_the_journalled_refs(self):
        flattener = mock.Mock()
        done = mock.Mock()
        sources.resume_background(
            flattener, base.FLATTENER, base.RBD_SNAPSHOT,
            'vms/disk@snapworker-x', {'clone': f'images/{IMAGE_ID}'}, done)
        flattener.submit.assert_called_once_with(
            ceph.RbdRef('images', IMAGE_ID),
            ceph.RbdRef('vms', 'disk', 'snapworker-x'), on_done=done)

    def test_flatten_with_forged_refs_not_resumed(self):
        flattener = mock.Mock()
        for ref, details in (('vms/disk@nova-resize',
                              {'clone': f'images/{IMAGE_ID}'}),
                             ('vms/disk@snapworker-x', {}),
                             ('vms/disk@snapworker-x',
                              {'clone': 'vms/other_disk'})):
            self.assertRaises(ValueError, sources.resume_background,
                              flattener, base.FLATTENER, base.RBD_SNAPSHOT,
                              ref, details, None)
        flattener.submit.assert_not_called()

    def test_unknown_background_work_is_refused(self):
        self.assertRaises(ValueError, sources.resume_background, mock.Mock(),
                          'uploader', base.SCRATCH_DIR, '/s/x', {}, None)


class CheckPoolsTestCase(testtools.TestCase):
    """What snapworker-status asks Ceph; the real cluster is in the
    functional tests (tests/functional/cmd/test_status.py)."""

    def setUp(self):
        super().setUp()
        self.conn = mock.Mock()
        self.conn.get_fsid.return_value = FSID
        self.conn.open_ioctx.side_effect = self._open_ioctx
        self.ioctx = mock.MagicMock()
        self.useFixture(fixtures.MockPatchObject(ceph, 'connect',
                                                 return_value=self.conn))

    def _open_ioctx(self, pool):
        if pool == 'gone':
            raise ceph.rados.ObjectNotFound('pool gone')
        return self.ioctx

    def test_each_pool_is_opened_and_read(self):
        self.assertEqual(FSID, ceph.check_pools(CONF, ['images']))
        self.ioctx.__enter__.return_value.stat.assert_called_once_with(
            'rbd_directory')
        self.conn.shutdown.assert_called_once_with()

    def test_a_missing_pool_is_named(self):
        error = self.assertRaises(exception.RbdError, ceph.check_pools,
                                  CONF, ['images', 'gone'])
        self.assertIn('gone', str(error))
        self.conn.shutdown.assert_called_once_with()
