"""The subscriber reads transport_url as oslo.messaging does, and
survives losing its broker.

URL parsing is checked down to the ``kombu.Connection`` it builds (kombu
would take a percent sign or a ``/`` vhost differently from a URL). The
reconnection tests script a fake kombu connection: which host is tried,
that the queue is declared again, that ``wait()`` never raises.
"""

import ssl
from unittest import mock

import amqp
import kombu
import testtools
from oslo_config import cfg

from snapworker import events
from snapworker import rpc


def make_conf(url, notification_url=None, **rabbit):
    conf = cfg.ConfigOpts()
    rpc.register_opts(conf)
    conf([], default_config_files=[])
    conf.set_override('transport_url', url)
    if notification_url:
        conf.set_override('transport_url', notification_url,
                          group='oslo_messaging_notifications')
    for name, value in rabbit.items():
        conf.set_override(name, value, group='oslo_messaging_rabbit')
    return conf


def kombu_view(address):
    """What kombu makes of an address: the connection it would open."""
    conn = kombu.Connection(**address.connection_kwargs())
    return (conn.hostname, conn.port, conn.userid, conn.password,
            conn.virtual_host, conn.ssl)


class BrokerAddressesTest(testtools.TestCase):

    def test_percent_encoded_credentials_are_decoded_once(self):
        (address,) = events.broker_addresses(make_conf(
            'rabbit://us%40er:p%40ss%2Fw%3Ard%25x@10.0.0.5:5673/'))

        self.assertEqual(('10.0.0.5', 5673, 'us@er', 'p@ss/w:rd%x', '/',
                          False), kombu_view(address))

    def test_every_host_kept_in_order(self):
        addresses = events.broker_addresses(make_conf(
            'rabbit://a:pa@h1:5672,b:pb@h2:5673,c:p%2Cc@h3/'))

        self.assertEqual(
            [('h1', 5672, 'a', 'pa'), ('h2', 5673, 'b', 'pb'),
             ('h3', 5672, 'c', 'p,c')],
            [kombu_view(a)[:4] for a in addresses])

    def test_virtual_host(self):
        for url, vhost in (('rabbit://u:p@h/', '/'),
                           ('rabbit://u:p@h', '/'),
                           ('rabbit://u:p@h/nova', 'nova'),
                           ('rabbit://u:p@h/%2Fnova', '/nova'),
                           ('rabbit://u:p@h1,u:p@h2/a%20b', 'a b')):
            addresses = events.broker_addresses(make_conf(url))
            self.assertEqual({vhost},
                             {kombu_view(a)[4] for a in addresses}, url)

    def test_notification_transport_url_wins(self):
        (address,) = events.broker_addresses(make_conf(
            'rabbit://u:p@rpc-host/', 'rabbit://n:q@notify-host:5674/'))

        self.assertEqual(('notify-host', 5674, 'n', 'q'),
                         kombu_view(address)[:4])

    def test_ipv6_host(self):
        (address,) = events.broker_addresses(make_conf(
            'rabbit://u:p@[::1]:5672/'))

        self.assertEqual('[::1]', address.hostname)

    def test_ssl_in_url_query(self):
        addresses = events.broker_addresses(make_conf(
            'rabbit://u:p@h1:5671,u:p@h2:5671/?ssl=1'))

        self.assertEqual([True, True], [kombu_view(a)[5] for a in addresses])

    def test_ssl_from_options_checks_each_host_name(self):
        addresses = events.broker_addresses(make_conf(
            'rabbit://u:p@h1:5671,u:p@h2:5671/', ssl=True,
            ssl_ca_file='/etc/ca.pem', ssl_cert_file='/etc/c.pem',
            ssl_key_file='/etc/k.pem', ssl_version='TLSv1_2'))

        self.assertEqual(
            [{'ca_certs': '/etc/ca.pem', 'certfile': '/etc/c.pem',
              'keyfile': '/etc/k.pem', 'cert_reqs': ssl.CERT_REQUIRED,
              'ssl_version': ssl.PROTOCOL_TLSv1_2, 'server_hostname': host}
             for host in ('h1', 'h2')],
            [kombu_view(a)[5] for a in addresses])

    def test_url_query_overrides_ssl_option(self):
        (address,) = events.broker_addresses(make_conf(
            'rabbit://u:p@h1/?ssl=false', ssl=True))

        self.assertFalse(address.ssl)

    def test_heartbeat_from_rabbit_options(self):
        (address,) = events.broker_addresses(make_conf(
            'rabbit://u:p@h1/', heartbeat_timeout_threshold=7))

        self.assertEqual(7, address.heartbeat)

    def test_other_drivers_refused(self):
        self.assertRaises(ValueError, events.broker_addresses,
                          make_conf('kafka://h1:9092/'))

    def test_password_not_in_str(self):
        (address,) = events.broker_addresses(make_conf(
            'rabbit://u:secret@h1/'))

        self.assertNotIn('secret', str(address))


class FakeConnection:
    """kombu.Connection, scripted per host: down, or events then a loss."""

    connection_errors = (amqp.exceptions.ConnectionError, OSError)
    channel_errors = (amqp.exceptions.ChannelError,)

    def __init__(self, broker, hostname, port, **kwargs):
        self.broker = broker
        self.host = f'{hostname}:{port}'
        self.released = False

    def connect(self):
        self.broker.attempts.append(self.host)
        if self.host in self.broker.down:
            raise ConnectionRefusedError(111, 'Connection refused')

    def heartbeat_check(self):
        pass

    def drain_events(self, timeout):
        script = self.broker.scripts.get(self.host)
        if not script:
            self.broker.sleep(timeout)
            raise TimeoutError('timed out')
        item = script.pop(0)
        if isinstance(item, BaseException):
            raise item
        self.broker.deliver(self.host, item)

    def release(self):
        self.released = True


class FakeBroker:
    def __init__(self, sleep):
        self.sleep = sleep
        self.attempts = []
        self.down = set()
        self.scripts = {}
        self.consumers = []  # (host, queue, routing keys)

    def connection(self, **kwargs):
        return FakeConnection(self, **kwargs)

    def consumer(self, conn, queues, callbacks, **kwargs):
        (queue,) = queues
        self.consumers.append(
            (conn.host, queue.name, queue.exclusive, queue.auto_delete,
             [b.routing_key for b in queue.bindings]))
        self._callbacks = callbacks
        return mock.Mock()

    def deliver(self, host, body):
        for callback in self._callbacks:
            callback(body, None)


def notification(image_id, event_type='snapshot.create.start'):
    return {'publisher_id': 'snapworker:h', 'event_type': event_type,
            'priority': 'INFO', 'payload': {'image_id': image_id}}


class ReconnectTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.broker = FakeBroker(self.sleep)
        self.now = 0.0
        for target, fake in (('kombu.Connection', self.broker.connection),
                             ('kombu.Consumer', self.broker.consumer)):
            patcher = mock.patch(target, side_effect=fake)
            patcher.start()
            self.addCleanup(patcher.stop)
        self.conf = make_conf('rabbit://u:p@h1:1,u:p@h2:2,u:p@h3:3/')

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds

    def subscribe(self):
        return events.Subscription(self.conf, clock=self.clock,
                                   sleep=self.sleep)

    def test_connects_to_the_first_host(self):
        sub = self.subscribe()

        self.assertTrue(sub.connected)
        self.assertEqual(['h1:1'], self.broker.attempts)
        self.assertEqual(0, sub.disconnections)
        ((host, name, exclusive, auto_delete, keys),) = self.broker.consumers
        self.assertEqual(('h1:1', True, True, ['notifications.*']),
                         (host, exclusive, auto_delete, keys))

    def test_fails_over_and_declares_a_new_queue(self):
        self.broker.scripts['h1:1'] = [
            notification('a'),
            amqp.exceptions.ConnectionForced('broker shutdown')]
        self.broker.scripts['h2:2'] = [notification('b')]
        sub = self.subscribe()

        first = sub.wait(5)
        second = sub.wait(5)

        self.assertEqual(['a', 'b'], [first.image_id, second.image_id])
        self.assertEqual(['h1:1', 'h2:2'], self.broker.attempts)
        self.assertEqual(1, sub.disconnections)
        self.assertEqual('h2', sub.address.hostname)
        hosts = [c[0] for c in self.broker.consumers]
        names = [c[1] for c in self.broker.consumers]
        self.assertEqual(['h1:1', 'h2:2'], hosts)
        self.assertNotEqual(names[0], names[1])

    def test_broken_pipe_while_waiting_is_not_raised(self):
        self.broker.scripts['h1:1'] = [BrokenPipeError(32, 'Broken pipe')]
        self.broker.down = {'h2:2', 'h3:3'}
        self.broker.scripts['h1:1'].append(notification('x'))
        sub = self.subscribe()
        self.broker.down.add('h1:1')

        self.assertIsNone(sub.wait(3))
        self.assertFalse(sub.connected)

        self.broker.down = set()
        # Back on h2, the next host after the lost one.
        self.assertIsNone(sub.wait(3))
        self.assertTrue(sub.connected)
        self.assertEqual('h2', sub.address.hostname)
        self.assertEqual(1, sub.disconnections)

    def test_all_hosts_down_retries_with_backoff_until_timeout(self):
        self.broker.down = {'h1:1', 'h2:2', 'h3:3'}

        sub = self.subscribe()
        self.assertIsNone(sub.wait(10))

        self.assertFalse(sub.connected)
        self.assertEqual(10, self.now)
        # One round at start, then rounds 0.5, 1, 2, 4 s apart.
        self.assertEqual(['h1:1', 'h2:2', 'h3:3'] * 5, self.broker.attempts)
        self.assertEqual(1, sub.disconnections)

    def test_image_filter_and_close_without_broker(self):
        self.broker.scripts['h1:1'] = [notification('other'),
                                       notification('mine')]
        sub = events.Subscription(self.conf, image_id='mine',
                                  clock=self.clock, sleep=self.sleep)

        self.assertEqual('mine', sub.wait(5).image_id)
        sub._conn.release = mock.Mock(side_effect=OSError('gone'))
        sub.close()
        sub.close()
