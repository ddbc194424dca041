"""The RPC endpoint: admit snapshot requests and run them in order.

A cast is acknowledged before it is dispatched (oslo.messaging is
at-most-once), so the endpoint only validates what it can without I/O,
queues the job and returns; the job then owns the outcome and always ends
with either an active image or an error notification and a deleted image.
For a worker that dies instead, ``recover()`` does that ending when it
starts again, from the jobs' journal records.
"""

import concurrent.futures
import functools
import threading
import time

import oslo_messaging as messaging
from oslo_context import context as o_context
from oslo_log import log as logging
from oslo_utils import uuidutils

from snapworker import exception
from snapworker import glance
from snapworker import hypervisor
from snapworker import journal
from snapworker import notifications
from snapworker import objects
from snapworker import pipeline
from snapworker import reaper
from snapworker import sources
from snapworker.sources import base as sources_base
from snapworker.sources import flattener

LOG = logging.getLogger(__name__)

#: Keep in sync with rpcapi.RPC_API_VERSION.
RPC_API_VERSION = '1.2'

_TARGET_FORMATS = (None, 'raw', 'qcow2')


def _request_error(instance_uuid, image_id, target_format,
                   max_virtual_size, sent_at=None):
    """Why a request's fields are unusable, or None.

    Checked at the endpoint before anything else: a field of the wrong
    type must end as a clear error, never as an exception raised into
    oslo.messaging's dispatcher (which drops the cast silently).
    """
    if not (isinstance(instance_uuid, str)
            and uuidutils.is_uuid_like(instance_uuid)):
        return f'instance_uuid {instance_uuid!r} is not a UUID'
    if target_format not in _TARGET_FORMATS:
        return (f'target_format {target_format!r} is not one of raw, '
                f'qcow2 or null')
    if max_virtual_size is not None and (
            isinstance(max_virtual_size, bool)
            or not isinstance(max_virtual_size, int)
            or max_virtual_size < 0):
        return (f'max_virtual_size {max_virtual_size!r} is not a '
                f'non-negative integer')
    if sent_at is not None and (isinstance(sent_at, bool) or
                                not isinstance(sent_at, (int, float))):
        return f'sent_at {sent_at!r} is not a time in seconds'
    return None


class SnapshotManager:
    """Runs at most ``max_concurrent_snapshots`` snapshots at once.

    Requests beyond that wait in arrival order (the executor's FIFO queue).
    On stop, jobs that have not started are failed cleanly (image deleted,
    error notification), running ones are allowed to finish, and
    background work (RBD flattens) gets a bounded time to finish.
    """

    target = messaging.Target(version=RPC_API_VERSION)

    def __init__(self, conf, notifier, hypervisor_api=None,
                 image_service_factory=None):
        """:param image_service_factory: ``factory(context)`` returns the
            ``glance.ImageService`` acting for ``context``; None: Glance
            as ``conf`` configures it.
        """
        self._conf = conf
        self._notifier = notifier
        self._hypervisor = hypervisor_api or hypervisor.Hypervisor(
            conf.libvirt_uri)
        self._image_service_factory = image_service_factory or (
            functools.partial(glance.ImageService, conf))
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=conf.worker.max_concurrent_snapshots,
            thread_name_prefix='snapshot')
        self._stopping = threading.Event()
        self._futures = set()
        self._queued = []
        self._running = []
        self._lock = threading.Lock()
        self._journal = journal.Journal(conf.worker.journal_dir)
        self._journal.prepare()
        self._reaper = reaper.ImageReaper()
        # Outlives the jobs that hand it clones; started before recovery
        # resumes journalled flattens, stopped last.
        self._flattener = flattener.Flattener(conf)
        self._flattener.start()

    def create_snapshot(self, context, instance_uuid, image_id,
                        target_format=None, max_virtual_size=None,
                        sent_at=None):
        """Queue one snapshot; see rpcapi.SnapworkerAPI.create_snapshot.

        Never raises into the dispatcher: every outcome, a malformed
        request included, is a notification.
        """
        try:
            self._accept(context, instance_uuid, image_id, target_format,
                         max_virtual_size, sent_at)
        except Exception:
            LOG.exception('Snapshot request for image %r could not be '
                          'accepted', image_id)

    def _accept(self, context, instance_uuid, image_id, target_format,
                max_virtual_size, sent_at):
        if not (isinstance(image_id, str)
                and uuidutils.is_uuid_like(image_id)):
            # No image to claim or to report on: nothing else to do.
            LOG.error('Dropping snapshot request with malformed image id '
                      '%r (instance %r)', image_id, instance_uuid)
            return
        error = _request_error(instance_uuid, image_id, target_format,
                               max_virtual_size, sent_at)
        if error:
            LOG.error('Malformed snapshot request for image %s: %s',
                      image_id, error)
            # The job claims the image (to delete it) and fails at once.
            instance_uuid = target_format = max_virtual_size = None
        LOG.info('Snapshot of instance %s into image %s requested '
                 '(target format %s)', instance_uuid, image_id,
                 target_format or 'as source')
        job = self._make_job(context, instance_uuid, image_id, target_format,
                             max_virtual_size, error,
                             sent_at=None if error else sent_at)
        with self._lock:
            if self._stopping.is_set():
                job.fail_unstarted(exception.WorkerStopping(
                    instance_uuid=instance_uuid))
                return
            try:
                job.accept()
            except exception.SnapshotInProgress as e:
                # The image is the accepted job's: not even claimed.
                job.fail(e)
                return
            except exception.SnapshotError as e:
                job.fail_unstarted(e)
                return
            future = self._executor.submit(self._run, job)
            self._futures.add(future)
            self._queued.append(job)
        future.add_done_callback(self._forget)

    def get_status(self, context):
        """This worker's version and jobs; see rpcapi.get_status.

        Anyone may learn that the worker is alive and its version; the
        jobs (other projects' instances and images) only an admin.
        """
        with self._lock:
            status = {'version': RPC_API_VERSION, 'host': self._conf.host,
                      'running': len(self._running),
                      'queued': len(self._queued)}
            if _is_admin(context):
                status['jobs'] = (
                    [dict(j.describe(), state='running')
                     for j in self._running]
                    + [dict(j.describe(), state='queued')
                       for j in self._queued])
            return status

    def cancel_snapshot(self, context, image_id):
        """Stop one queued or running snapshot (admin only; RPC 1.1).

        The job ends as any failed one does (its resources released, the
        image it claimed deleted) with ``snapshot.create.error``
        ``Cancelled``; a running one stops at its next read or helper
        check, within a chunk or a second.

        :returns: ``{'cancelled': bool, 'state': 'queued' | 'running' |
            None, 'reason': ...}``.
        """
        if not _is_admin(context):
            return {'cancelled': False, 'state': None,
                    'reason': 'cancelling a snapshot needs the admin role'}
        with self._lock:
            for state, jobs in (('running', self._running),
                                ('queued', self._queued)):
                for job in jobs:
                    if job.image_id == image_id:
                        job.cancel(getattr(context, 'user_id', None))
                        LOG.info('Snapshot into image %s (%s) cancelled',
                                 image_id, state)
                        return {'cancelled': True, 'state': state,
                                'reason': None}
        return {'cancelled': False, 'state': None,
                'reason': f'no snapshot into image {image_id} on this host'}

    def plan_snapshot(self, context, instance_uuid, target_format=None,
                      max_virtual_size=None):
        """The plan a snapshot would use, touching nothing (RPC 1.2).

        The same checks as a snapshot, in the same order and from the
        same code (``pipeline.Planner``): a request another project's
        context makes for an instance, or one for a hostile disk, is
        refused as its snapshot would be. The disk is opened and inspected
        (files checked and pinned, headers read by ``qemu-img info`` under
        the helpers' limits) and closed again: no data is read, no image,
        scratch file or RBD snapshot is created, no notification is sent.

        :returns: ``pipeline.Decision.describe()`` plus ``host``, or, when
            a snapshot would be refused, ``{'host': ..., 'instance_uuid':
            ..., 'error_code': ..., 'error_message': ...}``.
        """
        answer = {'host': self._conf.host, 'instance_uuid': instance_uuid}
        error = _request_error(instance_uuid, None, target_format,
                               max_virtual_size)
        if error:
            return dict(answer, **_refusal(exception.InvalidRequest(
                reason=error)))
        planner = pipeline.Planner(
            self._conf, self._hypervisor, self._image_service_factory(context),
            context, instance_uuid, target_format, max_virtual_size,
            flattener=self._flattener)
        try:
            decision = planner.decide()
        except exception.SnapshotError as e:
            LOG.info('Plan for instance %s: refused (%s)', instance_uuid,
                     e.code)
            return dict(answer, **_refusal(e))
        try:
            return dict(answer, **decision.describe())
        finally:
            decision.source.close()

    def _forget(self, future):
        with self._lock:
            self._futures.discard(future)

    def _make_emitter(self, context, instance_uuid, image_id,
                      target_format):
        payload = objects.SnapshotPayload(
            request_id=getattr(context, 'request_id', None),
            instance_uuid=instance_uuid,
            image_id=image_id, host=self._conf.host,
            target_format=target_format)
        return notifications.SnapshotEmitter(
            self._notifier, context, payload,
            self._conf.worker.progress_interval)

    def _make_job(self, context, instance_uuid, image_id, target_format,
                  max_virtual_size=None, request_error=None, sent_at=None):
        record = self._journal.new_record(image_id, instance_uuid, context,
                                          self._conf.host)
        return pipeline.SnapshotJob(
            self._conf, self._hypervisor,
            self._image_service_factory(context),
            self._make_emitter(context, instance_uuid, image_id,
                               target_format),
            instance_uuid, image_id, target_format, record=record,
            context=context, max_virtual_size=max_virtual_size,
            request_error=request_error, reaper=self._reaper,
            sent_at=sent_at, flattener=self._flattener)

    # -- crash recovery -------------------------------------------------------

    def recover(self):
        """Clean up after the jobs a killed or crashed worker left.

        Called once at start, before the RPC server takes requests. Glance
        is asked as the user who requested each snapshot (the saved
        request context), with the service token added when
        ``[service_user]`` is configured: that is what lets Glance accept
        a user token that has expired since. See journal.Recovery.

        :returns: how many records are still left (retried at the next
            start), or None when the journal could not be read.
        """
        return journal.Recovery(
            self._journal, self._recovery_images,
            functools.partial(sources.remove_leftover, self._conf),
            self._resume_background, self._report_restarted,
            host=self._conf.host).run()

    def _recovery_images(self, context_dict):
        return self._image_service_factory(_load_context(context_dict))

    def _resume_background(self, record, entry, done):
        if entry['owner'] == sources_base.REAPER:
            # A failed job's image (deleted whatever its status), or one
            # recovery could not settle (kept if it turns out active).
            details = entry.get('details') or {}
            self._reaper.add(
                self._recovery_images(record.context), entry['ref'], done,
                keep_if_active=bool(details.get('keep_if_active')), now=True,
                claim_project=details.get('claim_project'))
            return
        sources.resume_background(
            self._flattener, entry['owner'], entry['kind'], entry['ref'],
            entry.get('details') or {}, done)

    def _report_restarted(self, record, outcome, image_status):
        """Tell waiters how an interrupted snapshot ended.

        An image Glance reports active holds the complete snapshot (an
        upload Glance accepted in full, or a registered clone): only the
        worker's bookkeeping was cut short, so it ends like any other
        successful snapshot rather than as an error that would make Nova
        delete a good image.
        """
        context = _load_context(record.context)
        emitter = self._make_emitter(context, record.instance_uuid,
                                     record.image_id, None)
        emitter.payload.image_status = image_status
        if image_status == 'active' and record.image_owned:
            LOG.info('Interrupted snapshot into image %s had completed: %s',
                     record.image_id, outcome)
            emitter.payload.plan_reason = f'recovered after a restart: ' \
                f'{outcome}'
            emitter.end()
            return
        error = exception.WorkerRestarted(
            instance_uuid=record.instance_uuid, image_id=record.image_id,
            started_at=record.data.get('started_at'), outcome=outcome)
        emitter.error(error.code, str(error))

    def _run(self, job):
        with self._lock:
            self._queued.remove(job)
            stopping = self._stopping.is_set()
            if not stopping:
                self._running.append(job)
        try:
            age = self._age(job)
            if stopping:
                job.fail_unstarted(exception.WorkerStopping(
                    instance_uuid=job.instance_uuid))
            elif job.cancelled is not None:
                job.fail_unstarted(job.cancelled)
            elif age is not None:
                # Nova gave up on it long ago and deleted (or will delete)
                # the image: fail it without touching the image.
                job.fail(exception.StaleRequest(
                    image_id=job.image_id, age=round(age, 1),
                    limit=self._conf.worker.max_request_age))
            else:
                job.run()
        except Exception:
            # A job ends itself; this only logs what escaped its ending,
            # which would otherwise vanish in the executor's future.
            LOG.exception('Snapshot into image %s ended abnormally',
                          job.image_id)
        finally:
            with self._lock:
                if job in self._running:
                    self._running.remove(job)

    def _age(self, job):
        """How old the request is if it is too old to run, else None."""
        limit = self._conf.worker.max_request_age
        sent_at = job.sent_at
        if not limit or sent_at is None:
            return None
        age = time.time() - sent_at
        return age if age > limit else None

    def stop(self):
        """Fail queued jobs, wait for running ones."""
        with self._lock:
            self._stopping.set()
        self._executor.shutdown(wait=True)
        for what, step in (('RBD flattener', self._flattener.stop),
                           ('image reaper', self._reaper.stop),
                           ('libvirt connection', self._hypervisor.close)):
            try:
                step()
            except Exception:
                LOG.exception('Stopping the %s failed', what)


def _refusal(error):
    return {'error_code': error.code, 'error_message': str(error)}


def _is_admin(context):
    return 'admin' in (getattr(context, 'roles', None) or [])


def _load_context(context_dict):
    """The RequestContext a journal record saved, as RPC would give it.

    Not made the thread's current context: recovery runs in the thread
    that goes on to start the service, whose log lines must not carry
    the request id of an old request.
    """
    ctx = o_context.RequestContext.from_dict(context_dict, overwrite=False)
    ctx.service_catalog = context_dict.get('service_catalog') or []
    return ctx
