"""The worker's configuration: every option group registered on CONF.

oslo.messaging looks its own options up on the global ``cfg.CONF`` (a
private ConfigOpts makes RPC calls fail with NoSuchOptError), so snapworker
registers on the global object too.

This package is the worker's and the operator CLI's only: importing it
registers the worker's options on the global CONF, which the worker-side
modules (glance, sources, pipeline) and their tests read. nova-compute
never imports it: the light client (``rpcapi``, ``events``,
``snapworker.nova``) takes its settings from nova.conf, and a Nova process
that imported this anyway would fail loudly with DuplicateOptError on
``[DEFAULT] host`` rather than quietly share Nova's definition.
"""

from oslo_config import cfg

from snapworker import rpc
from snapworker import rpcapi
from snapworker.conf import default
from snapworker.conf import glance
from snapworker.conf import rbd
from snapworker.conf import worker

CONF = cfg.CONF


def register_opts(conf):
    """Register every option the worker and the CLI read on ``conf``.

    The worker's own groups, ``[upgrade_levels] snapworker`` (the CLI's
    RPC client) and oslo.messaging's options, which the CLI and the event
    subscriber read before any transport registers them.
    """
    for module in (default, glance, rbd, worker):
        module.register_opts(conf)
    rpcapi.register_opts(conf)
    rpc.register_opts(conf)


register_opts(CONF)
