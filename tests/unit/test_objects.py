"""Every versioned object's fields are pinned to its VERSION.

A consumer decodes a payload by its version, so changing an object's
fields without bumping ``VERSION`` (and this table) breaks consumers
silently. The fingerprint is a hash of the fields and remotable methods,
as in Nova's nova/tests/unit/objects/test_objects.py; when it changes on
purpose, bump the object's VERSION, note the change in its history
comment, and put the new hash here.
"""

import testtools
from oslo_versionedobjects import base as ovo_base
from oslo_versionedobjects import fixture

from snapworker import objects

object_data = {
    'SnapshotPayload': '1.3-7e670483c36e69bff66ef26698385c59',
}


def snapworker_objects():
    """The registered classes of snapworker's namespace (not Nova's...)."""
    return {name: classes for name, classes
            in ovo_base.VersionedObjectRegistry.obj_classes().items()
            if issubclass(classes[0], objects.SnapworkerObject)}


class ObjectVersionTest(testtools.TestCase):

    def test_versions(self):
        checker = fixture.ObjectVersionChecker(snapworker_objects())

        expected, actual = checker.test_hashes(object_data)

        self.assertEqual(expected, actual,
                         'Some objects changed; bump their VERSION and '
                         'update the hashes here.')

    def test_every_object_is_pinned(self):
        self.assertEqual(set(object_data), set(snapworker_objects()))

    def test_a_field_change_without_a_bump_is_caught(self):
        class Changed(objects.SnapshotPayload):
            fields = dict(objects.SnapshotPayload.fields,
                          extra=objects.fields.StringField(nullable=True))

        checker = fixture.ObjectVersionChecker(
            {'SnapshotPayload': [Changed]})

        expected, actual = checker.test_hashes(object_data)

        self.assertNotEqual(expected, actual)
