"""Versioned objects that leave the worker: notification payloads.

Consumers (Nova's waiting driver, operators' tooling) receive these as
oslo.versionedobjects primitives::

    {"snapworker_object.name": "SnapshotPayload",
     "snapworker_object.namespace": "snapworker",
     "snapworker_object.version": "1.0",
     "snapworker_object.data": {"image_id": "...", "strategy": "stream", ...}}

Bump ``VERSION`` on every change: a minor version for an added field (old
consumers ignore it), a major one for a removed or retyped field.
"""

from oslo_versionedobjects import base
from oslo_versionedobjects import fields


class SnapworkerObject(base.VersionedObject):
    OBJ_PROJECT_NAMESPACE = 'snapworker'
    OBJ_SERIAL_NAMESPACE = 'snapworker_object'


@base.VersionedObjectRegistry.register
class SnapshotPayload(SnapworkerObject):
    """What one snapshot did, as it stands at the moment of the event.

    Every event of a snapshot (start, progress, source_released, end,
    error) carries the same payload so that a consumer can follow one
    snapshot by ``image_id`` (unique per snapshot) without keeping state.
    """

    # Version 1.0: Initial version
    # Version 1.1: Added flatten_policy, location_api, image_hashed (RBD
    #              clones)
    # Version 1.2: instance_uuid nullable (a malformed request's);
    #              image_status is what Glance last reported;
    #              data_verified, shared_bytes, store
    # Version 1.3: Added bytes_written; strategy 'direct'
    VERSION = '1.3'

    fields = {
        'request_id': fields.StringField(nullable=True),
        # None only for a request whose instance_uuid was malformed.
        'instance_uuid': fields.UUIDField(nullable=True),
        'image_id': fields.UUIDField(),
        'host': fields.StringField(),
        # 'clone', 'direct', 'stream' or 'convert'; None until a plan is
        # chosen.
        'strategy': fields.StringField(nullable=True),
        # Why this plan, in words, e.g. "qcow2 without backing file,
        # target qcow2: the file itself is the image".
        'plan_reason': fields.StringField(nullable=True),
        # 'file', 'block' or 'rbd'.
        'source_kind': fields.StringField(nullable=True),
        'source_format': fields.StringField(nullable=True),
        'virtual_size': fields.IntegerField(nullable=True),
        'target_format': fields.StringField(nullable=True),
        # The Glance store the data was uploaded into (None: Glance's
        # default store; see [glance] snapshot_store).
        'store': fields.StringField(nullable=True),
        'bytes_read': fields.IntegerField(default=0),
        'bytes_uploaded': fields.IntegerField(default=0),
        # Total size of the upload when known in advance (streams know it).
        'bytes_total': fields.IntegerField(nullable=True),
        # Direct writes only: bytes the worker wrote into the store itself
        # (the disk's data; zeros are not written, the image stays thin).
        'bytes_written': fields.IntegerField(nullable=True),
        'scratch_bytes': fields.IntegerField(default=0),
        # Bytes of a reflink copy shared with the disk (no space used
        # until the resumed guest rewrites them); None without a copy.
        'shared_bytes': fields.IntegerField(nullable=True),
        'source_held_seconds': fields.FloatField(nullable=True),
        'duration_seconds': fields.FloatField(nullable=True),
        'image_status': fields.StringField(nullable=True),
        # Clone plans only: when the clone stops depending on the instance
        # disk ('background', 'sync' or 'never', after the clone depth
        # bound is applied), and which Glance API registered the location
        # ('v2.17' or 'patch').
        'flatten_policy': fields.StringField(nullable=True),
        'location_api': fields.StringField(nullable=True),
        # Whether the active image has checksum/os_hash_value. A clone is
        # registered without validation data (hashing would read the very
        # data the clone avoids reading), so it is False unless Glance
        # hashed the image itself before the end event.
        'image_hashed': fields.BooleanField(nullable=True),
        # Whether the active image's checksum (and os_hash_value, when
        # Glance hashes with [glance] hash_algorithm) equals what the
        # worker hashed while sending; None when no byte was sent (a
        # clone) or [worker] verify_upload is off.
        'data_verified': fields.BooleanField(nullable=True),
        'error_code': fields.StringField(nullable=True),
        'error_message': fields.StringField(nullable=True),
    }

    def __init__(self, **kwargs):
        """Every field is set, so every event carries the full payload."""
        super().__init__(**kwargs)
        for name, field in self.fields.items():
            if self.obj_attr_is_set(name):
                continue
            if field.default != fields.UnspecifiedDefault:
                self.obj_set_defaults(name)
            else:
                setattr(self, name, None)
