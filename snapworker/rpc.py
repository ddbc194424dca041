"""Transports and the request-context serializer shared by both RPC ends.

The context crosses the wire in the shape Nova's ``RequestContextSerializer``
produces (``context.to_dict()``), so nova-compute can cast with its own
context and the worker acts as that user towards Glance.
"""

import oslo_messaging as messaging
from oslo_context import context as o_context
from oslo_messaging import opts as messaging_opts
from oslo_versionedobjects import base as ovo_base

from snapworker.conf import CONF


def register_opts(conf=CONF):
    """Register oslo.messaging's options before any transport exists.

    The events subscriber and the CLI read them (transport_url,
    control_exchange, notification topics) without creating a transport.
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
        return context.to_dict()

    def deserialize_context(self, context):
        ctx = o_context.RequestContext.from_dict(context)
        # Nova sends the catalog it received from Keystone; it is where the
        # worker finds Glance when no endpoint is configured.
        ctx.service_catalog = context.get('service_catalog') or []
        return ctx


def get_transport(conf=CONF):
    return messaging.get_rpc_transport(conf)


def get_notification_transport(conf=CONF):
    return messaging.get_notification_transport(conf)


register_opts()
