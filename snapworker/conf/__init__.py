"""The worker's configuration: every option group registered on CONF.

oslo.messaging looks its own options up on the global ``cfg.CONF`` (a
private ConfigOpts makes RPC calls fail with NoSuchOptError), so snapworker
registers on the global object too.
"""

from oslo_config import cfg

from snapworker.conf import default
from snapworker.conf import glance
from snapworker.conf import rbd
from snapworker.conf import worker

CONF = cfg.CONF


class _KeepRegistered:
    """Registers options on a ConfigOpts, keeping same-named ones there.

    nova-compute imports snapworker's client side (``snapworker.nova``
    imports rpcapi, which imports this package) into a process whose
    global CONF already holds Nova's options, and a few of snapworker's
    have the same names and meaning: ``[DEFAULT] host`` and
    ``instances_path``, ``[glance] num_retries``, ``[service_user]
    send_service_user_token``. oslo.config rejects a second, differently
    worded definition with DuplicateOptError; the one already registered
    is the one that process documents and parses, so it is kept. In the
    worker's own process nothing registers these names first.
    """

    def __init__(self, conf):
        self._conf = conf

    def __getattr__(self, name):
        return getattr(self._conf, name)

    def __getitem__(self, key):
        return self._conf[key]

    def register_opt(self, opt, group=None, **kwargs):
        try:
            return self._conf.register_opt(opt, group=group, **kwargs)
        except cfg.DuplicateOptError:
            return False

    def register_opts(self, opts, group=None):
        for opt in opts:
            self.register_opt(opt, group=group)


for _module in (default, glance, rbd, worker):
    _module.register_opts(_KeepRegistered(CONF))
