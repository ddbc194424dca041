"""Errors a snapshot can end with.

Each class is one cause an operator can act on; its name is the
``error_code`` of the ``snapshot.create.error`` notification and its message
the ``error_message``. Anything else that escapes a job is reported as
``InternalError`` with the exception text.
"""


class SnapshotError(Exception):
    """Base of the snapshot failures reported by code."""

    msg_fmt = 'Snapshot failed.'

    def __init__(self, message=None, **kwargs):
        self.kwargs = kwargs
        super().__init__(message or self.msg_fmt.format(**kwargs))

    @property
    def code(self):
        return type(self).__name__


class InstanceNotFound(SnapshotError):
    msg_fmt = 'Instance {instance_uuid} has no libvirt domain on this host.'


class InstanceNotShutOff(SnapshotError):
    msg_fmt = ('Instance {instance_uuid} is {state}, not shut off: its disk '
               'cannot be read in place while the guest may write to it.')


class SourceChanged(SnapshotError):
    msg_fmt = ('Instance {instance_uuid} left the shut-off state while its '
               'disk was being read ({state}); the image would not be a '
               'consistent point in time.')


class DiskNotFound(SnapshotError):
    msg_fmt = 'Instance {instance_uuid} has no root disk in its domain XML.'


class DiskOutsideInstancesPath(SnapshotError):
    msg_fmt = ('Disk file {path} resolves to {real_path}, outside the '
               'instances path {instances_path}: refusing to read it.')


class UnsupportedDisk(SnapshotError):
    msg_fmt = 'Disk {path} cannot be snapshotted: {reason}.'


class SourceReadError(SnapshotError):
    msg_fmt = 'Reading disk {path} failed: {reason}'


class RbdError(SnapshotError):
    msg_fmt = 'Ceph RBD {operation} of {target} failed: {reason}'


class UnsupportedTargetFormat(SnapshotError):
    msg_fmt = ('Target format {target_format} is not supported; use one of '
               '{supported}.')


class ImageNotFound(SnapshotError):
    msg_fmt = 'Glance image {image_id} does not exist.'


class ImageNotQueued(SnapshotError):
    msg_fmt = ('Glance image {image_id} is {status}; a snapshot can only '
               'fill a queued image.')


class GlanceError(SnapshotError):
    msg_fmt = 'Glance request failed for image {image_id}: {reason}'


class ImageNotActive(SnapshotError):
    msg_fmt = ('Glance image {image_id} ended {status} instead of active '
               'after its data was sent.')


class CommandFailed(SnapshotError):
    msg_fmt = '{command} failed (exit code {code}): {stderr}'


class WorkerStopping(SnapshotError):
    msg_fmt = ('The worker was stopped before the snapshot of instance '
               '{instance_uuid} started.')


class JournalError(SnapshotError):
    msg_fmt = ('Cannot record the snapshot into image {image_id} in the '
               'journal ({reason}); without it a crash could leave '
               'resources behind, so the snapshot is not attempted.')


class SnapshotInProgress(SnapshotError):
    msg_fmt = ('A snapshot into image {image_id} is already in progress on '
               'this host; the duplicate request is refused and the image '
               'left to it.')
    #: The image belongs to the snapshot already running: keep it.
    delete_image = False


class WorkerRestarted(SnapshotError):
    msg_fmt = ('The worker stopped abruptly (killed or crashed) during the '
               'snapshot of instance {instance_uuid} into image {image_id}, '
               'started {started_at}; on restart it {outcome}.')
