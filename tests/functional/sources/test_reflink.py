"""A suspended guest is released after an instant reflink copy.

The classes' instances path is a loop-mounted XFS made with reflink=1
(the root filesystem here is ext4, which cannot share extents). A guest
that Nova suspended for the snapshot (a managed save) waits for its disk;
the worker clones the top of its chain, releases it, and streams the
clone, or writes it directly into Glance's RBD pool when that is
configured. Beside it, the same disk on ext4 takes the convert plan.
"""

import os
import subprocess

from oslo_utils import units

from snapworker import events
from snapworker.conf import CONF
from tests.functional import base
from tests.functional.sources import test_direct

MiB = units.Mi


class XfsInstancesMixin:
    """Instances on a loop-mounted XFS with reflink=1; suspended guests."""

    @classmethod
    def prepare_instances_path(cls, path):
        cls.xfs_image = os.path.join(cls.workdir, 'xfs.img')
        with open(cls.xfs_image, 'wb') as f:
            f.truncate(1024 * MiB)
        subprocess.run(['mkfs.xfs', '-q', '-m', 'reflink=1', cls.xfs_image],
                       check=True)
        subprocess.run(['mount', '-o', 'loop', cls.xfs_image, path],
                       check=True)

    @classmethod
    def release_instances_path(cls, path):
        subprocess.run(['umount', '-l', path], check=False)

    def _suspended(self, disk):
        """The disk's content now, and a guest Nova suspended on it.

        :returns: the raw content's path, the instance, its domain and
            a queued image for its snapshot.
        """
        expected = os.path.join(self.workdir,
                                f'expected-{os.path.basename(disk)}.raw')
        base.qemu_img('convert', '-f', 'qcow2', '-O', 'raw', disk, expected)
        instance, dom = self.define_domain(path=disk, running=True)
        # What Nova's _suspend_guest_for_snapshot leaves: a managed save.
        dom.managedSave(0)
        return expected, instance, dom, self.create_image()

    def assertNoReflinkCopyLeft(self):
        self.assertEqual([], [n for n in os.listdir(os.path.join(
            self.instances_path, '.snapworker')) if n.startswith('reflink-')])


class ReflinkReleaseTest(XfsInstancesMixin, base.FunctionalTestCase):

    def test_guest_released_after_a_reflink_copy(self):
        base_file = self.make_disk('_base/reflink', 'raw', size='256M',
                                   writes=('write -P 0x21 0 96M',))
        disk = self.make_disk('suspended', 'qcow2', size='256M',
                              backing=base_file,
                              writes=('write -P 0x22 64M 96M',))
        expected, instance, _dom, image_id = self._suspended(disk)
        events = self.snapshot(instance, image_id, 'raw')
        released = [e for e in events
                    if e.event_type == 'snapshot.source_released'][0]
        end = events[-1].payload
        self.assertEqual('snapshot.create.end', events[-1].event_type, end)
        self.assertEqual('stream', end['strategy'])
        self.assertIn('reflink', end['plan_reason'])
        self.assertEqual(0, end['scratch_bytes'])
        self.assertGreater(end['shared_bytes'], 90 * MiB)
        # Released before a byte was read or uploaded: the copy is all it
        # waited for (its time is the benchmark's business, not a test's).
        self.assertEqual((0, 0), (released.payload['bytes_read'],
                                  released.payload['bytes_uploaded']))
        self.assertLess(end['source_held_seconds'], end['duration_seconds'])
        # What the resumed guest might do must not reach the image: the
        # stream read the copy.
        self.assertTrue(base.images_identical(
            expected, self.download(image_id, 'raw')))
        self.assertNoReflinkCopyLeft()
        self.assertNoScratchLeft()

    def test_disk_written_after_release_does_not_change_the_image(self):
        disk = self.make_disk('resumed', 'qcow2', size='256M',
                              writes=('write -P 0x23 0 128M',))
        expected, instance, dom, image_id = self._suspended(disk)
        with events.Subscription(CONF, image_id=image_id) as sub:
            self.api.create_snapshot(self.context, self.worker.host,
                                     instance, image_id, 'raw')
            event = sub.wait(60)
            while event.event_type != 'snapshot.source_released':
                event = sub.wait(60)
            # The guest resumes and writes all over its disk (as Nova's
            # resume would let it): here, with qemu-io, right away.
            dom.managedSaveRemove(0)
            subprocess.run(['qemu-io', '-f', 'qcow2', '-c',
                            'write -P 0x77 0 128M', disk], check=True,
                           capture_output=True)
            final = list(sub.until_finished(120))[-1]
        self.assertEqual('snapshot.create.end', final.event_type,
                         final.payload)
        self.assertTrue(base.images_identical(
            expected, self.download(image_id, 'raw')))


class ReflinkThenDirectTest(XfsInstancesMixin, test_direct.DirectTestMixin,
                            base.FunctionalTestCase):
    """With direct writes on, the released guest's copy goes straight
    into Glance's RBD pool: no Glance ingest and no wait for it."""

    worker_conf = test_direct.DIRECT_CONF

    def test_released_then_the_copy_written_directly(self):
        base_file = self.make_disk('_base/reflink-direct', 'raw',
                                   size='64M',
                                   writes=('write -P 0x31 0 8M',))
        disk = self.make_disk('suspended-direct', 'qcow2', size='64M',
                              backing=base_file,
                              writes=('write -P 0x32 16M 4M',))
        content = self.raw_bytes(disk, 'qcow2')
        _, instance, _dom, image_id = self._suspended(disk)
        events = self.snapshot(instance, image_id, 'raw')
        released = [e for e in events
                    if e.event_type == 'snapshot.source_released'][0]
        end = events[-1].payload
        self.assertEqual('snapshot.create.end', events[-1].event_type,
                         f'{end}\n{self.worker.log_tail()}')
        self.assertIn('reflink copy', end['plan_reason'])
        # Released on the copy, before a byte was read.
        self.assertEqual(0, released.payload['bytes_read'])
        self.assertGreater(end['shared_bytes'], 0)
        self.assert_direct_image(image_id, end, content)
        # Only the data: 8 MiB in the base, 4 MiB in the overlay.
        self.assertEqual(12 * MiB, end['bytes_written'])
        self.assertNoReflinkCopyLeft()
        self.assertNoScratchLeft()
