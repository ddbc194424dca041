"""How the worker authenticates to Glance as the requesting user."""

from unittest import mock

import testtools
from oslo_config import fixture as config_fixture
from oslo_context import context as o_context

from snapworker import glance
from snapworker.conf import CONF


class _ServiceAuth:
    def get_token(self, session):
        return 'service-token'


class ContextAuthTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(CONF))
        self.context = o_context.RequestContext(
            auth_token='user-token', user_id='u1', project_id='p1',
            roles=['member', 'reader'])

    def test_keystone_sends_user_and_service_tokens(self):
        auth = glance.ContextAuth(self.context, 'keystone', _ServiceAuth())
        self.assertEqual({'X-Auth-Token': 'user-token',
                          'X-Service-Token': 'service-token'},
                         auth.get_headers(None))

    def test_keystone_without_service_user_sends_only_the_user_token(self):
        auth = glance.ContextAuth(self.context, 'keystone')
        self.assertEqual({'X-Auth-Token': 'user-token'},
                         auth.get_headers(None))

    def test_noauth_sends_the_identity_of_the_context(self):
        auth = glance.ContextAuth(self.context, 'noauth')
        headers = auth.get_headers(None)
        self.assertEqual('Confirmed', headers['X-Identity-Status'])
        self.assertEqual(('u1', 'p1', 'member,reader'),
                         (headers['X-User-Id'], headers['X-Project-Id'],
                          headers['X-Roles']))
        self.assertNotIn('X-Service-Roles', headers)

    def test_noauth_claims_the_service_role_only_when_configured(self):
        self.conf.config(send_service_user_token=True, group='service_user')
        self.conf.config(auth_strategy='noauth', group='glance')
        auth = glance.context_auth(CONF, self.context)
        self.assertEqual('service',
                         auth.get_headers(None)['X-Service-Roles'])

    def test_one_service_auth_plugin_for_every_job(self):
        self.addCleanup(glance._SERVICE_AUTH.clear)
        self.assertIsNone(glance._service_auth(CONF))
        self.conf.config(send_service_user_token=True, group='service_user')
        with mock.patch.object(glance.ks_loading,
                               'load_auth_from_conf_options') as load:
            first = glance._service_auth(CONF)
            self.assertIs(first, glance._service_auth(CONF))
        self.assertIs(load.return_value, first)
        load.assert_called_once_with(CONF, 'service_user')

    def test_endpoint_comes_from_the_callers_catalog(self):
        self.context.service_catalog = [
            {'type': 'compute', 'endpoints': [
                {'interface': 'public', 'url': 'http://nova'}]},
            {'type': 'image', 'endpoints': [
                {'interface': 'public', 'region': 'r1',
                 'url': 'http://glance-r1'},
                {'interface': 'internal', 'region': 'r2',
                 'url': 'http://glance-r2-internal'}]},
        ]
        auth = glance.ContextAuth(self.context, 'keystone')
        self.assertEqual('http://glance-r2-internal', auth.get_endpoint(
            None, service_type='image', interface=['internal', 'public'],
            region_name='r2'))
        self.assertIsNone(auth.get_endpoint(
            None, service_type='image', interface=['admin']))
