"""The RPC client against this tree's real worker, capped and not.

The client speaks 1.1; the worker answers ``manager.RPC_API_VERSION``.
"""

import unittest

import oslo_messaging as messaging

from snapworker import events
from snapworker import manager
from snapworker import rpc
from snapworker import rpcapi
from snapworker.conf import CONF
from tests.functional import base

_WORKER_VERSION = tuple(int(p) for p in manager.RPC_API_VERSION.split('.'))


class RPCVersionTest(base.FunctionalTestCase):

    def client(self, version_cap):
        transport = rpc.get_transport(CONF)
        self.addCleanup(transport.cleanup)
        return rpcapi.SnapworkerAPI(transport, topic=CONF.worker.topic,
                                    version_cap=version_cap)

    def test_capped_at_1_0_a_bound_is_left_out_and_the_snapshot_runs(self):
        disk = self.make_disk('capped.qcow2')
        instance, _ = self.define_domain(path=disk)
        image_id = self.create_image()

        with events.Subscription(CONF, image_id=image_id) as sub:
            self.client('1.0').create_snapshot(
                self.context, self.worker.host, instance, image_id,
                max_virtual_size=2 ** 30)
            received = list(sub.until_finished(60))

        self.assertEqual('snapshot.create.end', received[-1].event_type,
                         received[-1].payload)
        self.assertEqual('active', self.image_status(image_id))

    def test_get_status_capped_at_1_0_sends_nothing(self):
        self.assertRaises(rpcapi.VersionCapError,
                          self.client('1.0').get_status, self.context,
                          self.worker.host, timeout=5)

    @unittest.skipUnless(_WORKER_VERSION >= (1, 1),
                         'the worker of this tree has no get_status yet')
    def test_get_status(self):
        status = self.client(None).get_status(self.context,
                                              self.worker.host, timeout=30)

        # The test context is an admin's: it sees the (empty) job list.
        self.assertEqual({'version', 'host', 'running', 'queued', 'jobs'},
                         set(status))
        self.assertEqual((manager.RPC_API_VERSION, self.worker.host, 0, 0,
                          []),
                         (status['version'], status['host'],
                          status['running'], status['queued'],
                          status['jobs']))

    def test_get_status_of_a_host_without_worker_times_out(self):
        self.assertRaises(messaging.MessagingTimeout,
                          self.client(None).get_status, self.context,
                          'no-such-host', timeout=2)
