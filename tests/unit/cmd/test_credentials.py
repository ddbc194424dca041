"""Credentials to request context: what the worker receives."""

import argparse
import os
from unittest import mock

import fixtures
import testtools
from keystoneauth1 import access
from keystoneauth1 import fixture as ks_fixture
from oslo_config import fixture as config_fixture

from snapworker import identity
from snapworker import rpc
from snapworker.cmd import credentials
from snapworker.conf import CONF


def _access(roles=('member', 'reader')):
    token = ks_fixture.V3Token(
        user_id='u1', user_name='alice', user_domain_id='default',
        project_id='p1', project_name='demo', project_domain_id='default')
    for role in roles:
        token.add_role(name=role)
    token.add_service('image').add_standard_endpoints(
        public='http://glance.example', internal='http://glance.internal',
        region='RegionOne')
    token.add_service('compute').add_standard_endpoints(
        public='http://nova.example', region='RegionOne')
    return access.create(body=token, auth_token='the-token')


class ContextFromAccessTest(testtools.TestCase):

    def test_token_identity_and_roles_are_the_sessions(self):
        ctx = identity.context_from_access(_access())
        self.assertEqual(('the-token', 'u1', 'p1', ['member', 'reader'],
                          'alice', 'demo', False),
                         (ctx.auth_token, ctx.user_id, ctx.project_id,
                          ctx.roles, ctx.user_name, ctx.project_name,
                          ctx.is_admin))
        self.assertTrue(identity.context_from_access(
            _access(roles=('admin',))).is_admin)

    def test_only_the_image_service_of_the_catalog_goes_along(self):
        ctx = identity.context_from_access(_access())
        self.assertEqual(['image'],
                         [s['type'] for s in ctx.service_catalog])

    def test_the_worker_receives_it_over_rpc(self):
        # What the worker's end of the serializer rebuilds from the wire.
        serializer = rpc.RequestContextSerializer()
        sent = identity.context_from_access(_access())
        received = serializer.deserialize_context(
            serializer.serialize_context(sent))
        self.assertEqual(('the-token', 'u1', 'p1', ['member', 'reader']),
                         (received.auth_token, received.user_id,
                          received.project_id, received.roles))
        urls = {e['url'] for e in received.service_catalog[0]['endpoints']}
        self.assertIn('http://glance.internal', urls)


class NoauthModeTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(CONF))

    def args(self, **kwargs):
        values = dict(os_auth_type='none', noauth_user_id='u',
                      noauth_project_id='p', noauth_roles='admin,member')
        values.update(kwargs)
        return argparse.Namespace(**values)

    def test_needs_a_keystoneless_glance(self):
        e = self.assertRaises(credentials.CredentialsError, credentials.load,
                              None, self.args(), CONF)
        self.assertIn('[glance] auth_strategy = noauth', str(e))

    def test_needs_an_identity(self):
        self.conf.config(auth_strategy='noauth', group='glance')
        e = self.assertRaises(credentials.CredentialsError, credentials.load,
                              None, self.args(noauth_user_id=None), CONF)
        self.assertIn('--noauth-user-id', str(e))

    def test_identity_is_the_one_given(self):
        self.conf.config(auth_strategy='noauth',
                         endpoint_override='http://127.0.0.1:9',
                         group='glance')
        identity = credentials.load(None, self.args(), CONF)
        ctx = identity.context
        self.assertEqual(('u', 'p', ['admin', 'member'], None),
                         (ctx.user_id, ctx.project_id, ctx.roles,
                          ctx.auth_token))

    def test_keystone_session_is_used_for_glance_and_the_context(self):
        session = mock.Mock()
        session.auth.get_access.return_value = _access()
        cloud = mock.Mock(config={'auth_type': 'password'})
        cloud.get_session.return_value = session
        cloud.get_interface.return_value = 'public'
        cloud.get_region_name.return_value = 'RegionOne'
        cloud.get_endpoint.return_value = None
        config = mock.Mock()
        config.get_one.return_value = cloud
        with mock.patch('snapworker.glance.ImageService') as images:
            identity = credentials.load(config, self.args(
                os_auth_type='password'), CONF)
        self.assertEqual('the-token', identity.context.auth_token)
        images.assert_called_once_with(
            CONF, identity.context, session=session,
            adapter={'interface': 'public', 'region_name': 'RegionOne',
                     'endpoint_override': None})


class CloudsYamlOverrideTest(testtools.TestCase):
    """``--os-*`` options win over ``clouds.yaml`` (openstacksdk alone
    keeps the file's ``auth:`` values)."""

    def setUp(self):
        super().setUp()
        tmp = self.useFixture(fixtures.TempDir()).path
        path = os.path.join(tmp, 'clouds.yaml')
        with open(path, 'w') as f:
            f.write('clouds:\n'
                    '  c:\n'
                    '    auth:\n'
                    '      auth_url: http://keystone.example/v3\n'
                    '      username: alice\n'
                    '      password: from-yaml\n'
                    '      project_name: demo\n'
                    '      user_domain_name: Default\n'
                    '      project_domain_name: Default\n')
        self.useFixture(fixtures.EnvironmentVariable(
            'OS_CLIENT_CONFIG_FILE', path))
        for name in [n for n in os.environ if n.startswith('OS_')
                     and n != 'OS_CLIENT_CONFIG_FILE']:
            self.useFixture(fixtures.EnvironmentVariable(name))

    def _auth(self, *argv):
        argv = ['--os-cloud', 'c', *argv]
        parser = argparse.ArgumentParser()
        config = credentials.register_arguments(parser, argv)
        args = parser.parse_args(argv)
        return credentials.cloud_region(config, args).config['auth']

    def test_an_option_given_wins(self):
        auth = self._auth('--os-password', 'from-args',
                          '--os-project-name', 'other')
        self.assertEqual(('from-args', 'other', 'alice'),
                         (auth['password'], auth['project_name'],
                          auth['username']))

    def test_a_plugin_default_does_not_override_the_file(self):
        # argparse holds v3websso's redirect_port default (9990) whether
        # given or not: the file's value stays.
        self.useFixture(fixtures.EnvironmentVariable('OS_AUTH_TYPE'))
        path = os.environ['OS_CLIENT_CONFIG_FILE']
        with open(path, 'w') as f:
            f.write('clouds:\n'
                    '  c:\n'
                    '    auth_type: v3websso\n'
                    '    auth:\n'
                    '      auth_url: http://keystone.example/v3\n'
                    '      identity_provider: idp\n'
                    '      protocol: saml2\n'
                    '      redirect_port: 8080\n')
        self.assertEqual(8080, int(self._auth()['redirect_port']))

    def test_the_file_is_used_for_what_is_not_given(self):
        auth = self._auth()
        self.assertEqual(('from-yaml', 'demo'),
                         (auth['password'], auth['project_name']))
