"""Following snapshots from the notification bus, without losing events.

Nova's offloading driver, the operator CLI and the tests all need "tell me
what happens to image X". A notification *listener* would compete for the
shared ``notifications.*`` queues that other consumers (ceilometer,
searchlight) read, and only receives what arrives after it started. This
subscriber instead binds its own exclusive, auto-deleted queue to the
notification exchange: every consumer gets a copy, and a subscription made
*before* the cast cannot miss an event however fast the worker is.

RabbitMQ only: it speaks AMQP through kombu, the library oslo.messaging's
rabbit driver uses, with the same exchange declaration.
"""

import dataclasses
import json
import queue
import time

import kombu
import oslo_messaging as messaging

from snapworker import notifications
from snapworker import rpc

_ENVELOPE_KEY = 'oslo.message'


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


def _amqp_url(conf):
    url = (conf.oslo_messaging_notifications.transport_url
           or conf.transport_url)
    parsed = messaging.TransportURL.parse(conf, url)
    urls = []
    for host in parsed.hosts:
        vhost = parsed.virtual_host or ''
        urls.append(f'amqp://{host.username or "guest"}:'
                    f'{host.password or "guest"}@{host.hostname}:'
                    f'{host.port or 5672}/{vhost}')
    return ';'.join(urls)


class Subscription:
    """A private copy of snapworker's notifications, from now on.

    Use as a context manager; ``wait()`` returns the next matching event.
    """

    def __init__(self, conf, image_id=None, publisher_prefix='snapworker:'):
        rpc.register_opts(conf)
        rabbit = conf.oslo_messaging_rabbit
        self._image_id = image_id
        self._publisher_prefix = publisher_prefix
        self._events = queue.Queue()
        self._conn = kombu.Connection(_amqp_url(conf))
        exchange = kombu.Exchange(
            conf.control_exchange, type='topic',
            durable=rabbit.amqp_durable_queues or rabbit.rabbit_quorum_queue,
            auto_delete=rabbit.amqp_auto_delete)
        bindings = [kombu.binding(exchange, routing_key=f'{topic}.*')
                    for topic in conf.oslo_messaging_notifications.topics]
        self._queue = kombu.Queue(exclusive=True, auto_delete=True,
                                  durable=False, bindings=bindings)
        self._consumer = kombu.Consumer(
            self._conn, queues=[self._queue], callbacks=[self._on_message],
            accept=['json'], no_ack=True)
        self._consumer.consume()

    def _on_message(self, body, message):
        msg = _unwrap(body)
        if not msg.get('publisher_id', '').startswith(self._publisher_prefix):
            return
        payload = msg.get('payload') or {}
        event = Event(event_type=msg.get('event_type'),
                      publisher_id=msg.get('publisher_id'),
                      priority=msg.get('priority'),
                      payload=_payload_data(payload), raw_payload=payload)
        if self._image_id and event.image_id != self._image_id:
            return
        self._events.put(event)

    def wait(self, timeout):
        """The next event, or None when ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while self._events.empty():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                self._conn.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                pass
        return self._events.get_nowait()

    def until_finished(self, timeout):
        """Events until the request's final one, inclusive.

        Final: ``snapshot.create.end``, ``.error`` or ``.refused``.

        Stops at ``timeout`` seconds without a final event; the caller
        tells by the last event's type.
        """
        deadline = time.monotonic() + timeout
        while True:
            event = self.wait(max(0.0, deadline - time.monotonic()))
            if event is None:
                return
            yield event
            if event.event_type in notifications.FINAL:
                return

    def close(self):
        try:
            self._consumer.cancel()
        finally:
            self._conn.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
