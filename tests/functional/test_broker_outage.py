"""A RabbitMQ node goes away under a live subscription.

The cluster is the private three-node one of ``tests.services``
(``rabbitmq_cluster``); the machine's broker is never stopped. The class's
worker talks to node 2 only, so it never sees an outage itself; each test
stops a different node (0 or 1), the one its subscription is connected to,
and leaves it stopped (``setUpClass`` starts whatever an earlier run left
stopped).
"""

import json
import os
import queue
import subprocess
import sys
import threading
import time

import oslo_messaging as messaging
from oslo_config import cfg
from testtools import content

from snapworker import events
from snapworker import manager
from snapworker import rpc
from snapworker import rpcapi
from snapworker.conf import CONF
from snapworker.nova import waiter
from tests.functional import base
from tests.services import rabbitmq_cluster

WORKER_NODE = 2


class _WaiterConf:
    accept_timeout = 60
    timeout_base = 120
    timeout_per_gib = 0
    status_poll_interval = 2


class BrokerOutageTest(base.FunctionalTestCase):

    @classmethod
    def setUpClass(cls):
        services = base.shared_services()
        cls.cluster = rabbitmq_cluster.RabbitCluster.from_dict(
            services['rabbit_cluster'])
        for index in range(len(cls.cluster.nodes)):
            if not cls.cluster.node_up(index):
                cls.cluster.start_node(index)
        cls.worker_conf = {
            'transport_url': cls.cluster.transport_url([WORKER_NODE])}
        super().setUpClass()

    def subscription_conf(self, order):
        """A private configuration whose transport lists nodes ``order``."""
        conf = cfg.ConfigOpts()
        rpc.register_opts(conf)
        conf([], default_config_files=[])
        conf.set_override('transport_url',
                          self.cluster.transport_url(order))
        return conf

    def on_worker_node(self, make):
        transport = make(CONF, url=self.cluster.transport_url([WORKER_NODE]))
        self.addCleanup(transport.cleanup)
        return transport

    def stop_node(self, index):
        t0 = time.monotonic()
        self.cluster.stop_node(index)
        self.addDetail(f'node {index} stop seconds', content.text_content(
            '%.2f' % (time.monotonic() - t0)))

    def watch_command(self, order):
        """``snapworker watch`` on nodes ``order``; its stdout lines queued.

        The CLI follows the same outage as the test's own subscription.
        """
        conf_path = os.path.join(self.workdir, 'watch.conf')
        with open(conf_path, 'w') as f:
            f.write('[DEFAULT]\ntransport_url = %s\n'
                    % self.cluster.transport_url(order))
        proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), 'snapworker'),
             '--config-file', conf_path, 'watch', '--image-id', 'outage',
             '--timeout', '5'],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(json.loads(line))
                                         for line in proc.stdout],
                         daemon=True).start()
        return proc, lines

    @staticmethod
    def publish_until_seen(notifier, n, lines, timeout=30):
        """Send event ``n`` until the CLI printed it (it may still be
        connecting); return how many sends that took."""
        deadline = time.monotonic() + timeout
        sends = 0
        while time.monotonic() < deadline:
            notifier.info({}, 'snapshot.progress', {'image_id': 'outage',
                                                    'n': n})
            sends += 1
            try:
                while True:
                    if lines.get(timeout=0.5)['payload']['n'] == n:
                        return sends
            except queue.Empty:
                continue
        raise AssertionError(f'snapworker watch never printed event {n}')

    def test_subscription_fails_over_and_receives_later_events(self):
        notifier = messaging.Notifier(
            self.on_worker_node(messaging.get_notification_transport),
            publisher_id='snapworker:outage-test', driver='messagingv2',
            topics=['notifications'])
        ports = self.cluster.ports
        cli, cli_lines = self.watch_command([0, 1, 2])
        with events.Subscription(self.subscription_conf([0, 1, 2]),
                                 image_id='outage') as sub:
            self.assertEqual(ports[0], sub.address.port)
            self.publish_until_seen(notifier, 1, cli_lines)
            self.assertEqual(1, sub.wait(10).payload['n'])

            self.stop_node(0)
            stopped = time.monotonic()
            deadline = stopped + 30
            while not sub.connected or sub.address.port == ports[0]:
                self.assertLess(time.monotonic(), deadline)
                event = sub.wait(0.2)  # nothing new, or a repeated 1
                self.assertIn(event and event.payload['n'], (None, 1))
            reconnect = time.monotonic() - stopped
            self.addDetail('reconnect seconds', content.text_content(
                '%.2f' % reconnect))

            self.publish_until_seen(notifier, 2, cli_lines)
            later = sub.wait(10)
            while later is not None and later.payload['n'] != 2:
                later = sub.wait(10)  # repeats sent for the CLI's sake
        self.assertIsNotNone(later)
        self.assertEqual(1, sub.disconnections)
        # The next host of the URL, not back to the first.
        self.assertEqual(ports[1], sub.address.port)
        self.assertLess(reconnect, 10)
        # The CLI went through the same outage and ends as usual: quiet
        # for --timeout seconds, exit status 0, no traceback.
        _out, err = cli.communicate(timeout=60)
        self.assertEqual(0, cli.returncode, err)
        self.assertIn('Lost the notification connection', err)
        self.assertNotIn('Traceback', err)

    def test_waiter_outlives_the_node_it_listens_on(self):
        disk = self.make_disk('outage.qcow2', size='256M',
                              writes=('write -P 0x5a 0 128M',))
        instance, _ = self.define_domain(path=disk)
        image_id = self.create_image()
        api = rpcapi.SnapworkerAPI(
            self.on_worker_node(messaging.get_rpc_transport),
            version_cap=manager.RPC_API_VERSION)
        calls, received = [], []

        def on_started():
            # Mid-wait, with the job running: the subscription's node.
            calls.append('started')
            self.stop_node(1)

        with events.Subscription(self.subscription_conf([1, WORKER_NODE]),
                                 image_id=image_id) as sub:
            real_wait = sub.wait

            def wait(timeout):
                event = real_wait(timeout)
                if event is not None:
                    received.append((event.event_type, sub.disconnections))
                return event

            sub.wait = wait
            self.assertEqual(self.cluster.ports[1], sub.address.port)
            api.create_snapshot(self.context, self.worker.host, instance,
                                image_id, target_format='raw')
            waiter.SnapshotWaiter(
                sub, lambda: self.image_status(image_id), _WaiterConf,
                ids={'instance_uuid': instance, 'image_id': image_id,
                     'host': self.worker.host},
                default_size=0,
            ).wait(on_started=on_started,
                   on_released=lambda: calls.append('released'))
        self.addDetail('events (type, gaps so far)',
                       content.text_content(repr(received)))
        self.assertEqual('started', calls[0])
        self.assertEqual(1, sub.disconnections, received)
        self.assertEqual(self.cluster.ports[WORKER_NODE], sub.address.port)
        self.assertEqual('active', self.image_status(image_id))
        self.assertTrue(base.images_identical(disk,
                                              self.download(image_id, 'raw')))
