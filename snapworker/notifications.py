"""The notifications a snapshot emits, one emitter per snapshot.

Event types (publisher ``snapworker:<host>``; priority INFO but ERROR for
``snapshot.create.error``)::

    snapshot.create.start       plan chosen, before any data moves
    snapshot.source_released    the disk is no longer needed: a suspended
                                guest may resume (sent once)
    snapshot.progress           throttled to [worker] progress_interval
    snapshot.create.end         image active
    snapshot.create.error       error_code / error_message name the cause
    snapshot.create.refused     (WARN) the request named an image that is
                                not its to fill (gone, another project's,
                                already filled, or a duplicate delivery of
                                a request in progress): nothing was done
                                and the image was not touched

The names differ from Nova's own ``instance.snapshot.*`` so that both can be
consumed on one bus. Every payload is a versioned ``SnapshotPayload``.
"""

import collections
import threading
import time

import oslo_messaging as messaging
from oslo_log import log as logging

LOG = logging.getLogger(__name__)

START = 'snapshot.create.start'
SOURCE_RELEASED = 'snapshot.source_released'
PROGRESS = 'snapshot.progress'
END = 'snapshot.create.end'
ERROR = 'snapshot.create.error'
REFUSED = 'snapshot.create.refused'
#: The events after which a request has nothing more to say.
FINAL = (END, ERROR, REFUSED)


#: Events one worker keeps while the broker does not take them; beyond
#: this the oldest progress events are dropped (never a final one).
MAX_QUEUED = 1000


def get_notifier(transport, conf):
    """The worker's notifier; it sends even when no driver is configured.

    Notifications are the worker's only output, so an empty
    ``[oslo_messaging_notifications] driver`` means ``messagingv2`` here
    rather than oslo.messaging's "send nothing". ``driver = noop`` still
    turns them off. Sending happens on a thread of its own
    (``QueuedNotifier``).
    """
    driver = None if conf.oslo_messaging_notifications.driver else (
        'messagingv2')
    return QueuedNotifier(messaging.Notifier(
        transport, driver=driver, publisher_id=f'snapworker:{conf.host}'))


class QueuedNotifier:
    """Sends notifications in order from one thread; never blocks a job.

    While the broker is away oslo.messaging's send blocks: with
    ``[oslo_messaging_notifications] retry = -1`` (the default) it
    reconnects until the broker takes the event, with a finite retry it
    logs and drops it. A job's data path must not wait for that, so
    ``info``/``warn``/``error`` only queue the event, and one sender
    thread sends them in order: none is lost or reordered while the
    worker lives (with the default retry). An exception escaping the
    driver leaves the event at the head, retried. The queue is bounded:
    when full, its oldest progress event makes room.
    """

    def __init__(self, notifier, max_queued=MAX_QUEUED, retry_delay=1.0):
        self._notifier = notifier
        self._max_queued = max_queued
        self._retry_delay = retry_delay
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run,
                                        name='notifications', daemon=True)
        self._thread.start()

    def info(self, context, event_type, payload):
        self._put('info', context, event_type, payload)

    def warn(self, context, event_type, payload):
        self._put('warn', context, event_type, payload)

    def error(self, context, event_type, payload):
        self._put('error', context, event_type, payload)

    def _put(self, priority, context, event_type, payload):
        with self._cond:
            if len(self._queue) >= self._max_queued:
                self._make_room()
            self._queue.append((priority, context, event_type, payload))
            self._cond.notify_all()

    def _make_room(self):
        # The head is being sent while the sender is busy: keep it.
        for i, (_, _, event_type, _) in enumerate(self._queue):
            if i == 0 and self._busy:
                continue
            if event_type == PROGRESS:
                del self._queue[i]
                return
        LOG.warning('%d notifications queued and none is a progress '
                    'event: keeping them all', len(self._queue))

    def flush(self, timeout):
        """Wait until every queued event is sent; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def stop(self, timeout=10.0):
        """Send what is queued (bounded by ``timeout``), then stop."""
        sent = self.flush(timeout)
        with self._cond:
            self._stopping = True
            left = len(self._queue)
            self._cond.notify_all()
        if not sent:
            LOG.error('Stopping with %d notification(s) the broker did not '
                      'take', left)
        self._thread.join(1.0)

    def _run(self):
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                event = self._queue[0]
                self._busy = True
            sent = self._send(event)
            with self._cond:
                if sent:
                    self._queue.popleft()
                self._busy = False
                self._cond.notify_all()
                if not sent and not self._stopping:
                    self._cond.wait(self._retry_delay)

    def _send(self, event):
        priority, context, event_type, payload = event
        try:
            getattr(self._notifier, priority)(context, event_type, payload)
            return True
        except Exception as e:
            LOG.warning('Could not send %s (%s); retrying in order',
                        event_type, e)
            return False


class SnapshotEmitter:
    """Sends the events of one snapshot with its current payload.

    A notification that cannot be sent is logged, never raised: losing a
    progress event must not fail a snapshot that is otherwise fine.
    """

    def __init__(self, notifier, context, payload, progress_interval,
                 clock=time.monotonic):
        self._notifier = notifier
        self._context = context
        self.payload = payload
        self._progress_interval = progress_interval
        self._clock = clock
        self._last_progress = None

    def _emit(self, event_type, priority='info'):
        primitive = self.payload.obj_to_primitive()
        send = getattr(self._notifier, priority)
        try:
            send(self._context, event_type, primitive)
        except Exception:
            LOG.exception('Could not send %s for image %s', event_type,
                          self.payload.image_id)

    def start(self):
        self._emit(START)

    def source_released(self):
        self._emit(SOURCE_RELEASED)

    def progress(self, force=False):
        now = self._clock()
        due = (self._last_progress is None or
               now - self._last_progress >= self._progress_interval)
        if force or due:
            self._last_progress = now
            self._emit(PROGRESS)

    def end(self):
        self._emit(END)

    def error(self, code, message):
        self.payload.error_code = code
        self.payload.error_message = message
        self._emit(ERROR, priority='error')

    def refused(self, code, message):
        self.payload.error_code = code
        self.payload.error_message = message
        self._emit(REFUSED, priority='warn')
