"""Why a delegated snapshot failed, as Nova exceptions.

nova-compute records the exception of a failed ``snapshot()`` as the
instance fault, reverts the task state and deletes the image, so each
class says what an operator should look at.
"""

from nova import exception


class SnapshotOffloadFailed(exception.NovaException):
    msg_fmt = ('snapworker failed to snapshot instance %(instance_uuid)s '
               'into image %(image_id)s: %(reason)s')


class WorkerNotResponding(SnapshotOffloadFailed):
    msg_fmt = ('No snapworker on host %(host)s started the snapshot of '
               'instance %(instance_uuid)s into image %(image_id)s within '
               '%(timeout)s s: is snapworker-worker running there, with '
               'nova-compute\'s host name and messaging settings?')


class SnapshotTimedOut(SnapshotOffloadFailed):
    msg_fmt = ('The snapshot of instance %(instance_uuid)s into image '
               '%(image_id)s did not finish within %(timeout)s s.')
