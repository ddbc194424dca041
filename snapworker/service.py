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

#: Seconds the final notifications get to reach the broker at stop.
_FLUSH_SECONDS = 10


class WorkerService(service.Service):

    def __init__(self, conf):
        super().__init__()
        self._conf = conf
        self.manager = None
        self._server = None
        self._notifier = None
        self._transports = []

    def start(self):
        super().start()
        conf = self._conf
        transport = rpc.get_transport(conf)
        notification_transport = rpc.get_notification_transport(conf)
        self._transports = [transport, notification_transport]
        self._notifier = notifications.get_notifier(notification_transport,
                                                    conf)
        self.manager = manager.SnapshotManager(conf, self._notifier)
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
        """Stop taking requests, let the manager end its jobs, flush events.

        Each step is isolated (as ironic's RPCService.stop): one that
        fails is logged and the next still runs, so the jobs' final
        notifications are flushed and the transports closed whatever
        went wrong before.
        """
        steps = (
            ('stop the RPC server', self._server and self._server.stop),
            ('stop the manager', self.manager and self.manager.stop),
            ('wait for the RPC server', self._server and self._server.wait),
            ('flush notifications', self._notifier and (
                lambda: self._notifier.stop(_FLUSH_SECONDS))),
        ) + tuple((f'close transport {i}', t.cleanup)
                  for i, t in enumerate(self._transports))
        for what, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception:
                LOG.exception('Stopping snapworker: could not %s', what)
        self._server = self._notifier = None
        self._transports = []
        super().stop(graceful=graceful)
        LOG.info('snapworker stopped')
