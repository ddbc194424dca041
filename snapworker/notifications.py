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


def get_notifier(transport, conf):
    """The worker's notifier; it sends even when no driver is configured.

    Notifications are the worker's only output, so an empty
    ``[oslo_messaging_notifications] driver`` means ``messagingv2`` here
    rather than oslo.messaging's "send nothing". ``driver = noop`` still
    turns them off.
    """
    driver = None if conf.oslo_messaging_notifications.driver else (
        'messagingv2')
    return messaging.Notifier(transport, driver=driver,
                              publisher_id=f'snapworker:{conf.host}')


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
