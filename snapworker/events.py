"""Following snapshots from the notification bus, without losing events.

Nova's offloading driver, the operator CLI and the tests all need "tell me
what happens to image X". A notification *listener* would compete for the
shared ``notifications.*`` queues that other consumers (ceilometer,
searchlight) read, and only receives what arrives after it started. This
subscriber instead binds its own exclusive, auto-deleted queue to the
notification exchange: every consumer gets a copy, and a subscription made
*before* the cast cannot miss an event however fast the worker is - as
long as the broker stays up.

When the connection is lost (a RabbitMQ node restarts or fails), the
subscription tries the hosts of the transport URL in turn and declares a
new queue on the first that answers. What was published in between is
lost to it: ``disconnections`` counts the gaps, so a caller can ask
Glance what it missed (see ``snapworker.nova.waiter``).

RabbitMQ only: it speaks AMQP through kombu, the library oslo.messaging's
rabbit driver uses, with the same exchange declaration, and it reads the
transport URL as that driver does (``TransportURL.parse``: every host,
quoted credentials, virtual host, query options such as ``ssl=1`` over
``[oslo_messaging_rabbit]``).

Part of the light client: it reads only oslo.messaging's options, from the
configuration object it is given (nova.conf in nova-compute).
"""

import collections
import dataclasses
import json
import ssl
import time
import uuid
from urllib import parse

import kombu
import oslo_messaging as messaging
from oslo_log import log as logging
from oslo_messaging import opts as messaging_opts
from oslo_utils import netutils

from snapworker import notifications
from snapworker import rpc

LOG = logging.getLogger(__name__)

_ENVELOPE_KEY = 'oslo.message'
_RABBIT_GROUP = 'oslo_messaging_rabbit'
_DEFAULT_PORT = 5672
_SSL_VERSIONS = {
    'tlsv1': getattr(ssl, 'PROTOCOL_TLSv1', None),
    'tlsv1_1': getattr(ssl, 'PROTOCOL_TLSv1_1', None),
    'tlsv1_2': getattr(ssl, 'PROTOCOL_TLSv1_2', None),
    'sslv23': ssl.PROTOCOL_TLS,
    'tls': ssl.PROTOCOL_TLS,
}

#: Seconds between two rounds over every host while disconnected: the
#: first round starts at once, later ones back off up to the maximum.
RECONNECT_INTERVAL = 0.5
RECONNECT_INTERVAL_MAX = 5.0
#: Seconds one host may take to accept a connection.
CONNECT_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class Event:
    event_type: str
    publisher_id: str
    priority: str
    payload: dict
    raw_payload: dict

    @property
    def image_id(self):
        return self.payload.get('image_id')


def _unwrap(body):
    if isinstance(body, (bytes, str)):
        body = json.loads(body)
    if _ENVELOPE_KEY in body:
        body = json.loads(body[_ENVELOPE_KEY])
    return body


def _payload_data(payload):
    """The fields of a versioned payload (or the payload if unversioned)."""
    return payload.get('snapworker_object.data', payload)


@dataclasses.dataclass(frozen=True)
class BrokerAddress:
    """One RabbitMQ host of the notification transport URL, as kombu
    connects to it: ``kombu.Connection(**address.connection_kwargs())``."""

    hostname: str
    port: int
    userid: str
    password: str
    virtual_host: str
    ssl: object  # False, True or a dict of ssl options
    heartbeat: int

    def connection_kwargs(self):
        return dict(hostname=self.hostname, port=self.port,
                    userid=self.userid, password=self.password,
                    virtual_host=self.virtual_host, ssl=self.ssl,
                    heartbeat=self.heartbeat, transport='pyamqp',
                    connect_timeout=CONNECT_TIMEOUT)

    def __str__(self):
        """The address for logs, without the password."""
        scheme = 'amqps' if self.ssl else 'amqp'
        vhost = parse.quote(self.virtual_host, safe='')
        return (f'{scheme}://{self.userid}@{self.hostname}:{self.port}/'
                f'{vhost}')


class _RabbitOptions:
    """``[oslo_messaging_rabbit]`` as oslo.messaging's rabbit driver sees
    it: an option given in the transport URL's query (``?ssl=1``) wins
    over the configured one, converted by the option's own type."""

    def __init__(self, conf, url):
        self._group = conf[_RABBIT_GROUP]
        self._types = {opt.dest: opt.type
                       for group, opts in messaging_opts.list_opts()
                       if group == _RABBIT_GROUP for opt in opts}
        self._query = url.query

    def __getattr__(self, name):
        if name in self._query and name in self._types:
            return self._types[name](self._query[name])
        return getattr(self._group, name)


def _ssl_options(rabbit, hostname):
    """kombu's ``ssl`` argument, as the rabbit driver builds it.

    With a CA file the server's certificate is checked against the host
    name connected to (each host of a cluster in turn).
    """
    if not rabbit.ssl:
        return False
    params = {}
    if rabbit.ssl_version:
        key = rabbit.ssl_version.lower()
        if _SSL_VERSIONS.get(key) is None:
            raise ValueError(f'Invalid [{_RABBIT_GROUP}] ssl_version '
                             f'{rabbit.ssl_version!r}')
        params['ssl_version'] = _SSL_VERSIONS[key]
    if rabbit.ssl_key_file:
        params['keyfile'] = rabbit.ssl_key_file
    if rabbit.ssl_cert_file:
        params['certfile'] = rabbit.ssl_cert_file
    if rabbit.ssl_ca_file:
        params['ca_certs'] = rabbit.ssl_ca_file
        params['cert_reqs'] = ssl.CERT_REQUIRED
        params['server_hostname'] = hostname
    return params or True


def broker_addresses(conf):
    """Every RabbitMQ host of the notification transport, in URL order.

    ``[oslo_messaging_notifications] transport_url``, else ``[DEFAULT]
    transport_url``, parsed by oslo.messaging itself, so the credentials
    are decoded exactly once and a cluster's hosts are all kept (they are
    tried in turn, as failover).

    :raises ValueError: the URL names another driver than RabbitMQ's.
    """
    url = messaging.TransportURL.parse(
        conf, conf.oslo_messaging_notifications.transport_url
        or conf.transport_url)
    if url.transport not in ('rabbit', 'amqp'):
        raise ValueError(f'snapworker follows notifications on RabbitMQ '
                         f'only, not on {url.transport!r}')
    rabbit = _RabbitOptions(conf, url)
    hosts = url.hosts or [messaging.TransportHost('localhost')]
    return [BrokerAddress(
        hostname=netutils.escape_ipv6(host.hostname or 'localhost'),
        port=host.port or _DEFAULT_PORT,
        userid=host.username or 'guest',
        password=host.password or 'guest',
        virtual_host=url.virtual_host or '/',
        ssl=_ssl_options(rabbit, host.hostname),
        heartbeat=rabbit.heartbeat_timeout_threshold)
        for host in hosts]


class Subscription:
    """A private copy of snapworker's notifications, from now on.

    Use as a context manager; ``wait()`` returns the next matching event.
    It never raises for a lost connection: it reconnects, and meanwhile
    ``connected`` is False and ``wait()`` times out like a quiet bus.
    """

    def __init__(self, conf, image_id=None, publisher_prefix='snapworker:',
                 clock=time.monotonic, sleep=time.sleep):
        rpc.register_opts(conf)
        rabbit = conf[_RABBIT_GROUP]
        self._image_id = image_id
        self._publisher_prefix = publisher_prefix
        self._clock = clock
        self._sleep = sleep
        self._events = collections.deque()
        self._addresses = broker_addresses(conf)
        self._next_host = 0
        self._exchange = kombu.Exchange(
            conf.control_exchange, type='topic',
            durable=rabbit.amqp_durable_queues or rabbit.rabbit_quorum_queue,
            auto_delete=rabbit.amqp_auto_delete)
        self._routing_keys = [f'{topic}.*' for topic in
                              conf.oslo_messaging_notifications.topics]
        self._conn = None
        self._consumer = None
        self._retry_at = 0.0
        self._retry_interval = RECONNECT_INTERVAL
        #: Times the connection was lost; events published while it was
        #: down are not received.
        self.disconnections = 0
        #: The host connected to, or None.
        self.address = None
        if not self._connect():
            # Counted as a gap: whatever happens before the first
            # connection is not seen either.
            self.disconnections += 1

    @property
    def connected(self):
        return self._conn is not None

    def _connect(self):
        """Try every host once, from the one after the last used.

        A failover thus moves on to the next host and stays where it
        landed.
        """
        for _ in range(len(self._addresses)):
            address = self._addresses[self._next_host]
            self._next_host = (self._next_host + 1) % len(self._addresses)
            conn = kombu.Connection(**address.connection_kwargs())
            try:
                conn.connect()
                self._consume(conn)
            except Exception as e:
                LOG.warning('Cannot follow notifications on %s: %s',
                            address, e)
                self._release(conn)
                continue
            if self.disconnections:
                LOG.info('Following notifications on %s again', address)
            self._conn = conn
            self.address = address
            self._retry_interval = RECONNECT_INTERVAL
            return True
        self._retry_at = self._clock() + self._retry_interval
        self._retry_interval = min(self._retry_interval * 2,
                                   RECONNECT_INTERVAL_MAX)
        return False

    def _consume(self, conn):
        """Declare a new private queue bound to the topics, consume it.

        A new name each time: an exclusive queue of the lost connection
        may outlive it for a while on a node that is still up.
        """
        queue = kombu.Queue(
            f'snapworker-events-{uuid.uuid4().hex}', exclusive=True,
            auto_delete=True, durable=False,
            bindings=[kombu.binding(self._exchange, routing_key=key)
                      for key in self._routing_keys])
        self._consumer = kombu.Consumer(
            conn, queues=[queue], callbacks=[self._on_message],
            accept=['json'], no_ack=True)
        self._consumer.consume()

    def _lost(self, error):
        LOG.warning('Lost the notification connection to %s (%s: %s); '
                    'reconnecting', self.address, type(error).__name__,
                    error)
        self.disconnections += 1
        self._release(self._conn)
        self._conn = self._consumer = self.address = None
        self._retry_at = 0.0

    @staticmethod
    def _release(conn):
        try:
            conn.release()
        except Exception:  # the socket is already dead; nothing to free
            pass

    def _on_message(self, body, message):
        try:
            msg = _unwrap(body)
        except (ValueError, TypeError):
            LOG.warning('Ignoring a notification that is not JSON')
            return
        if not msg.get('publisher_id', '').startswith(self._publisher_prefix):
            return
        payload = msg.get('payload') or {}
        event = Event(event_type=msg.get('event_type'),
                      publisher_id=msg.get('publisher_id'),
                      priority=msg.get('priority'),
                      payload=_payload_data(payload), raw_payload=payload)
        if self._image_id and event.image_id != self._image_id:
            return
        self._events.append(event)

    def wait(self, timeout):
        """The next event, or None when ``timeout`` seconds pass."""
        deadline = self._clock() + timeout
        while not self._events:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return None
            if self._conn is None:
                if self._clock() < self._retry_at or not self._connect():
                    self._sleep(max(0.0, min(
                        remaining, self._retry_at - self._clock())))
                continue
            try:
                # Missed heartbeats are how a silently dead peer shows.
                self._conn.heartbeat_check()
                self._conn.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                pass
            except (OSError,) + self._conn.connection_errors + \
                    self._conn.channel_errors as e:
                self._lost(e)
        return self._events.popleft()

    def until_finished(self, timeout):
        """Events until the request's final one, inclusive.

        Final: ``snapshot.create.end``, ``.error`` or ``.refused``.

        Stops at ``timeout`` seconds without a final event; the caller
        tells by the last event's type.
        """
        deadline = self._clock() + timeout
        while True:
            event = self.wait(max(0.0, deadline - self._clock()))
            if event is None:
                return
            yield event
            if event.event_type in notifications.FINAL:
                return

    def close(self):
        """Give the queue back; never raises (the broker may be gone)."""
        if self._conn is None:
            return
        try:
            self._consumer.cancel()
        except Exception:
            pass
        self._release(self._conn)
        self._conn = self._consumer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
