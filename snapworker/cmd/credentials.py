"""Who the operator CLI acts as, loaded as every OpenStack CLI loads it.

Credentials come from ``clouds.yaml`` (``--os-cloud`` / ``OS_CLOUD``), the
``OS_*`` variables and the ``--os-*`` options, through openstacksdk's
``openstack.config`` (the loader python-openstackclient uses) and
keystoneauth1's argparse options; an ``--os-*`` option (or its ``OS_*``
variable) wins over the same setting in ``clouds.yaml``. The session they
give authenticates once; the request context the worker receives is that
session's: its token, user, project, roles and the Image service entry
of its catalog (``identity.context_from_access``). Glance is reached
through the same session.

``--os-auth-type none`` (or ``noauth``) is the only other way, for a
development Glance without Keystone (``[glance] auth_strategy = noauth``
in the configuration file, as ``tools/run-demo`` and the functional tests
run it): no token exists, and the identity the worker and Glance trust is
the one given by the clearly named ``--noauth-user-id``,
``--noauth-project-id`` and ``--noauth-roles`` options
(``SNAPWORKER_NOAUTH_*`` variables).
"""

import dataclasses
import os

from keystoneauth1 import exceptions as ks_exc
from oslo_context import context as o_context

from snapworker import glance
from snapworker import identity

#: ``--os-auth-type`` values that mean "no Keystone".
NOAUTH_TYPES = ('none', 'noauth')


class CredentialsError(Exception):
    """The CLI could not establish who it acts as (exit status 4)."""


@dataclasses.dataclass
class Identity:
    """The request context to send, and Glance acting as it."""

    context: o_context.RequestContext
    images: glance.ImageService


def register_arguments(parser, argv):
    """Add ``--os-cloud``, the keystoneauth options and the noauth set.

    :param argv: the command line, which ``openstack.config`` peeks at to
        register the options of the chosen auth type only.
    :returns: the ``OpenStackConfig`` to pass to ``load``.
    """
    # Imported here: commands that need no credentials skip its cost.
    import openstack.config
    config = openstack.config.OpenStackConfig()
    config.register_argparse_arguments(parser, argv, service_keys=['image'])
    group = parser.add_argument_group(
        'noauth demo mode',
        'With --os-auth-type none only: a Glance without Keystone trusts '
        'these identity headers ([glance] auth_strategy = noauth). Never '
        'for a real cloud.')
    for name, default in (('user-id', None), ('project-id', None),
                          ('roles', 'member,reader')):
        env = f"SNAPWORKER_NOAUTH_{name.upper().replace('-', '_')}"
        group.add_argument(f'--noauth-{name}',
                           default=os.environ.get(env, default),
                           help=f'Default: ${env}' + (
                               f' or {default}' if default else ''))
    return config


def _is_noauth(auth_type):
    return (auth_type or '').lower() in NOAUTH_TYPES


def load(config, args, conf):
    """The ``Identity`` the parsed ``args`` describe.

    :param config: what ``register_arguments`` returned.
    :param conf: the snapworker configuration (``[glance]`` for the
        noauth mode, adapter defaults otherwise).
    :raises CredentialsError:
    """
    if _is_noauth(getattr(args, 'os_auth_type', None)):
        return _noauth(args, conf)
    try:
        cloud = cloud_region(config, args)
        if _is_noauth(cloud.config.get('auth_type')):
            return _noauth(args, conf)
        session = cloud.get_session()
        access = session.auth.get_access(session)
    except (ks_exc.ClientException, _sdk_errors()) as e:
        raise CredentialsError(f'Cannot authenticate: {e}') from e
    context = identity.context_from_access(access)
    images = glance.ImageService(conf, context, session=session, adapter={
        'interface': cloud.get_interface('image'),
        'region_name': cloud.get_region_name('image'),
        'endpoint_override': cloud.get_endpoint('image')})
    return Identity(context, images)


def cloud_region(config, args):
    """The ``CloudRegion`` of ``args``, ``--os-*`` auth options first.

    openstacksdk keeps a cloud's ``auth:`` values over the same values
    given as arguments (``--os-cloud c --os-password p`` would still use
    the password of ``clouds.yaml``); every auth option of the chosen
    auth type that was given is therefore passed again as ``auth``, which
    openstacksdk merges over the cloud's. An option still at its plugin
    default counts as not given (argparse holds the default either way).
    """
    from keystoneauth1 import loading

    first = config.get_one(argparse=args, validate=False)
    try:
        loader = loading.get_plugin_loader(
            first.config.get('auth_type') or 'password')
    except ks_exc.NoMatchingPlugin:
        return config.get_one(argparse=args)
    given = {}
    for opt in loader.get_options():
        value = getattr(args, f'os_{opt.dest}', None)
        if value is not None and value != opt.default:
            given[opt.dest] = value
    return config.get_one(argparse=args, auth=given)


def _sdk_errors():
    import openstack.exceptions
    return openstack.exceptions.SDKException


def _noauth(args, conf):
    if conf.glance.auth_strategy != 'noauth':
        raise CredentialsError(
            '--os-auth-type none needs a Glance without Keystone: set '
            '[glance] auth_strategy = noauth (and endpoint_override) in the '
            'configuration file, or give real credentials')
    if not (args.noauth_user_id and args.noauth_project_id):
        raise CredentialsError(
            '--os-auth-type none needs --noauth-user-id and '
            '--noauth-project-id (or SNAPWORKER_NOAUTH_USER_ID and '
            'SNAPWORKER_NOAUTH_PROJECT_ID)')
    roles = [r for r in (args.noauth_roles or '').split(',') if r]
    context = o_context.RequestContext(
        user_id=args.noauth_user_id, project_id=args.noauth_project_id,
        roles=roles, is_admin='admin' in roles)
    return Identity(context, glance.ImageService(conf, context))
