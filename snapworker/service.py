"""The oslo.service Service: wires transports, the RPC server and stop.

Domain logic lives in the manager; this module only owns lifecycles. The
transports are created in ``start()``, inside the process oslo.service
forks, never before the fork.
"""

import oslo_messaging as messaging
from oslo_log import log as logging
from oslo_service import service

from snapworker import manager
from snapworker import notifications
from snapworker import rpc

LOG = logging.getLogger(__name__)


class WorkerService(service.Service):

    def __init__(self, conf):
        super().__init__()
        self._conf = conf
        self.manager = None
        self._server = None
        self._transports = []

    def start(self):
        super().start()
        conf = self._conf
        transport = rpc.get_transport(conf)
        notification_transport = rpc.get_notification_transport(conf)
        self._transports = [transport, notification_transport]
        notifier = notifications.get_notifier(notification_transport, conf)
        self.manager = manager.SnapshotManager(conf, notifier)
        # Before taking requests: what a killed worker left is cleaned up
        # (and reported) first, and nothing new competes with it.
        self.manager.recover()
        target = messaging.Target(topic=conf.worker.topic, server=conf.host)
        self._server = messaging.get_rpc_server(
            transport, target, [self.manager],
            serializer=rpc.RequestContextSerializer(),
            access_policy=messaging.DefaultRPCAccessPolicy)
        self._server.start()
        LOG.info('snapworker listening on topic %s, server %s',
                 conf.worker.topic, conf.host)

    def stop(self, graceful=True):
        """Stop taking requests, then let the manager finish or fail jobs."""
        if self._server is not None:
            self._server.stop()
        if self.manager is not None:
            self.manager.stop()
        if self._server is not None:
            self._server.wait()
            self._server = None
        for transport in self._transports:
            transport.cleanup()
        self._transports = []
        super().stop(graceful=graceful)
        LOG.info('snapworker stopped')
