"""The client side of the RPC API against servers of both versions.

Real oslo.messaging clients and servers on the in-process ``fake://``
transport: a 1.0 endpoint stands for a worker two releases old, a 1.1 one
for the previous release, a 1.2 one for a current worker.
"""

import threading
import time

import oslo_messaging as messaging
import testtools
from oslo_context import context as o_context

from snapworker import rpc
from snapworker import rpcapi
from snapworker.conf import CONF

HOST = 'compute-1'
INSTANCE = '6f1e2c9a-4c1b-4bd5-9d4e-0d2a3c9b7e11'
IMAGE = '0b6c4f7e-2d59-4e55-a1f5-3c2d1e0f9a88'


class OldWorker:
    """A 1.0 worker: create_snapshot has no max_virtual_size."""

    target = messaging.Target(version='1.0')

    def __init__(self):
        self.calls = []
        self.done = threading.Event()

    def create_snapshot(self, context, instance_uuid, image_id,
                        target_format=None):
        self.calls.append(dict(instance_uuid=instance_uuid,
                               image_id=image_id,
                               target_format=target_format))
        self.done.set()


class NewWorker(OldWorker):
    """A 1.1 worker, named as the manager names its methods."""

    target = messaging.Target(version='1.1')

    def create_snapshot(self, context, instance_uuid, image_id,
                        target_format=None, max_virtual_size=None,
                        sent_at=None):
        self.calls.append(dict(instance_uuid=instance_uuid,
                               image_id=image_id,
                               target_format=target_format,
                               max_virtual_size=max_virtual_size))
        self.sent_at = sent_at
        self.done.set()

    def get_status(self, context):
        return {'version': '1.1', 'host': HOST, 'running': [IMAGE],
                'queued': []}


class PlanningWorker(NewWorker):
    """A 1.2 worker: answers plan_snapshot."""

    target = messaging.Target(version='1.2')

    def plan_snapshot(self, context, instance_uuid, target_format=None,
                      max_virtual_size=None):
        self.calls.append(dict(instance_uuid=instance_uuid,
                               target_format=target_format,
                               max_virtual_size=max_virtual_size,
                               project_id=context.project_id))
        return {'host': HOST, 'instance_uuid': instance_uuid,
                'strategy': 'stream'}


class RPCAPITest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.transport = messaging.get_rpc_transport(CONF, url='fake:///')
        self.addCleanup(self.transport.cleanup)
        self.context = o_context.RequestContext(user_id='u', project_id='p')

    def serve(self, endpoint):
        server = messaging.get_rpc_server(
            self.transport,
            messaging.Target(topic=rpcapi.DEFAULT_TOPIC, server=HOST),
            [endpoint], serializer=rpc.RequestContextSerializer())
        server.start()
        self.addCleanup(server.wait)
        self.addCleanup(server.stop)
        return endpoint

    def api(self, version_cap=None):
        return rpcapi.SnapworkerAPI(self.transport,
                                    version_cap=version_cap)

    def test_uncapped_sends_max_virtual_size_and_sent_at(self):
        worker = self.serve(NewWorker())

        before = time.time()
        self.api().create_snapshot(self.context, HOST, INSTANCE, IMAGE,
                                   'raw', max_virtual_size=2 ** 30)

        self.assertTrue(worker.done.wait(10))
        self.assertTrue(before <= worker.sent_at <= time.time())
        self.assertEqual([{'instance_uuid': INSTANCE, 'image_id': IMAGE,
                           'target_format': 'raw',
                           'max_virtual_size': 2 ** 30}], worker.calls)

    def test_capped_at_1_0_an_old_worker_takes_the_request(self):
        worker = self.serve(OldWorker())

        self.api('1.0').create_snapshot(self.context, HOST, INSTANCE, IMAGE,
                                        'raw', max_virtual_size=2 ** 30)

        self.assertTrue(worker.done.wait(10))
        self.assertEqual([{'instance_uuid': INSTANCE, 'image_id': IMAGE,
                           'target_format': 'raw'}], worker.calls)

    def test_uncapped_an_old_worker_drops_the_request(self):
        # Why the cap exists: a cast an old worker cannot dispatch is gone.
        worker = self.serve(OldWorker())

        self.api().create_snapshot(self.context, HOST, INSTANCE, IMAGE,
                                   'raw', max_virtual_size=2 ** 30)

        self.assertFalse(worker.done.wait(1))

    def test_capped_without_a_bound_an_old_worker_takes_the_request(self):
        worker = self.serve(OldWorker())

        self.api('1.0').create_snapshot(self.context, HOST, INSTANCE, IMAGE)

        self.assertTrue(worker.done.wait(10))
        self.assertEqual([{'instance_uuid': INSTANCE, 'image_id': IMAGE,
                           'target_format': None}], worker.calls)

    def test_cast_versions(self):
        sent = []
        # Uncapped (every worker upgraded) requests carry sent_at: 1.1.
        for cap, size, version in ((None, 1, '1.1'), ('1.2', 1, '1.1'),
                                   ('1.1', 1, '1.1'),
                                   ('1.0', 1, '1.0'), (None, None, '1.1'),
                                   ('1.0', None, '1.0')):
            api = self.api(cap)
            real_prepare = api.client.prepare

            def prepare(real_prepare=real_prepare, **kwargs):
                sent.append(kwargs['version'])
                return real_prepare(**kwargs)

            api.client.prepare = prepare
            api.create_snapshot(self.context, HOST, INSTANCE, IMAGE,
                                max_virtual_size=size)
            self.assertEqual(version, sent[-1], (cap, size))

    def test_get_status(self):
        self.serve(NewWorker())

        status = self.api().get_status(self.context, HOST, timeout=10)

        self.assertEqual({'version': '1.1', 'host': HOST,
                          'running': [IMAGE], 'queued': []}, status)

    def test_get_status_capped_at_1_0_is_refused_before_sending(self):
        worker = self.serve(NewWorker())
        api = self.api('1.0')
        api.client.call = api.client.cast = None  # nothing may be sent

        e = self.assertRaises(rpcapi.VersionCapError, api.get_status,
                              self.context, HOST, timeout=1)

        self.assertIsInstance(e, messaging.RPCVersionCapError)
        self.assertEqual(('get_status', '1.1', '1.0'),
                         (e.method, e.version, e.version_cap))
        self.assertIn('[upgrade_levels] snapworker caps this client at 1.0',
                      str(e))
        self.assertEqual([], worker.calls)

    def test_plan_snapshot(self):
        worker = self.serve(PlanningWorker())

        plan = self.api().plan_snapshot(self.context, HOST, INSTANCE,
                                        'qcow2', max_virtual_size=2 ** 30,
                                        timeout=10)

        self.assertEqual('stream', plan['strategy'])
        self.assertEqual([{'instance_uuid': INSTANCE,
                           'target_format': 'qcow2',
                           'max_virtual_size': 2 ** 30,
                           'project_id': 'p'}], worker.calls)

    def test_plan_snapshot_capped_at_1_1_is_refused_before_sending(self):
        # A 1.1 worker has no plan_snapshot: the cap says so, and the
        # client says why instead of timing out on a call nobody answers.
        worker = self.serve(PlanningWorker())
        for cap in ('1.1', '1.0'):
            api = self.api(cap)
            api.client.call = api.client.cast = None  # nothing may be sent

            e = self.assertRaises(rpcapi.VersionCapError, api.plan_snapshot,
                                  self.context, HOST, INSTANCE, timeout=1)

            self.assertEqual(('plan_snapshot', '1.2', cap),
                             (e.method, e.version, e.version_cap))
            self.assertIn('the workers are too old for it', str(e))
        self.assertEqual([], worker.calls)

    def test_capped_at_1_1_status_and_cancel_still_go(self):
        self.serve(PlanningWorker())

        status = self.api('1.1').get_status(self.context, HOST, timeout=10)

        self.assertEqual(HOST, status['host'])

    def test_get_status_without_worker_times_out(self):
        self.assertRaises(messaging.MessagingTimeout,
                          self.api().get_status, self.context, HOST,
                          timeout=0.5)

    def test_version_cap_option(self):
        ((group, opts),) = rpcapi.list_opts()

        self.assertEqual(('upgrade_levels', ['snapworker']),
                         (group, [o.name for o in opts]))
        CONF.set_override('snapworker', '1.0', group='upgrade_levels')
        self.addCleanup(CONF.clear_override, 'snapworker',
                        group='upgrade_levels')
        self.assertEqual('1.0', CONF.upgrade_levels.snapworker)
        self.assertRaises(ValueError, CONF.set_override, 'snapworker',
                          'juno', group='upgrade_levels')

    def test_client_version_matches_history(self):
        self.assertEqual('1.2', rpcapi.RPC_API_VERSION)
        self.assertIn(f'| {rpcapi.RPC_API_VERSION} - ',
                      rpcapi.SnapworkerAPI.__doc__)
