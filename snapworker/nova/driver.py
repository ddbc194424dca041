"""Nova's libvirt driver, with cold snapshots taken by snapworker.

Only ``snapshot()`` changes, and only for cold snapshots: Nova's own cold
path copies the whole disk into ``[libvirt] snapshots_directory`` before it
uploads the copy; the worker of this host streams or clones it instead.
Everything Nova promises around a snapshot is kept:

* the same guest handling: a running or paused guest is suspended with
  Nova's ``_suspend_guest_for_snapshot`` and resumed with
  ``_resume_guest_after_snapshot`` - as soon as the worker says the disk
  is no longer needed (``snapshot.source_released``), and in any case
  before ``snapshot()`` returns or raises;
* the same task states: ``image_pending_upload``, then ``image_uploading``
  once the worker has started, which is where Nova's compute manager
  expects a successful snapshot to leave them;
* the same image metadata (``_create_snapshot_metadata``), and the same
  failure contract: ``snapshot()`` returns only when the image is active
  and raises otherwise, so the manager records the fault and deletes the
  image. A worker that is missing or stuck fails the snapshot within
  ``[snapworker] accept_timeout`` or a run timeout scaled to the disk size.

Live snapshots, and disk types not in ``[snapworker] disk_types``, take
Nova's path unchanged. The delegated path needs nothing of Nova's image
backend (``image_backend.by_libvirt_path``): the worker finds and reads
the disk itself from the domain XML, so an RBD or LVM disk is delegated
whatever ``[libvirt] images_type`` says (see ``disks.py`` for the types
and the plan each gets).
"""

import nova.conf
import oslo_messaging as messaging
from nova import exception
from nova import rpc as nova_rpc
from nova.compute import power_state
from nova.compute import task_states
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt import host as libvirt_host
from nova.virt.libvirt import utils as libvirt_utils
from oslo_log import log as logging
from oslo_utils import units

from snapworker import events
from snapworker import rpcapi
from snapworker.nova import conf as snapworker_conf
from snapworker.nova import disks
from snapworker.nova import exception as snapworker_exception
from snapworker.nova import waiter

LOG = logging.getLogger(__name__)

CONF = nova.conf.CONF
# The only options this driver adds to nova-compute; none of the worker's
# (snapworker.conf is the worker's, and nothing here imports it).
snapworker_conf.register_opts(CONF)

_GIB = units.Gi


class SnapworkerLibvirtDriver(libvirt_driver.LibvirtDriver):
    """``compute_driver = snapworker.SnapworkerLibvirtDriver``."""

    _snapworker_api = None

    def snapshot(self, context, instance, image_id, update_task_state):
        try:
            guest = self._host.get_guest(instance)
        except exception.InstanceNotFound as e:
            raise exception.InstanceNotRunning(
                instance_id=instance.uuid) from e

        disk_path, source_format = libvirt_utils.find_disk(guest)
        source_type = (libvirt_utils.get_disk_type_from_path(disk_path)
                       or source_format)
        original_power_state = guest.get_power_state(self._host)
        if (source_type not in CONF.snapworker.disk_types or
                self._is_live_snapshot(source_type, original_power_state)):
            return super().snapshot(context, instance, image_id,
                                    update_task_state)
        self._delegate_snapshot(context, instance, image_id,
                                update_task_state, guest, source_type,
                                original_power_state)

    def _is_live_snapshot(self, source_type, current_power_state):
        """Nova's own choice between a live and a cold snapshot.

        ``LibvirtDriver.snapshot()`` decides inline, with no method to
        call, so its condition is repeated here verbatim.
        """
        return (
            self._host.has_min_version(
                hv_type=libvirt_host.HV_DRIVER_QEMU) and
            source_type != 'lvm' and
            not CONF.ephemeral_storage_encryption.enabled and
            not CONF.workarounds.disable_libvirt_livesnapshot and
            current_power_state != power_state.SHUTDOWN
        )

    def _delegate_snapshot(self, context, instance, image_id,
                           update_task_state, guest, source_type,
                           original_power_state):
        image_format = disks.image_format(
            source_type, CONF.libvirt.snapshot_image_format)
        self._set_snapshot_metadata(context, instance, image_id,
                                    image_format)

        resumed = []

        def resume():
            if not resumed:
                resumed.append(True)
                self._resume_guest_after_snapshot(
                    context, False, original_power_state, instance, guest)

        LOG.info('Beginning cold snapshot process, delegated to snapworker',
                 instance=instance)
        # Before the guest is touched: no worker, no suspend; and the
        # subscription is made while the guest still runs, so setting it
        # up does not count towards the time it is held down.
        self._check_worker(context, instance, image_id)
        with events.Subscription(CONF, image_id=image_id) as sub:
            self._suspend_guest_for_snapshot(
                context, False, original_power_state, instance)
            try:
                update_task_state(
                    task_state=task_states.IMAGE_PENDING_UPLOAD)
                self._snapworker().create_snapshot(
                    context, CONF.host, instance.uuid, image_id,
                    target_format=image_format,
                    max_virtual_size=self._max_virtual_size(instance))
                waiter.SnapshotWaiter(
                    sub, lambda: self._image_status(context, image_id),
                    CONF.snapworker,
                    ids={'instance_uuid': instance.uuid,
                         'image_id': image_id, 'host': CONF.host},
                    default_size=instance.root_gb * _GIB,
                ).wait(
                    on_started=lambda: update_task_state(
                        task_state=task_states.IMAGE_UPLOADING,
                        expected_state=task_states.IMAGE_PENDING_UPLOAD),
                    on_released=resume)
            finally:
                resume()
        LOG.info('Snapshot image upload complete', instance=instance)

    def _check_worker(self, context, instance, image_id):
        """Fail at once (WorkerNotResponding) when no worker answers.

        A ``get_status`` call (RPC 1.1) answers in milliseconds when the
        host's worker runs; without it the cast would be dropped or wait
        in a queue, and only ``accept_timeout`` would tell. Skipped when
        ``[snapworker] liveness_timeout`` is 0 or the version cap forbids
        1.1 (an older worker: then accept_timeout decides).
        """
        timeout = CONF.snapworker.liveness_timeout
        if not timeout:
            return
        try:
            self._snapworker().get_status(context, CONF.host,
                                          timeout=timeout)
        except rpcapi.VersionCapError:
            return
        except messaging.MessagingTimeout as e:
            raise snapworker_exception.WorkerNotResponding(
                host=CONF.host, instance_uuid=instance.uuid,
                image_id=image_id, timeout=timeout) from e

    @staticmethod
    def _max_virtual_size(instance):
        """The largest root disk Nova gave the instance, in bytes.

        The flavor's ``root_gb``; 0 means the disk is as large as the
        image it booted from, which sets no bound (None).
        """
        return instance.root_gb * _GIB if instance.root_gb > 0 else None

    def _set_snapshot_metadata(self, context, instance, image_id,
                               image_format):
        """Give the queued image the metadata Nova's snapshot gives it.

        Set before the worker fills the image: Glance accepts format
        changes only while an image is queued. ``status`` is left to
        Glance, which activates the image when the data is in.
        """
        image = self._image_api.get(context, image_id)
        metadata = self._create_snapshot_metadata(
            instance.image_meta, instance, image_format, image['name'])
        del metadata['status']
        self._image_api.update(context, image_id, metadata,
                               purge_props=False)

    def _image_status(self, context, image_id):
        try:
            return self._image_api.get(context, image_id)['status']
        except exception.ImageNotFound:
            return 'deleted'

    def _snapworker(self):
        """The RPC client, on nova-compute's own transport.

        Created on first use: the driver is loaded before any snapshot,
        and a compute host that never snapshots needs no client.
        """
        if self._snapworker_api is None:
            self._snapworker_api = rpcapi.SnapworkerAPI(
                nova_rpc.TRANSPORT, topic=CONF.snapworker.topic,
                version_cap=CONF.upgrade_levels.snapworker)
        return self._snapworker_api
