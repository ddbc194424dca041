"""Following one delegated snapshot until its image is active.

The worker's notifications drive everything: they arrive as soon as
something happens, so the guest is resumed the moment the worker releases
its disk. Notifications are not guaranteed, though (a broker restart drops
them), so when none arrive for a while Glance is asked for the image's
status: a lost ``snapshot.create.end`` then costs one poll interval, not
the whole timeout.

The same holds while the broker itself is away: the subscription
reconnects on its own (to another host of a cluster, or the same one when
it is back), and every gap it reports is answered by asking Glance at
once, because the events of the gap are gone. An outage of the broker, or
of Glance, never fails a snapshot by itself; only the deadlines do.

Two deadlines keep an instance from being locked forever by a worker that
is missing or stuck: the accept timeout until the worker shows it started,
then a run timeout that grows with the disk's virtual size.
"""

import math
import time

from nova import exception as nova_exception
from oslo_log import log as logging
from oslo_utils import units

from snapworker import notifications
from snapworker.nova import exception

LOG = logging.getLogger(__name__)

_GIB = units.Gi

#: Glance statuses an image only reaches when its snapshot has failed
#: (the worker, like Nova, deletes the image of a failed snapshot).
GONE_STATUSES = ('deleted', 'killed', 'pending_delete')


class SnapshotWaiter:
    """Waits for the snapshot of one instance into one image.

    :param subscription: an ``events.Subscription`` to the image's events,
        made before the request was cast so that no event is missed.
    :param image_status: callable returning the image's Glance status, or
        ``'deleted'`` when the image no longer exists.
    :param conf: the ``[snapworker]`` option group of nova.conf.
    :param ids: ``instance_uuid``, ``image_id`` and ``host``, for errors.
    :param default_size: bytes assumed for the run timeout when the worker's
        start event (which carries the disk's virtual size) was lost.
    """

    def __init__(self, subscription, image_status, conf, ids, default_size,
                 clock=time.monotonic, sleep=time.sleep):
        self._subscription = subscription
        self._image_status = image_status
        self._conf = conf
        self._ids = ids
        self._default_size = default_size
        self._clock = clock
        self._sleep = sleep
        self._gaps = self._disconnections()

    def wait(self, on_started, on_released):
        """Block until the image is active.

        :param on_started: called once, when the worker has started (or
            evidently finished) the snapshot.
        :param on_released: called when the worker no longer needs the
            source disk; it may be called again later.
        :raises WorkerNotResponding: no sign of the worker within
            ``accept_timeout``.
        :raises SnapshotTimedOut: started but not finished in time.
        :raises SnapshotOffloadFailed: the worker reported a failure.
        :raises nova.exception.ImageNotFound: the image was deleted.
        """
        started = False
        timeout = self._conf.accept_timeout
        deadline = self._clock() + timeout
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                if started:
                    raise exception.SnapshotTimedOut(timeout=timeout,
                                                     **self._ids)
                raise exception.WorkerNotResponding(timeout=timeout,
                                                    **self._ids)
            event = self._next_event(
                min(remaining, self._conf.status_poll_interval))
            missed = self._missed_events()
            phases = []
            if event is None or missed:
                phases.append((self._polled_phase(), {}))
            if event is not None:
                phases.append(self._event_phase(event))
            for phase, payload in phases:
                if phase is None:
                    continue
                if not started:
                    started = True
                    timeout = self._run_timeout(payload.get('virtual_size'))
                    deadline = self._clock() + timeout
                    on_started()
                if phase == notifications.SOURCE_RELEASED:
                    on_released()
                elif phase == notifications.END:
                    return

    def _next_event(self, timeout):
        """The subscription's next event, None if quiet or failing.

        ``events.Subscription`` reconnects by itself; anything it raises
        all the same must not become the snapshot's failure (Nova would
        record a BrokenPipeError as the fault and delete an image the
        worker may still fill), so it only means "ask Glance".
        """
        started = self._clock()
        try:
            return self._subscription.wait(timeout)
        except Exception as e:
            LOG.warning('Waiting for snapworker notifications about image '
                        '%s failed (%s: %s); asking Glance instead',
                        self._ids['image_id'], type(e).__name__, e)
            self._sleep(max(0.0, timeout - (self._clock() - started)))
            return None

    def _disconnections(self):
        return getattr(self._subscription, 'disconnections', 0)

    def _missed_events(self):
        """Whether the subscription lost its connection since last asked."""
        gaps = self._disconnections()
        missed, self._gaps = gaps != self._gaps, gaps
        return missed

    def _event_phase(self, event):
        if event.event_type == notifications.ERROR:
            raise self._failure(event.payload)
        if event.event_type == notifications.REFUSED:
            return self._refused_phase(event.payload)
        return event.event_type, event.payload

    def _refused_phase(self, payload):
        """The worker left this request alone; Glance says where it stands.

        A duplicate delivery of a request in progress (``SnapshotInProgress``)
        is refused while the first one goes on: keep waiting for it. An
        image already active (another delivery filled it) is a success;
        any other refusal (the image is gone, another project's, filled by
        someone else) fails the snapshot.
        """
        phase = self._polled_phase()
        if phase == notifications.END:
            return phase, {}
        if payload.get('error_code') == 'SnapshotInProgress':
            return phase, {}
        raise self._failure(payload)

    def _polled_phase(self):
        """What the image's status says when the events went quiet.

        Glance being unreachable is no answer: the deadlines decide.
        """
        try:
            status = self._image_status()
        except Exception as e:
            LOG.warning('Cannot ask Glance about image %s (%s: %s)',
                        self._ids['image_id'], type(e).__name__, e)
            return None
        if status == 'active':
            return notifications.END
        if status == 'saving':
            return notifications.START
        if status in GONE_STATUSES:
            raise nova_exception.ImageNotFound(image_id=self._ids['image_id'])
        return None

    def _run_timeout(self, virtual_size):
        size = virtual_size or self._default_size or 0
        return (self._conf.timeout_base
                + self._conf.timeout_per_gib * math.ceil(size / _GIB))

    def _failure(self, payload):
        """The Nova exception that makes Nova handle the failure as its own.

        A deleted image and a vanished instance get the exceptions Nova's
        own snapshot raises for them, so the compute manager takes the same
        path (no fault for a user who deleted the image mid-way).
        """
        code = payload.get('error_code')
        if code == 'ImageNotFound':
            return nova_exception.ImageNotFound(
                image_id=self._ids['image_id'])
        if code == 'InstanceNotFound':
            return nova_exception.InstanceNotFound(
                instance_id=self._ids['instance_uuid'])
        return exception.SnapshotOffloadFailed(
            reason=f"{code}: {payload.get('error_message')}", **self._ids)
