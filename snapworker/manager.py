"""The RPC endpoint: admit snapshot requests and run them in order.

A cast is acknowledged before it is dispatched (oslo.messaging is
at-most-once), so the endpoint only validates what it can without I/O,
queues the job and returns; the job then owns the outcome and always ends
with either an active image or an error notification and a deleted image.
"""

import concurrent.futures
import threading

import oslo_messaging as messaging
from oslo_log import log as logging
from oslo_utils import uuidutils

from snapworker import exception
from snapworker import glance
from snapworker import hypervisor
from snapworker import notifications
from snapworker import objects
from snapworker import pipeline
from snapworker import sources

LOG = logging.getLogger(__name__)

#: Keep in sync with rpcapi.RPC_API_VERSION.
RPC_API_VERSION = '1.0'


class SnapshotManager:
    """Runs at most ``max_concurrent_snapshots`` snapshots at once.

    Requests beyond that wait in arrival order (the executor's FIFO queue).
    On stop, jobs that have not started are failed cleanly (image deleted,
    error notification), running ones are allowed to finish, and
    background work (RBD flattens) gets a bounded time to finish.
    """

    target = messaging.Target(version=RPC_API_VERSION)

    def __init__(self, conf, notifier, hypervisor_api=None,
                 image_service_factory=glance.ImageService):
        self._conf = conf
        self._notifier = notifier
        self._hypervisor = hypervisor_api or hypervisor.Hypervisor(
            conf.libvirt_uri)
        self._image_service_factory = image_service_factory
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=conf.worker.max_concurrent_snapshots,
            thread_name_prefix='snapshot')
        self._stopping = threading.Event()
        self._futures = set()
        self._lock = threading.Lock()

    def create_snapshot(self, context, instance_uuid, image_id,
                        target_format=None):
        """Queue one snapshot; see rpcapi.SnapworkerAPI.create_snapshot."""
        if not (uuidutils.is_uuid_like(instance_uuid)
                and uuidutils.is_uuid_like(image_id)):
            LOG.error('Dropping snapshot request with malformed ids '
                      '(instance %r, image %r)', instance_uuid, image_id)
            return
        LOG.info('Snapshot of instance %s into image %s requested '
                 '(target format %s)', instance_uuid, image_id,
                 target_format or 'as source')
        job = self._make_job(context, instance_uuid, image_id, target_format)
        with self._lock:
            if self._stopping.is_set():
                job.fail(exception.WorkerStopping(
                    instance_uuid=instance_uuid))
                return
            future = self._executor.submit(self._run, job)
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future):
        with self._lock:
            self._futures.discard(future)

    def _make_job(self, context, instance_uuid, image_id, target_format):
        payload = objects.SnapshotPayload(
            request_id=context.request_id, instance_uuid=instance_uuid,
            image_id=image_id, host=self._conf.host,
            target_format=target_format)
        emitter = notifications.SnapshotEmitter(
            self._notifier, context, payload,
            self._conf.worker.progress_interval)
        return pipeline.SnapshotJob(
            self._conf, self._hypervisor,
            self._image_service_factory(context), emitter,
            instance_uuid, image_id, target_format)

    def _run(self, job):
        if self._stopping.is_set():
            job.fail(exception.WorkerStopping(
                instance_uuid=job.instance_uuid))
            return
        job.run()

    def stop(self):
        """Fail queued jobs, wait for running ones."""
        with self._lock:
            self._stopping.set()
        self._executor.shutdown(wait=True)
        sources.stop_background_work()
        self._hypervisor.close()
