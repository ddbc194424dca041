"""snapworker-status upgrade check (checks.py): each verdict and its advice.

The checks run against what is real in a unit test: directories under a
temporary path, libvirt's in-process test driver (``test:///default``),
the configuration; Glance and Ceph are replaced at the one call each
check makes to them. tests/functional/cmd/test_status.py runs the
command itself against the real services.
"""

import os
from unittest import mock

import fixtures
import testtools
from keystoneauth1 import exceptions as ks_exc
from oslo_config import fixture as config_fixture

from snapworker import checks
from snapworker import exception
from snapworker import journal
from snapworker import rpcapi
from snapworker.conf import CONF

Code = checks.Code


class CheckTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(CONF))
        self.tmp = self.useFixture(fixtures.TempDir()).path
        self.checks = checks.Checks()

    def assertResult(self, code, words, result):
        self.assertEqual(code, result.code, result.details)
        for word in words:
            self.assertIn(word, result.details)


class JournalDirTestCase(CheckTestCase):

    def check(self, path):
        self.conf.config(journal_dir=path, group='worker')
        return self.checks._check_journal_dir()

    def test_existing_directory_takes_a_write_and_keeps_nothing(self):
        path = os.path.join(self.tmp, 'journal')
        os.mkdir(path)
        self.assertResult(Code.SUCCESS, ['durable'], self.check(path))
        self.assertEqual([], os.listdir(path))

    def test_missing_directory_in_an_existing_parent_is_not_created(self):
        path = os.path.join(self.tmp, 'journal')
        self.assertResult(Code.SUCCESS, ['creates it'], self.check(path))
        self.assertFalse(os.path.exists(path))

    def test_missing_parent_fails_naming_it(self):
        parent = os.path.join(self.tmp, 'not-mounted')
        result = self.check(os.path.join(parent, 'journal'))
        self.assertResult(Code.FAILURE, ['[worker] journal_dir', parent],
                          result)
        self.assertFalse(os.path.exists(parent))

    def test_a_file_is_not_a_journal(self):
        path = os.path.join(self.tmp, 'journal')
        open(path, 'w').close()
        self.assertResult(Code.FAILURE, ['not a directory'],
                          self.check(path))

    def test_volatile_filesystem_fails(self):
        self.useFixture(fixtures.MockPatchObject(
            journal, 'filesystem_type', return_value='tmpfs'))
        self.assertResult(Code.FAILURE, ['tmpfs', 'reboot'],
                          self.check(self.tmp))

    def test_unwritable_directory_fails(self):
        self.useFixture(fixtures.MockPatchObject(
            journal.Journal, 'probe',
            side_effect=OSError(30, 'Read-only file system')))
        self.assertResult(Code.FAILURE, ['Read-only', 'worker\'s user'],
                          self.check(self.tmp))


class InstancesPathTestCase(CheckTestCase):

    def test_readable_directory(self):
        self.conf.config(instances_path=self.tmp)
        self.assertResult(Code.SUCCESS, [self.tmp],
                          self.checks._check_instances_path())

    def test_missing_directory_names_nova_option(self):
        path = os.path.join(self.tmp, 'instances')
        self.conf.config(instances_path=path)
        self.assertResult(Code.FAILURE, [path, 'nova-compute'],
                          self.checks._check_instances_path())

    def test_unlistable_directory(self):
        self.conf.config(instances_path=self.tmp)
        self.useFixture(fixtures.MockPatch(
            'os.listdir', side_effect=PermissionError(13, 'Permission '
                                                      'denied')))
        self.assertResult(Code.FAILURE, ['Permission denied'],
                          self.checks._check_instances_path())


class LibvirtTestCase(CheckTestCase):
    """libvirt's test driver runs in this process: a real connection."""

    def test_reachable(self):
        self.conf.config(libvirt_uri='test:///default')
        self.assertResult(Code.SUCCESS, ['test:///default', 'libvirt '],
                          self.checks._check_libvirt())

    def test_unreachable_names_the_uri(self):
        uri = f'test://{self.tmp}/no-such-definition.xml'
        self.conf.config(libvirt_uri=uri)
        self.assertResult(Code.FAILURE, [uri, 'libvirt_uri'],
                          self.checks._check_libvirt())


class FakeImageService:
    """The one call the check makes: ``ImageService(conf,
    context).stores()``."""

    stores_answer = []
    error = None
    seen = []

    def __init__(self, conf, context):
        self.conf = conf
        self.context = context

    def stores(self):
        FakeImageService.seen.append((self.context,
                                      CONF.glance.num_retries))
        if self.error:
            raise self.error
        return self.stores_answer


class GlanceTestCase(CheckTestCase):

    def setUp(self):
        super().setUp()
        FakeImageService.seen = []
        FakeImageService.error = None
        FakeImageService.stores_answer = []
        self.useFixture(fixtures.MockPatchObject(
            checks.glance, 'ImageService', FakeImageService))

    def noauth(self, **kwargs):
        self.conf.config(auth_strategy='noauth',
                         endpoint_override='http://glance:9292',
                         group='glance', **kwargs)

    def test_noauth_reaches_glance_once_and_lists_stores(self):
        self.noauth()
        FakeImageService.stores_answer = [{'id': 'local'}, {'id': 'ceph'}]
        self.assertResult(Code.SUCCESS, ['http://glance:9292', 'local, ceph'],
                          self.checks._check_glance())
        ((context, retries),) = FakeImageService.seen
        self.assertEqual((0, ['reader']), (retries, context.roles))
        self.assertEqual(3, CONF.glance.num_retries)

    def test_noauth_without_endpoint_fails(self):
        self.conf.config(auth_strategy='noauth', group='glance')
        self.assertResult(Code.FAILURE, ['endpoint_override'],
                          self.checks._check_glance())
        self.assertEqual([], FakeImageService.seen)

    def test_unreachable_glance_fails_naming_the_endpoint(self):
        self.noauth()
        FakeImageService.error = exception.GlanceUnavailable(
            image_id='-', reason='Unable to establish connection')
        self.assertResult(Code.FAILURE, ['http://glance:9292',
                                         'Unable to establish connection',
                                         'endpoint_override'],
                          self.checks._check_glance())

    def test_configured_store_glance_does_not_offer_fails(self):
        self.noauth(snapshot_store='fast')
        FakeImageService.stores_answer = [{'id': 'local'}]
        self.assertResult(Code.FAILURE, ['[glance] snapshot_store = fast',
                                         'local'],
                          self.checks._check_glance())

    def test_keystone_without_service_user_warns_and_asks_nothing(self):
        self.assertResult(Code.WARNING, ['[service_user]'],
                          self.checks._check_glance())
        self.assertEqual([], FakeImageService.seen)

    def service_user(self, access=None, error=None):
        self.conf.config(send_service_user_token=True, group='service_user')
        auth = mock.Mock()
        auth.get_access.side_effect = error
        auth.get_access.return_value = access
        self.useFixture(fixtures.MockPatchObject(
            checks.ks_loading, 'load_auth_from_conf_options',
            return_value=auth))

    def test_keystone_uses_the_service_user_and_its_catalog(self):
        catalog = [{'type': 'image', 'endpoints': [
            {'interface': 'internal', 'url': 'http://glance'}]}]
        self.service_user(access=mock.Mock(
            auth_token='tok', user_id='svc', project_id='service',
            role_names=['service'],
            service_catalog=mock.Mock(catalog=catalog)))
        self.assertResult(Code.SUCCESS, ['service catalog', 'single store'],
                          self.checks._check_glance())
        ((context, _),) = FakeImageService.seen
        self.assertEqual(('tok', 'svc', catalog),
                         (context.auth_token, context.user_id,
                          context.service_catalog))

    def test_keystone_refusing_the_service_user_fails(self):
        self.service_user(error=ks_exc.Unauthorized('bad password'))
        self.assertResult(Code.FAILURE, ['[service_user]', 'password'],
                          self.checks._check_glance())
        self.assertEqual([], FakeImageService.seen)


class RbdTestCase(CheckTestCase):

    def setUp(self):
        super().setUp()
        self.ceph_conf = os.path.join(self.tmp, 'ceph.conf')
        self.conf.config(ceph_conf=self.ceph_conf, group='rbd')

    def test_not_configured_is_skipped(self):
        self.assertResult(Code.SUCCESS, ['Not configured'],
                          self.checks._check_rbd())

    def test_a_pool_without_a_cluster_fails(self):
        self.conf.config(glance_pool='images', group='rbd')
        self.assertResult(Code.FAILURE, ['glance_pool', self.ceph_conf],
                          self.checks._check_rbd())

    def test_cluster_and_pool_reachable(self):
        from snapworker.sources import ceph
        open(self.ceph_conf, 'w').close()
        self.conf.config(glance_pool='images', group='rbd')
        check_pools = self.useFixture(fixtures.MockPatchObject(
            ceph, 'check_pools', return_value='fsid-1')).mock
        self.assertResult(Code.SUCCESS, ['fsid-1', 'images'],
                          self.checks._check_rbd())
        check_pools.assert_called_once_with(CONF, ['images'])

    def test_unreachable_cluster_fails(self):
        from snapworker.sources import ceph
        open(self.ceph_conf, 'w').close()
        self.useFixture(fixtures.MockPatchObject(
            ceph, 'check_pools', side_effect=exception.RbdError(
                operation='connect', target=self.ceph_conf,
                reason='timed out')))
        self.assertResult(Code.FAILURE, ['timed out', '[rbd] ceph_conf'],
                          self.checks._check_rbd())


class RpcVersionCapTestCase(CheckTestCase):

    def check(self, cap):
        self.conf.config(snapworker=cap, group='upgrade_levels')
        return self.checks._check_rpc_version_cap()

    def test_unset_and_current(self):
        self.assertResult(Code.SUCCESS, [rpcapi.RPC_API_VERSION],
                          self.check(None))
        self.assertResult(Code.SUCCESS, [rpcapi.RPC_API_VERSION],
                          self.check(rpcapi.RPC_API_VERSION))

    def test_older_cap_warns_to_lift_it(self):
        self.assertResult(Code.WARNING, ['1.0', 'Remove it'],
                          self.check('1.0'))

    def test_unknown_versions_fail(self):
        for cap in ('1.9', '2.0', '0.9'):
            self.assertResult(Code.FAILURE,
                              [f'= {cap}', rpcapi.RPC_API_VERSION],
                              self.check(cap))


class ReportTestCase(CheckTestCase):
    """Every check runs and the worst one decides the exit code."""

    def test_worst_result_wins(self):
        self.conf.config(journal_dir=self.tmp, group='worker')
        self.conf.config(instances_path=self.tmp,
                         libvirt_uri='test:///default')
        self.conf.config(ceph_conf=os.path.join(self.tmp, 'none'),
                         group='rbd')
        self.useFixture(fixtures.MockPatch('sys.stdout'))
        # Keystone without [service_user]: the Glance check warns.
        self.assertEqual(Code.WARNING, self.checks.check())
        self.conf.config(snapworker='2.0', group='upgrade_levels')
        self.assertEqual(Code.FAILURE, self.checks.check())
