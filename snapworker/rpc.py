"""Transports and the request-context serializer shared by both RPC ends.

The context crosses the wire in the shape Nova's ``RequestContextSerializer``
produces (``context.to_dict()``), so nova-compute can cast with its own
context and the worker acts as that user towards Glance.

Part of the light client (see ``rpcapi``): nothing here reads or registers
an option at import time, and the configuration object is always passed
in, so nova-compute can use this module with its own CONF.
"""

import oslo_messaging as messaging
from oslo_context import context as o_context
from oslo_messaging import opts as messaging_opts
from oslo_versionedobjects import base as ovo_base


def register_opts(conf):
    """Register oslo.messaging's own options, before any transport exists.

    The events subscriber and the CLI read them (transport_url,
    control_exchange, notification topics, rabbit TLS settings) without
    creating a transport, which is what would otherwise register them.
    Registering them again where oslo.messaging already did (nova-compute)
    changes nothing: they are the same options.
    """
    for group, opts in messaging_opts.list_opts():
        conf.register_opts(opts, group=group)


class RequestContextSerializer(messaging.Serializer):
    """Carries an oslo.context RequestContext and versioned objects."""

    def __init__(self):
        self._base = ovo_base.VersionedObjectSerializer()

    def serialize_entity(self, context, entity):
        return self._base.serialize_entity(context, entity)

    def deserialize_entity(self, context, entity):
        return self._base.deserialize_entity(context, entity)

    def serialize_context(self, context):
        values = context.to_dict()
        # Nova's context.to_dict() has the catalog; oslo.context's (the
        # CLI's) does not, so it is added as Nova would send it.
        catalog = getattr(context, 'service_catalog', None)
        if catalog and 'service_catalog' not in values:
            values['service_catalog'] = catalog
        return values

    def deserialize_context(self, context):
        ctx = o_context.RequestContext.from_dict(context)
        # Nova sends the catalog it received from Keystone; it is where the
        # worker finds Glance when no endpoint is configured.
        ctx.service_catalog = context.get('service_catalog') or []
        return ctx


def get_transport(conf):
    return messaging.get_rpc_transport(conf)


def get_notification_transport(conf):
    return messaging.get_notification_transport(conf)
