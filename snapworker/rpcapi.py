"""Client side of the snapworker RPC API.

This is what nova-compute (through ``snapworker.nova``) and the operator CLI
import. The worker of a host reads that host's local disks, so every
request is addressed to one host's worker.
"""

import oslo_messaging as messaging

from snapworker import rpc
from snapworker.conf import CONF

#: The highest version the manager of this release answers.
RPC_API_VERSION = '1.0'


class SnapworkerAPI:
    """Client side of the snapworker RPC API.

    API version history:

    | 1.0 - Initial version: create_snapshot (cast).

    Adding a method or an optional argument is a minor bump: the client
    checks ``can_send_version()`` before sending the new form, so a newer
    nova-compute keeps working with an older worker during an upgrade.
    """

    def __init__(self, topic=None, transport=None):
        self.topic = topic or CONF.worker.topic
        target = messaging.Target(topic=self.topic,
                                  version=RPC_API_VERSION)
        self.client = messaging.get_rpc_client(
            transport or rpc.get_transport(), target,
            serializer=rpc.RequestContextSerializer())

    def _prepare_call(self, host, version='1.0'):
        """Address one host's worker with the version the call needs."""
        return self.client.prepare(server=host, version=version)

    def create_snapshot(self, context, host, instance_uuid, image_id,
                        target_format=None):
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
        """
        cctxt = self._prepare_call(host)
        cctxt.cast(context, 'create_snapshot',
                   instance_uuid=instance_uuid, image_id=image_id,
                   target_format=target_format)
