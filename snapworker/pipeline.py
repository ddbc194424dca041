"""One snapshot, from request to active image, whatever the plan.

The order is fixed and every step that can refuse does so before any data
moves: the domain (exists, shut off), the disk (from the domain XML, inside
instances_path, a format the worker reads faithfully), the image (exists,
queued). Then the source's cheapest plan runs, the domain is checked again
(a guest started during the read makes the image inconsistent), and Glance
must report the image active.

Any failure ends the same way: the plan's cleanup removes what it created,
the Glance image is deleted (as Nova's ``delete_image_on_error`` does) and a
``snapshot.create.error`` names the cause.

A crash ends no way at all, so the job keeps a journal record (journal.py)
from its first step to its end: what the plan creates is journalled
through ``track``/``handed_over`` before it exists, and a restarted worker
cleans up from the record. The record is removed once the job's outcome
is settled (resources released, image active or deleted), just before the
final event: a crash in between loses the event, not the cleanup, and
Nova's waiter then learns the outcome from the image's status.
"""

import time

from oslo_log import log as logging

from snapworker import exception
from snapworker import sources
from snapworker.sources import base as sources_base
from snapworker.streams import body as streams_body

LOG = logging.getLogger(__name__)


class SnapshotJob:
    """Runs one snapshot request; the callbacks are the API plans use."""

    def __init__(self, conf, hypervisor, images, emitter, instance_uuid,
                 image_id, target_format, clock=time.monotonic,
                 record=None):
        """:param record: the job's unwritten ``journal.Record``; None
            runs without a journal (nothing to recover after a crash).
        """
        self._conf = conf
        self._hypervisor = hypervisor
        self._images = images
        self._emitter = emitter
        self.payload = emitter.payload
        self.instance_uuid = instance_uuid
        self.image_id = image_id
        self._requested_format = target_format
        self._clock = clock
        self._started = clock()
        self._held_since = None
        self._location = None
        self._source = None
        self._plan = None
        self._record = record

    # -- the plan-facing API (see sources/base.py) --------------------------

    def upload(self, body, disk_format, store=None):
        self.payload.bytes_total = body.size

        def on_progress(bytes_out):
            self.payload.bytes_uploaded = bytes_out
            self._emitter.progress()

        counting = streams_body.CountingBody(body, on_progress)
        try:
            self._images.upload(self.image_id, counting, body.size,
                                disk_format, store=store)
        except exception.SnapshotError as e:
            if counting.read_error is None:
                raise
            raise exception.SourceReadError(
                path=self._location,
                reason=str(counting.read_error)) from e
        self.payload.bytes_uploaded = counting.bytes_out

    def register_location(self, url, validation_data=None):
        self.payload.location_api = self._images.add_location(
            self.image_id, url, validation_data)

    def source_released(self):
        if self.payload.source_held_seconds is not None:
            return
        # The read (or point-in-time copy) is done. It is consistent only
        # if the guest stayed off all along; check before a suspended guest
        # is told it may run again, because then it will.
        self._shut_off_domain(error=exception.SourceChanged)
        self.payload.source_held_seconds = round(
            self._clock() - self._held_since, 3)
        self._emitter.source_released()

    def add_bytes_read(self, n):
        self.payload.bytes_read += n

    def add_scratch_bytes(self, n):
        self.payload.scratch_bytes += n

    def track(self, kind, ref):
        """Journal a resource the plan is about to create.

        :raises JournalError: not journalled; the plan must not create it.
        """
        if self._record is not None:
            self._record.track(kind, ref)

    def handed_over(self, kind, ref, to, **details):
        """Journal that ``to`` owns the resource now (the job no longer).

        :returns: the callable background work calls when it has finished
            with the resource (a no-op for Glance or without a journal).
        """
        if self._record is None:
            return _noop
        return self._record.handed_over(kind, ref, to, **details)

    # -- the steps ----------------------------------------------------------

    def run(self):
        """Run the snapshot; it always ends with an end or error event.

        What the plan and source hold (scratch files, RBD snapshots,
        qemu-nbd) is released before that final event, so whoever reacts
        to it finds nothing left behind.
        """
        try:
            if self._record is not None:
                self._record.begin()
            plan = self._steps()
        except Exception as e:
            self._release()
            self.fail(e)
            return
        self._release()
        self.payload.duration_seconds = self._elapsed()
        self._emitter.progress(force=True)
        self._end_record()
        self._emitter.end()
        LOG.info('Snapshot of %s into image %s done in %.2f s '
                 '(strategy %s, %d bytes read, %d scratch bytes)',
                 self.instance_uuid, self.image_id,
                 self.payload.duration_seconds, plan.strategy,
                 self.payload.bytes_read, self.payload.scratch_bytes)

    def _steps(self):
        domain = self._shut_off_domain()
        if domain.root_disk is None:
            raise exception.DiskNotFound(instance_uuid=self.instance_uuid)
        self._source = source = sources.open_source(domain.root_disk,
                                                    self._conf)
        facts = source.inspect()
        self._location = facts.location
        self._check_image_queued()
        target_format = self._target_format(facts)
        # Only sources that can reference data in place (RBD) care where
        # Glance keeps it; the others do not pay for the lookup.
        stores = self._images.stores() if (
            source.wants_glance_stores) else None
        release_first = domain.managed_save and (
            self._conf.worker.suspended_guest_plan == 'release_first')
        self._plan = plan = source.plan(target_format, stores,
                                        release_first=release_first)
        self._describe(facts, plan)
        self._emitter.start()
        self._held_since = self._clock()
        plan.run(self)
        self.source_released()
        image = self._images.wait_active(
            self.image_id, self._conf.worker.active_timeout)
        self.payload.image_status = image['status']
        self.payload.image_hashed = bool(image.get('os_hash_value')
                                         or image.get('checksum'))
        return plan

    def _release(self):
        if self._plan is not None:
            self._plan.cleanup()
            self._plan = None
        if self._source is not None:
            self._source.close()
            self._source = None

    def fail(self, error):
        """End the snapshot: clean up, delete the image, report the cause."""
        if isinstance(error, exception.SnapshotError):
            code, message = error.code, str(error)
            LOG.warning('Snapshot of %s into image %s failed: %s',
                        self.instance_uuid, self.image_id, message)
        else:
            code, message = 'InternalError', f'{type(error).__name__}: {error}'
            LOG.exception('Snapshot of %s into image %s failed',
                          self.instance_uuid, self.image_id)
        if getattr(error, 'delete_image', True):
            self._images.delete(self.image_id)
            self.payload.image_status = 'deleted'
        self.payload.duration_seconds = self._elapsed()
        self._end_record()
        self._emitter.error(code, message)

    def _end_record(self):
        if self._record is not None:
            self._record.finish()

    def _elapsed(self):
        return round(self._clock() - self._started, 3)

    def _shut_off_domain(self, error=exception.InstanceNotShutOff):
        domain = self._hypervisor.get_domain(self.instance_uuid)
        if not domain.shut_off:
            raise error(instance_uuid=self.instance_uuid, state=domain.state)
        return domain

    def _check_image_queued(self):
        image = self._images.get(self.image_id)
        if image.get('status') != 'queued':
            raise exception.ImageNotQueued(image_id=self.image_id,
                                           status=image.get('status'))

    def _target_format(self, facts):
        fmt = self._requested_format or facts.format
        if fmt not in sources_base.SUPPORTED_TARGET_FORMATS:
            raise exception.UnsupportedTargetFormat(
                target_format=fmt,
                supported=', '.join(sources_base.SUPPORTED_TARGET_FORMATS))
        return fmt

    def _describe(self, facts, plan):
        p = self.payload
        p.strategy = plan.strategy
        p.plan_reason = plan.reason
        p.source_kind = facts.kind
        p.source_format = facts.format
        p.virtual_size = facts.virtual_size
        p.target_format = plan.target_format


def _noop():
    pass
