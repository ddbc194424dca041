"""Client side of the snapworker RPC API.

This is what nova-compute (through ``snapworker.nova``) and the operator CLI
import. The worker of a host reads that host's local disks, so every
request is addressed to one host's worker.

It is part of the light client with ``events`` and ``snapworker.nova``:
it imports nothing of the worker's configuration and reads no option
itself. The caller passes the transport, the topic and the version cap
from its own configuration (nova.conf or snapworker.conf), and registers
``[upgrade_levels] snapworker`` with ``register_opts`` when it wants it.
"""

import time

import oslo_messaging as messaging
from oslo_config import cfg

from snapworker import rpc

#: The highest version this client speaks; keep in sync with the manager's
#: ``RPC_API_VERSION`` (snapworker/manager.py).
RPC_API_VERSION = '1.2'

#: The default of both ``[worker] topic`` and nova.conf's
#: ``[snapworker] topic``.
DEFAULT_TOPIC = 'snapworker'

UPGRADE_LEVELS_GROUP = 'upgrade_levels'

opts = [
    cfg.StrOpt('snapworker',
               regex=r'^\d+\.\d+$',
               help='Highest snapworker RPC API version to send, such as '
                    '``1.0``. Set it to the version of the oldest '
                    'snapworker-worker still running while workers are '
                    'upgraded after their clients (nova-compute, the '
                    'snapworker CLI): newer arguments are then left out '
                    'and newer calls refused by the client, instead of '
                    'being rejected by an old worker that cannot answer '
                    'a cast. Unset: the newest version this client '
                    'knows.'),
]


def register_opts(conf):
    """Register ``[upgrade_levels] snapworker`` on ``conf``.

    By group name, so that it joins the ``[upgrade_levels]`` group Nova
    already has in nova-compute.
    """
    conf.register_opts(opts, group=UPGRADE_LEVELS_GROUP)


def list_opts():
    return [(UPGRADE_LEVELS_GROUP, opts)]


class VersionCapError(messaging.RPCVersionCapError):
    """A method or argument needs a version the cap forbids.

    Raised by the client before anything is sent: the worker this cap
    describes could not answer it.
    """

    def __init__(self, method, version, version_cap):
        messaging.MessagingException.__init__(
            self, f'{method} needs snapworker RPC API {version}, but '
                  f'[upgrade_levels] snapworker caps this client at '
                  f'{version_cap}: the workers are too old for it; raise '
                  f'the cap once every worker is upgraded.')
        self.method = method
        self.version = version
        self.version_cap = version_cap


class SnapworkerAPI:
    """Client side of the snapworker RPC API.

    API version history:

    | 1.0 - Initial version: create_snapshot (cast).
    | 1.1 - create_snapshot takes max_virtual_size and sent_at; added
    |       get_status (call) and cancel_snapshot (call).
    | 1.2 - Added plan_snapshot (call).

    Adding a method or an optional argument is a minor bump: the client
    checks ``can_send_version()`` before sending the new form, so a newer
    nova-compute keeps working with an older worker during an upgrade as
    long as ``[upgrade_levels] snapworker`` caps it at that worker's
    version.

    :param transport: the RPC transport to send on (nova-compute's own,
        or one made from snapworker.conf by the CLI).
    :param topic: the workers' topic (``[worker] topic``).
    :param version_cap: the highest version to send, usually
        ``conf.upgrade_levels.snapworker``; None for ``RPC_API_VERSION``.
    """

    def __init__(self, transport, topic=DEFAULT_TOPIC, version_cap=None):
        self.topic = topic
        target = messaging.Target(topic=self.topic,
                                  version=RPC_API_VERSION)
        self.client = messaging.get_rpc_client(
            transport, target, version_cap=version_cap,
            serializer=rpc.RequestContextSerializer())

    def _prepare_call(self, host, version, timeout=None):
        """Address one host's worker with the version the call needs."""
        kwargs = {} if timeout is None else {'timeout': timeout}
        return self.client.prepare(server=host, version=version, **kwargs)

    def create_snapshot(self, context, host, instance_uuid, image_id,
                        target_format=None, max_virtual_size=None):
        """Snapshot a shut-off instance's root disk into a Glance image.

        Asynchronous (a cast): the outcome arrives as notifications about
        ``image_id`` (``snapshot.create.start``, ``.source_released``,
        ``.progress``, ``.create.end`` or ``.create.error``), and the image
        ends either ``active`` or deleted.

        :param context: request context of the user who asked for the
            snapshot; the worker talks to Glance with its token.
        :param host: the compute host whose worker reads the disk.
        :param instance_uuid: instance whose root disk is snapshotted. The
            worker finds the disk in the instance's libvirt domain; it
            trusts no disk path from the message.
        :param image_id: an existing Glance image in ``queued`` state, to be
            filled with the snapshot (Nova's API creates it).
        :param target_format: ``raw`` or ``qcow2``; None keeps the source
            disk's format.
        :param max_virtual_size: (1.1) the largest root disk, in bytes,
            that Nova gave the instance (its flavor's ``root_gb``), or
            None when Nova sets no bound.
        :param sent_at: (1.1) when the request leaves the client (epoch
            seconds; the client and the worker share the host's clock),
            set here: a worker that reaches it after ``[worker]
            max_request_age`` refuses it as stale, since its sender has
            given up on it.

        Sent as a 1.1 request when the version cap allows it; capped at
        1.0 the request is a 1.0 one and the worker checks neither.
        """
        kwargs = {'instance_uuid': instance_uuid, 'image_id': image_id,
                  'target_format': target_format}
        version = '1.0'
        if self.client.can_send_version('1.1'):
            version = '1.1'
            kwargs['max_virtual_size'] = max_virtual_size
            kwargs['sent_at'] = time.time()
        cctxt = self._prepare_call(host, version)
        cctxt.cast(context, 'create_snapshot', **kwargs)

    def get_status(self, context, host, timeout=None):
        """What one host's worker is doing (1.1).

        Synchronous (a call): it answers only if the worker runs, so it
        also tells whether a worker listens for ``host`` at all.

        :param context: request context.
        :param host: the compute host whose worker is asked.
        :param timeout: seconds to wait for the answer; None for the
            transport's ``rpc_response_timeout``.
        :returns: a dict such as ``{'version': '1.1', 'host': 'compute-1',
            'running': 1, 'queued': 0, 'jobs': [{'image_id': ...,
            'instance_uuid': ..., 'state': 'running', 'strategy':
            'stream', 'bytes_read': ..., 'bytes_uploaded': ...,
            'bytes_total': ..., 'seconds': ...}]}``: the worker's RPC API
            version, its host, how many snapshots it runs and holds in
            its queue, and (``jobs``, for an admin's context only) which.
        :raises VersionCapError: ``[upgrade_levels] snapworker`` is below
            1.1 (nothing is sent).
        :raises oslo_messaging.MessagingTimeout: no worker answered in
            time.
        """
        self._require('get_status', '1.1')
        cctxt = self._prepare_call(host, '1.1', timeout=timeout)
        return cctxt.call(context, 'get_status')

    def _require(self, method, version):
        """:raises VersionCapError: the cap forbids ``version``."""
        if not self.client.can_send_version(version):
            raise VersionCapError(method, version, self.client.version_cap)

    def plan_snapshot(self, context, host, instance_uuid,
                      target_format=None, max_virtual_size=None,
                      timeout=None):
        """Which plan a snapshot of the instance would use, and why (1.2).

        Synchronous (a call); touches nothing: the worker runs a
        snapshot's checks (instance shut off and the context's project's
        unless an admin's, disk checked and inspected, size limits,
        target format) and asks the disk's source for its plan, but reads
        no data, creates no image, scratch file or RBD snapshot and sends
        no notification.

        :param context: request context; the same authorization as
            ``create_snapshot``.
        :param host: the compute host whose worker reads the disk.
        :param instance_uuid: the instance whose root disk would be read.
        :param target_format: ``raw``, ``qcow2`` or None (as the source).
        :param max_virtual_size: as for ``create_snapshot``.
        :param timeout: seconds to wait for the answer.
        :returns: a dict such as ``{'host': 'compute-1', 'instance_uuid':
            ..., 'strategy': 'stream', 'reason': 'qcow2 overlay: ...',
            'source_kind': 'file', 'source_format': 'qcow2',
            'target_format': 'qcow2', 'virtual_size': 1073741824,
            'store': None, 'instance_owner': '<project id>',
            'base_image_ref': '<image id>' or None, 'managed_save':
            False}``, or, when a snapshot would be refused, ``{'host':
            ..., 'instance_uuid': ..., 'error_code': 'InstanceNotOwned',
            'error_message': ...}``.
        :raises VersionCapError: the cap is below 1.2 (nothing is sent).
        :raises oslo_messaging.MessagingTimeout: no worker answered.
        """
        self._require('plan_snapshot', '1.2')
        cctxt = self._prepare_call(host, '1.2', timeout=timeout)
        return cctxt.call(context, 'plan_snapshot',
                          instance_uuid=instance_uuid,
                          target_format=target_format,
                          max_virtual_size=max_virtual_size)

    def cancel_snapshot(self, context, host, image_id, timeout=None):
        """Stop the queued or running snapshot into ``image_id`` (1.1).

        Synchronous (a call). An admin's context only. The snapshot then
        ends as a failed one (its resources released, its image deleted)
        with ``snapshot.create.error`` ``Cancelled``.

        :returns: ``{'cancelled': bool, 'state': 'queued' | 'running' |
            None, 'reason': str | None}``.
        :raises VersionCapError: the cap is below 1.1 (nothing is sent).
        :raises oslo_messaging.MessagingTimeout: no worker answered.
        """
        self._require('cancel_snapshot', '1.1')
        cctxt = self._prepare_call(host, '1.1', timeout=timeout)
        return cctxt.call(context, 'cancel_snapshot', image_id=image_id)
