"""The CLI's pieces that need no services: image metadata, usage."""

import io
from unittest import mock

import testtools
from oslo_context import context as o_context

from snapworker.cmd import cli

INSTANCE = '68479f7b-15a9-4508-a9a3-87aaac50e352'


class SnapshotImageFieldsTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.context = o_context.RequestContext(
            user_id='u1', project_id='p1', roles=['member'])

    def test_owner_snapshot_is_private_and_named_as_nova_names_it(self):
        fields = cli.snapshot_image_fields(
            'nightly', INSTANCE, self.context,
            {'instance_owner': 'p1', 'base_image_ref': 'base-1'},
            {'os_distro': 'debian'})
        self.assertEqual({
            'name': 'nightly', 'visibility': 'private',
            'image_type': 'snapshot', 'instance_uuid': INSTANCE,
            'user_id': 'u1', 'owner_id': 'p1', 'base_image_ref': 'base-1',
            'image_location': 'snapshot', 'image_state': 'available',
            'os_distro': 'debian'}, fields)

    def test_admin_snapshot_of_another_project_is_shared(self):
        plan = {'instance_owner': 'p2'}
        fields = cli.snapshot_image_fields('n', INSTANCE, self.context,
                                           plan, {})
        self.assertEqual(('shared', 'p2'),
                         (fields['visibility'], fields['owner_id']))
        # Shared with the instance's project as a member; Nova does not
        # store instance_owner as a property.
        self.assertEqual('p2', cli.instance_member(self.context, plan))
        self.assertNotIn('instance_owner', fields)
        self.assertNotIn('base_image_ref', fields)
        self.assertIsNone(cli.instance_member(self.context,
                                              {'instance_owner': 'p1'}))

    def test_an_old_worker_gives_no_plan(self):
        fields = cli.snapshot_image_fields('n', INSTANCE, self.context, {},
                                           {})
        self.assertEqual(('private', 'p1'),
                         (fields['visibility'], fields['owner_id']))

    def test_inherited_properties_leave_out_what_nova_does_not_copy(self):
        images = mock.Mock()
        images.get.return_value = {
            'id': 'base-1', 'name': 'debian', 'status': 'active',
            'checksum': 'x', 'os_hash_value': 'y', 'disk_format': 'qcow2',
            'os_distro': 'debian', 'hw_disk_bus': 'virtio',
            'img_signature': 'sig', 'os_glance_importing_to_stores': '',
            'image_type': 'snapshot', 'instance_uuid': 'older'}
        self.assertEqual({'os_distro': 'debian', 'hw_disk_bus': 'virtio'},
                         cli._inherited_properties(images, 'base-1'))
        self.assertEqual({}, cli._inherited_properties(images, None))


class UsageTest(testtools.TestCase):

    def test_usage_errors_exit_64_not_2_which_means_timeout(self):
        with mock.patch('sys.stderr', new_callable=io.StringIO) as err:
            e = self.assertRaises(SystemExit, cli.main,
                                  ['snapshot', '--no-such-option'])
        self.assertEqual(cli.EXIT_USAGE, e.code)
        self.assertIn('usage: snapworker', err.getvalue())

    def test_exit_statuses_are_documented(self):
        for status in (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_TIMEOUT,
                       cli.EXIT_NO_WORKER, cli.EXIT_CREDENTIALS,
                       cli.EXIT_VERSION_CAP, cli.EXIT_USAGE,
                       cli.EXIT_INTERRUPTED):
            self.assertRegex(cli.__doc__, rf'\n    {status} +\w')
