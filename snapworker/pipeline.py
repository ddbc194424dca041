"""One snapshot, from request to active image, whatever the plan.

The order is fixed and every step that can refuse does so before any data
moves: the image (the request's to fill: exists, the requesting project's,
queued), the request itself (well-formed), the domain (exists, shut off,
owned by the requesting project unless the context is an admin's), the disk
(from the domain XML, checked and pinned by its source, no larger than
``[worker] max_virtual_size`` and the root disk Nova gave the instance).
Then the source's cheapest plan runs; when it has read the data the domain
is checked again (a guest started during the read makes the image
inconsistent) and so are the pinned files, and Glance must report the image
active.

Any failure ends the same way: the plan's cleanup removes what it created,
the Glance image is deleted if the job claimed it (as Nova's
``delete_image_on_error`` does) and a ``snapshot.create.error`` names the
cause. A request whose image is not its to fill (see ``glance.claim``)
touches nothing and ends with ``snapshot.create.refused``.

A crash ends no way at all, so the job keeps a journal record (journal.py)
from its first step to its end: what the plan creates is journalled
through ``track``/``handed_over`` before it exists, and a restarted worker
cleans up from the record. The record is removed once the job's outcome
is settled (resources released, image active or deleted), just before the
final event: a crash in between loses the event, not the cleanup, and
Nova's waiter then learns the outcome from the image's status.
"""

import dataclasses
import time

from oslo_log import log as logging

from snapworker import exception
from snapworker import hostio
from snapworker import journal
from snapworker import sources
from snapworker.sources import base as sources_base
from snapworker.streams import body as streams_body
from snapworker.streams import digest as streams_digest

LOG = logging.getLogger(__name__)


class SnapshotJob(sources_base.PlanContext):
    """Runs one snapshot request; the plan context fills its image."""

    def __init__(self, conf, hypervisor, images, emitter, instance_uuid,
                 image_id, target_format, clock=time.monotonic,
                 record=None, context=None, max_virtual_size=None,
                 request_error=None, reaper=None, sent_at=None,
                 flattener=None):
        """:param record: the job's ``journal.Record`` (written when the
            request was accepted); None runs without a journal (nothing
            to recover after a crash).
        :param context: the request context: whose project the instance
            and the image must belong to.
        :param max_virtual_size: the root disk size Nova gave the
            instance, bytes; bounds the disk with ``[worker]
            max_virtual_size``.
        :param request_error: why the request is malformed, if it is: the
            job then only claims the image (to delete it) and fails.
        :param reaper: the ``reaper.ImageReaper`` that deletes the image
            when Glance does not at once; None: no retries.
        :param sent_at: when the client sent the request (epoch seconds),
            for the manager's ``[worker] max_request_age``.
        :param flattener: the worker's ``sources.flattener.Flattener``,
            handed to the source (RBD clones flattened in the background).
        """
        super().__init__()
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
        self._context = context
        self._max_virtual_size = max_virtual_size
        self._request_error = request_error
        self._reaper = reaper
        self.sent_at = sent_at
        self._flattener = flattener
        #: The image is this request's: deleted if the snapshot fails.
        self._owns_image = False
        #: Glance did not answer the claim: settled by the reaper.
        self._claim_pending = False
        #: (algorithm, md5, hash) of the bytes uploaded, once sent.
        self._sent_digest = None
        #: The Glance store uploads go to (None: Glance's default).
        self._store = None
        #: A ``Cancelled`` error once an admin cancelled the job.
        self.cancelled = None

    def cancel(self, by=None):
        """Ask the job to stop: checked at every read and helper poll."""
        self.cancelled = exception.Cancelled(image_id=self.image_id,
                                             by=by or 'an admin')

    def check_cancelled(self):
        """:raises Cancelled: the job was cancelled."""
        if self.cancelled is not None:
            raise self.cancelled

    def describe(self):
        """What ``get_status`` reports about this job."""
        p = self.payload
        return {'image_id': self.image_id,
                'instance_uuid': self.instance_uuid,
                'request_id': p.request_id, 'strategy': p.strategy,
                'bytes_read': p.bytes_read,
                'bytes_uploaded': p.bytes_uploaded,
                'bytes_total': p.bytes_total,
                'seconds': self._elapsed()}

    # -- the plan-facing API (see sources/base.py) --------------------------

    def upload(self, stream, disk_format, store=None, reads_source=True):
        store = store or self._store
        self.payload.store = store
        self.payload.bytes_total = stream.size
        read_before = self.payload.bytes_read

        def count_reads():
            if reads_source:
                self.payload.bytes_read = read_before + stream.bytes_read

        def on_progress(bytes_out):
            self.check_cancelled()
            self.payload.bytes_uploaded = bytes_out
            count_reads()
            self._emitter.progress()

        digest = (streams_digest.BackgroundDigest(
            self._conf.glance.hash_algorithm)
            if self._conf.worker.verify_upload else None)
        counting = streams_body.CountingBody(
            stream, on_progress, digest, throttle=hostio.Throttle(
                self._conf.worker.max_read_bytes_per_second))
        try:
            self._images.upload(self.image_id, counting, stream.size,
                                disk_format, store=store)
            if digest is not None:
                self._sent_digest = (digest.algorithm, *digest.finish())
        except exception.SnapshotError as e:
            if counting.read_error is None:
                raise
            if isinstance(counting.read_error, exception.SnapshotError):
                raise counting.read_error from e
            raise exception.SourceReadError(
                path=self._location,
                reason=str(counting.read_error)) from e
        finally:
            count_reads()
            if digest is not None:
                digest.close()
        self.payload.bytes_uploaded = counting.bytes_out

    def register_location(self, url, validation_data=None):
        self.payload.location_api = self._images.add_location(
            self.image_id, url, validation_data)

    def source_released(self):
        if self.payload.source_held_seconds is not None:
            return
        # The read (or point-in-time copy) is done. It is consistent only
        # if the guest stayed off and the files are the ones pinned; check
        # before a suspended guest is told it may run again, because then
        # it will.
        domain = self._hypervisor.get_domain(self.instance_uuid)
        if not domain.shut_off:
            raise exception.SourceChanged(
                what=f'instance {self.instance_uuid} is {domain.state}')
        self._source.verify_unchanged()
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
        hostio.set_thread_io_priority(self._conf.worker.io_priority)
        try:
            plan = self._steps()
        except Exception as e:
            self.fail(e, leftovers=self._release_quietly())
            return
        leftovers = self._release_quietly()
        self.payload.duration_seconds = self._elapsed()
        self._emitter.progress(force=True)
        self._end_record(leftovers)
        self._emitter.end()
        LOG.info('Snapshot of %s into image %s done in %.2f s '
                 '(strategy %s, %d bytes read, %d scratch bytes)',
                 self.instance_uuid, self.image_id,
                 self.payload.duration_seconds, plan.strategy,
                 self.payload.bytes_read, self.payload.scratch_bytes)

    def accept(self):
        """Journal the request as it is accepted, before it is queued.

        :raises SnapshotInProgress: a request for this image is already
            accepted or running here (a duplicate delivery).
        :raises JournalError:
        """
        if self._record is not None:
            self._record.begin()

    def _steps(self):
        self.check_cancelled()
        self._claim_image()
        if self._request_error:
            raise exception.InvalidRequest(reason=self._request_error)
        decision = self._planner().decide(opened=self._opened)
        self._plan = plan = decision.plan
        self._location = decision.facts.location
        self._store = decision.store
        self._describe(decision.facts, plan)
        self.check_cancelled()
        self._emitter.start()
        self._held_since = self._clock()
        result = plan.run(self)
        if result is not None:
            for name, value in dataclasses.asdict(result).items():
                if value is not None:
                    setattr(self.payload, name, value)
        self.source_released()
        image = self._images.wait_active(
            self.image_id, self._conf.worker.active_timeout)
        self.payload.image_status = image['status']
        self._verify(image)
        self.payload.image_hashed = bool(image.get('os_hash_value')
                                         or image.get('checksum'))
        return plan

    def _planner(self):
        return Planner(self._conf, self._hypervisor, self._images,
                       self._context, self.instance_uuid,
                       self._requested_format, self._max_virtual_size,
                       self._flattener)

    def _opened(self, source):
        """The planner opened the source: the job closes it, whatever
        happens next."""
        self._source = source

    def _verify(self, image):
        """What Glance stored hashes to what was sent, or the job fails.

        ``checksum`` (md5) always; ``os_hash_value`` when Glance used the
        algorithm the worker hashed with (``[glance] hash_algorithm``).
        """
        if self._sent_digest is None:
            return
        algorithm, md5, value = self._sent_digest
        mismatched = []
        if image.get('checksum') != md5:
            mismatched.append(f"checksum {image.get('checksum')} != {md5}")
        if image.get('os_hash_algo') == algorithm:
            if image.get('os_hash_value') != value:
                mismatched.append(f'{algorithm} differs')
        else:
            LOG.warning('Glance hashed image %s with %s, the worker with %s '
                        '([glance] hash_algorithm): only the md5 checksum '
                        'is compared', self.image_id,
                        image.get('os_hash_algo'), algorithm)
        if mismatched:
            raise exception.ImageDataMismatch(image_id=self.image_id,
                                              what='; '.join(mismatched))
        self.payload.data_verified = True

    def _release_quietly(self):
        """Undo the plan, close the source; each step on its own.

        A step that fails is logged and the next one still runs: the
        job's ending (its notification, its image) must not depend on
        cleanup succeeding.

        :returns: what the plan could not remove (``[(kind, ref)]``), or
            ``journal.EVERYTHING`` when its cleanup broke its contract
            and raised, so that nothing it tracked is forgotten.
        """
        plan, self._plan = self._plan, None
        source, self._source = self._source, None
        leftovers = []
        if plan is not None:
            try:
                leftovers = plan.cleanup() or []
            except Exception:
                LOG.exception('Snapshot into image %s: plan cleanup failed',
                              self.image_id)
                leftovers = journal.EVERYTHING
        if source is not None:
            try:
                source.close()
            except Exception:
                LOG.exception('Snapshot into image %s: source close failed',
                              self.image_id)
        return leftovers

    def fail_unstarted(self, error):
        """End a job that never ran (the worker stops): claim, then fail.

        The image is claimed first by the usual rule so that a request
        that was the image's to fill deletes it, as a failed snapshot
        would, and any other leaves it alone.
        """
        try:
            self._claim_image()
        except exception.SnapshotError as e:
            LOG.info('Image %s is not claimable (%s); left as it is',
                     self.image_id, e.code)
        except Exception:
            LOG.exception('Could not claim image %s', self.image_id)
        self.fail(error)

    def fail(self, error, leftovers=()):
        """End the snapshot: delete its image, report the cause.

        Only an image the job claimed is deleted; a refusal (an image
        that is not this request's) touches nothing and says so.

        :param leftovers: what the plan's cleanup could not remove (see
            ``_release_quietly``); the journal keeps it and the message
            names it.
        """
        if isinstance(error, exception.SnapshotError):
            code, message = error.code, str(error)
            LOG.warning('Snapshot of %s into image %s failed: %s',
                        self.instance_uuid, self.image_id, message)
        else:
            code, message = 'InternalError', f'{type(error).__name__}: {error}'
            LOG.error('Snapshot of %s into image %s failed',
                      self.instance_uuid, self.image_id, exc_info=error)
        try:
            if self._owns_image:
                self._delete_image(error)
            elif self._claim_pending:
                self._hand_to_reaper(claim=True)
        except Exception:
            LOG.exception('Deleting image %s failed', self.image_id)
        self.payload.duration_seconds = self._elapsed()
        journalled = self._end_record(leftovers)
        if leftovers:
            message += ' ' + _leftovers_sentence(leftovers, journalled)
        if getattr(error, 'refusal', False) and not self._owns_image:
            self._emitter.refused(code, message)
        else:
            self._emitter.error(code, message)

    def _delete_image(self, error):
        """Delete the claimed image, or hand it to the reaper.

        One attempt, unless the failure itself was Glance not answering
        (another attempt would only make the error later): the reaper
        retries in the background, the journal keeps the image's record
        until Glance confirms, and ``image_status`` stays what Glance last
        reported.
        """
        if not isinstance(error, exception.GlanceUnavailable) and (
                self._images.delete(self.image_id, retries=False)):
            self.payload.image_status = 'deleted'
            return
        LOG.warning('Image %s of the failed snapshot is not deleted yet '
                    '(Glance last said %s); deletion continues in the '
                    'background', self.image_id, self.payload.image_status)
        self._hand_to_reaper(
            now=isinstance(error, exception.GlanceUnavailable))

    def _hand_to_reaper(self, claim=False, now=False):
        if self._reaper is None:
            return
        details = {'claim_project': self._project_id()} if claim else {}
        try:
            done = self.handed_over(sources_base.GLANCE_IMAGE, self.image_id,
                                    to=sources_base.REAPER, **details)
        except exception.JournalError:
            LOG.exception('The pending deletion of image %s is not '
                          'journalled: a restart before it succeeds '
                          'forgets it', self.image_id)
            done = _noop
        self._reaper.add(self._images, self.image_id, done, now=now,
                         claim_project=details.get('claim_project'))

    def _end_record(self, leftovers=()):
        """Close the journal record; a failure is logged, not raised.

        Nothing may keep the final event from being sent; a record that
        could not be closed is recovered at the next start, and so are
        the ``leftovers`` it keeps.

        :returns: whether the record says what it should (False without
            a journal).
        """
        if self._record is None:
            return False
        try:
            return self._record.finish(keep=leftovers)
        except Exception:
            LOG.exception('Could not close the journal record of image %s',
                          self.image_id)
            return False

    def _elapsed(self):
        return round(self._clock() - self._started, 3)

    def _project_id(self):
        return getattr(self._context, 'project_id', None)

    def _claim_image(self):
        """Make the image this job's (see ``glance.ImageService.claim``)."""
        try:
            image = self._images.claim(self.image_id, self._project_id())
        except (exception.ImageNotOwned, exception.ImageNotQueued) as e:
            self.payload.image_status = e.kwargs.get('status')
            raise
        except exception.ImageNotFound:
            # Gone, or another project's private image: either way the
            # worker cannot say more about it than Glance did.
            self.payload.image_status = None
            raise
        except exception.GlanceUnavailable:
            # Whether the image is the request's is not known yet: the
            # reaper claims it (then deletes it) once Glance answers.
            self._claim_pending = True
            raise
        self.payload.image_status = image.get('status')
        if self._record is not None:
            self._record.claim_image()
        self._owns_image = True

    def _describe(self, facts, plan):
        p = self.payload
        p.strategy = plan.strategy
        p.plan_reason = plan.reason
        p.source_kind = facts.kind
        p.source_format = facts.format
        p.virtual_size = facts.virtual_size
        p.target_format = plan.target_format


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a snapshot of one instance would do, and why.

    ``source`` is open (its files checked and pinned by ``inspect``): the
    caller closes it. Nothing else exists yet: no data was read, no plan
    ran, nothing was created.
    """

    domain: object
    source: sources_base.Source
    facts: sources_base.SourceFacts
    plan: sources_base.Plan
    store: str | None

    def describe(self):
        """The decision as ``plan_snapshot`` (RPC 1.2) answers it."""
        return {'instance_uuid': self.domain.uuid,
                'strategy': self.plan.strategy,
                'reason': self.plan.reason,
                'source_kind': self.facts.kind,
                'source_format': self.facts.format,
                'target_format': self.plan.target_format,
                'virtual_size': self.facts.virtual_size,
                'store': self.store,
                'instance_owner': self.domain.owner_project,
                'base_image_ref': self.domain.base_image_id,
                'managed_save': self.domain.managed_save}


class Planner:
    """Every check that can refuse a snapshot, in order, then its plan.

    Shared by a snapshot (``SnapshotJob``) and a ``plan`` request, so that
    a plan request is refused exactly when the snapshot would be: the
    domain (exists, shut off, owned by the requesting project unless the
    context is an admin's), the disk (from the domain XML, each file
    checked and pinned by its source before any program opens it, no
    larger than the limits), the target format. Only then does the source
    choose its plan; running it is the caller's business.
    """

    def __init__(self, conf, hypervisor, images, context, instance_uuid,
                 target_format=None, max_virtual_size=None, flattener=None):
        self._conf = conf
        self._hypervisor = hypervisor
        self._images = images
        self._context = context
        self.instance_uuid = instance_uuid
        self._requested_format = target_format
        self._max_virtual_size = max_virtual_size
        self._flattener = flattener

    def decide(self, opened=None):
        """The ``Decision`` for this instance.

        :param opened: called with the source as soon as it is open,
            before it is inspected, so that the caller closes it even when
            a later check refuses (without it, ``decide`` closes the
            source itself when it raises).
        :raises SnapshotError: the refusal a snapshot would end with.
        """
        domain = self._shut_off_domain()
        self._check_instance_owner(domain)
        if domain.root_disk is None:
            raise exception.DiskNotFound(instance_uuid=self.instance_uuid)
        source = sources.open_source(domain.root_disk, self._conf,
                                     flattener=self._flattener)
        if opened is not None:
            opened(source)
        try:
            return self._decide(domain, source)
        except BaseException:
            if opened is None:
                source.close()
            raise

    def _decide(self, domain, source):
        facts = source.inspect()
        self._check_size(facts)
        store = self._snapshot_store(domain)
        target_format = self._target_format(facts)
        # Only sources that can put data in a store themselves (RBD
        # clones, direct writes) care where Glance keeps it; the others do
        # not pay for the lookup.
        stores = self._images.stores() if (
            source.wants_glance_stores) else None
        release_first = domain.managed_save and (
            self._conf.worker.suspended_guest_plan == 'release_first')
        plan = source.plan(target_format, stores,
                           release_first=release_first, store_id=store)
        return Decision(domain, source, facts, plan, store)

    def _project_id(self):
        return getattr(self._context, 'project_id', None)

    def _shut_off_domain(self):
        domain = self._hypervisor.get_domain(self.instance_uuid)
        if not domain.shut_off:
            raise exception.InstanceNotShutOff(
                instance_uuid=self.instance_uuid, state=domain.state)
        return domain

    def _is_admin(self):
        return 'admin' in (getattr(self._context, 'roles', None) or [])

    def _check_instance_owner(self, domain):
        """The instance is the requesting project's, or the caller an admin.

        The owner is Nova's metadata in the domain XML; a domain without
        it is nobody's, which only an admin may snapshot.
        """
        if self._is_admin():
            return
        if domain.owner_project is None or (
                domain.owner_project != self._project_id()):
            raise exception.InstanceNotOwned(
                instance_uuid=self.instance_uuid,
                owner=domain.owner_project or 'unknown',
                project_id=self._project_id())

    def _snapshot_store(self, domain):
        """The store of ``[glance] snapshot_store`` for this instance."""
        policy = self._conf.glance.snapshot_store
        if policy == 'default':
            return None
        if policy != 'base':
            return policy
        if domain.base_image_id:
            try:
                stores = self._images.image_stores(domain.base_image_id)
            except exception.GlanceError as e:
                LOG.warning('Cannot tell the store of base image %s (%s): '
                            'using the default store', domain.base_image_id,
                            e)
                stores = []
            if stores:
                return stores[0]
        LOG.info('Instance %s: no store known for its base image; using '
                 'the default store', self.instance_uuid)
        return None

    def _check_size(self, facts):
        limits = []
        if self._conf.worker.max_virtual_size:
            limits.append((self._conf.worker.max_virtual_size,
                           '[worker] max_virtual_size'))
        if self._max_virtual_size:
            limits.append((self._max_virtual_size,
                           'the root disk size of the instance\'s flavor'))
        for limit, why in limits:
            if facts.virtual_size > limit:
                raise exception.DiskTooLarge(
                    path=facts.location, virtual_size=facts.virtual_size,
                    limit=limit, why=why)

    def _target_format(self, facts):
        fmt = self._requested_format or facts.format
        if fmt not in sources_base.SUPPORTED_TARGET_FORMATS:
            raise exception.UnsupportedTargetFormat(
                target_format=fmt,
                supported=', '.join(sources_base.SUPPORTED_TARGET_FORMATS))
        return fmt


def _noop():
    pass


def _leftovers_sentence(leftovers, journalled):
    """The end of an error message when cleanup left something behind."""
    if leftovers is journal.EVERYTHING:
        what = 'what the job had created'
    else:
        what = ', '.join(f'{kind} {ref}' for kind, ref in leftovers)
    if journalled:
        return (f'Could not remove {what}: the worker retries at its next '
                f'start.')
    return f'Could not remove {what}: remove it by hand.'

