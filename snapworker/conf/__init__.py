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

default.register_opts(CONF)
glance.register_opts(CONF)
rbd.register_opts(CONF)
worker.register_opts(CONF)
