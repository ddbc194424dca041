"""Errors a snapshot can end with.

Each class is one cause an operator can act on; its name is the
``error_code`` of the ``snapshot.create.error`` notification and its message
the ``error_message``. Anything else that escapes a job is reported as
``InternalError`` with the exception text.
"""


class SnapshotError(Exception):
    """Base of the snapshot failures reported by code."""

    msg_fmt = 'Snapshot failed.'
    #: A refusal concerns an image that is not this request's to fill
    #: (gone, another project's, already filled or being filled): it is
    #: reported as ``snapshot.create.refused``, not as the failure of
    #: whoever is filling that image, and the image is never touched.
    refusal = False

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
    msg_fmt = ('The source disk changed while it was being read ({what}); '
               'the image would not be a consistent point in time.')


class DiskNotFound(SnapshotError):
    msg_fmt = 'Instance {instance_uuid} has no root disk in its domain XML.'


class DiskOutsideInstancesPath(SnapshotError):
    msg_fmt = ('Disk file {path} resolves to {real_path}, outside the '
               'instances path {instances_path}: refusing to read it.')


class UnsupportedDisk(SnapshotError):
    msg_fmt = 'Disk {path} cannot be snapshotted: {reason}.'


class DiskTooLarge(SnapshotError):
    msg_fmt = ('Disk {path} claims a virtual size of {virtual_size} bytes, '
               'over the limit of {limit} bytes ({why}); nothing was read.')


class InstanceNotOwned(SnapshotError):
    msg_fmt = ('Instance {instance_uuid} belongs to project {owner}, not to '
               'the requesting project {project_id}; only an admin may '
               'snapshot another project\'s instance.')


class ImageNotOwned(SnapshotError):
    msg_fmt = ('Glance image {image_id} belongs to project {owner}, not to '
               'the requesting project {project_id}; it was left untouched.')
    refusal = True


class InvalidRequest(SnapshotError):
    msg_fmt = 'Malformed snapshot request: {reason}.'


class HelperTimedOut(SnapshotError):
    msg_fmt = ('{helper} made no progress for {seconds} s and was stopped: '
               'a disk that cannot be read in bounded time is refused.')


class SourceReadError(SnapshotError):
    msg_fmt = 'Reading disk {path} failed: {reason}'


class RbdError(SnapshotError):
    msg_fmt = 'Ceph RBD {operation} of {target} failed: {reason}'


class UnsupportedTargetFormat(SnapshotError):
    msg_fmt = ('Target format {target_format} is not supported; use one of '
               '{supported}.')


class ImageNotFound(SnapshotError):
    msg_fmt = ('Glance image {image_id} does not exist, or the requesting '
               'project cannot see it.')
    refusal = True


class ImageNotQueued(SnapshotError):
    msg_fmt = ('Glance image {image_id} is {status}; a snapshot can only '
               'fill a queued image, so it was left untouched.')
    refusal = True


class GlanceError(SnapshotError):
    msg_fmt = 'Glance request failed for image {image_id}: {reason}'


class GlanceUnavailable(GlanceError):
    msg_fmt = ('Glance did not answer for image {image_id}: {reason}')


class ImageDataRejected(SnapshotError):
    msg_fmt = ('Glance refused the data of image {image_id} as '
               '{disk_format} ({reason}): its format inspection found data '
               'that looks like another format, as raw disk bytes written '
               'to look like a qcow2 header do.')


class ImageDataMismatch(SnapshotError):
    msg_fmt = ('Glance image {image_id} does not hold what the worker sent '
               '({what}): the data changed between the disk and the '
               'store, so the image is not published.')


class ImageNotActive(SnapshotError):
    msg_fmt = ('Glance image {image_id} ended {status} instead of active '
               'after its data was sent.')


class CommandFailed(SnapshotError):
    msg_fmt = '{command} failed (exit code {code}): {stderr}'


class WorkerStopping(SnapshotError):
    msg_fmt = ('The worker was stopped before the snapshot of instance '
               '{instance_uuid} started.')


class Cancelled(SnapshotError):
    msg_fmt = 'The snapshot into image {image_id} was cancelled by {by}.'


class StaleRequest(SnapshotError):
    msg_fmt = ('The request for image {image_id} was sent {age} s ago, more '
               'than [worker] max_request_age ({limit} s): whoever sent it '
               'has given up, so it is not run and the image not touched.')


class JournalError(SnapshotError):
    msg_fmt = ('Cannot record the snapshot into image {image_id} in the '
               'journal ({reason}); without it a crash could leave '
               'resources behind, so the snapshot is not attempted.')


class SnapshotInProgress(SnapshotError):
    msg_fmt = ('A snapshot into image {image_id} is already accepted or in '
               'progress on this host; the duplicate request is refused '
               'and the image left to it.')
    refusal = True


class WorkerRestarted(SnapshotError):
    msg_fmt = ('The worker stopped abruptly (killed or crashed) during the '
               'snapshot of instance {instance_uuid} into image {image_id}, '
               'started {started_at}; on restart it {outcome}.')
