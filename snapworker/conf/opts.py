"""Entry point for oslo-config-generator (namespace ``snapworker``)."""

from snapworker import rpcapi
from snapworker.conf import default
from snapworker.conf import glance
from snapworker.conf import rbd
from snapworker.conf import worker

_MODULES = (default, worker, glance, rbd)


def list_opts():
    grouped = {}
    for module in _MODULES:
        for group, opts in module.list_opts().items():
            grouped.setdefault(group, []).extend(opts)
    # The CLI's RPC client honours the same version cap as nova-compute's.
    for group, opts in rpcapi.list_opts():
        grouped.setdefault(group, []).extend(opts)
    return list(grouped.items())
