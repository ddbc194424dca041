"""Options of the [glance] group: how the worker reaches the Image API.

The keystoneauth1 session and adapter options are the usual ones
(``[glance] endpoint_override``, ``region_name``, ``cafile`` ...). The worker
acts with the requesting user's token, carried in the RPC request context,
exactly as nova-compute would.
"""

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg

group = cfg.OptGroup('glance', title='Image service options')

#: Seconds ``[glance] timeout`` defaults to here.
DEFAULT_TIMEOUT = 60

opts = [
    cfg.StrOpt('auth_strategy',
               default='keystone',
               choices=[
                   ('keystone', 'Send the user\'s token from the request '
                                'context (plus a service token when '
                                '[service_user] is configured).'),
                   ('noauth', 'No Keystone: send the identity headers '
                              'keystonemiddleware would set, taken from '
                              'the request context. Only for a Glance '
                              'that trusts them (development and tests).'),
               ],
               help='How requests to Glance are authenticated.'),
    cfg.StrOpt('snapshot_store',
               default='default',
               help='Glance store (``enabled_backends`` id) snapshots are '
                    'uploaded into: ``default`` lets Glance choose (its '
                    'default store, what Nova does), ``base`` uses the '
                    'store that holds the instance\'s base image (Nova\'s '
                    'metadata in the domain XML names it), falling back to '
                    'the default store when that is unknown; any other '
                    'value names a store.'),
    cfg.StrOpt('hash_algorithm',
               default='sha512',
               help='The hashlib algorithm Glance computes ``os_hash_value`` '
                    'with (Glance\'s ``[DEFAULT] hashing_algorithm``). The '
                    'worker hashes what it uploads with it and with md5, '
                    'and fails a snapshot whose image does not match '
                    '(``[worker] verify_upload``).'),
    cfg.IntOpt('num_retries',
               default=3,
               min=0,
               help='Retries of a failed metadata request to Glance. '
                    'Uploads are never retried blindly: a failed upload '
                    'fails the snapshot.'),
]

service_user_group = cfg.OptGroup(
    'service_user',
    title='Service user options',
    help='Credentials of a service user whose token is sent along with '
         'the user\'s (X-Service-Token), so that a user token expiring '
         'during a long upload does not fail the snapshot.')

service_user_opts = [
    cfg.BoolOpt('send_service_user_token',
                default=False,
                help='Send a service token with every request to Glance.'),
]


def register_opts(conf):
    conf.register_group(group)
    conf.register_opts(opts, group=group)
    ks_loading.register_session_conf_options(conf, group.name)
    ks_loading.register_adapter_conf_options(conf, group.name,
                                             include_deprecated=False)
    # keystoneauth's default is no timeout at all: a hung Glance would
    # hold a slot and the disk for as long as it hangs. The timeout bounds
    # the wait for each answer and each blocked send of an upload (it is
    # the socket timeout), not the whole upload.
    conf.set_default('timeout', DEFAULT_TIMEOUT, group=group.name)
    conf.set_default('service_type', 'image', group=group.name)
    conf.set_default('valid_interfaces', ['internal', 'public'],
                     group=group.name)
    conf.register_group(service_user_group)
    conf.register_opts(service_user_opts, group=service_user_group)
    ks_loading.register_auth_conf_options(conf, service_user_group.name)
    ks_loading.register_session_conf_options(conf, service_user_group.name)


def list_opts():
    return {
        group: (opts
                + ks_loading.get_session_conf_options()
                + ks_loading.get_adapter_conf_options(
                    include_deprecated=False)),
        service_user_group: (
            service_user_opts
            + ks_loading.get_session_conf_options()
            + ks_loading.get_auth_common_conf_options()
            + ks_loading.get_auth_plugin_conf_options('password')),
    }
