"""Stopping the worker: running snapshots finish, queued ones fail clean."""

import subprocess

from snapworker import events
from snapworker.conf import CONF
from tests.functional import base


class GracefulStopTest(base.FunctionalTestCase):

    worker_conf = {'worker.max_concurrent_snapshots': '1'}

    def test_sigterm_finishes_running_and_fails_queued(self):
        # qcow2 to raw: the running job reads through a qemu-nbd process,
        # which must be gone once the worker has stopped.
        disk = self.make_disk('big', 'qcow2', size='512M',
                              writes=('write -P 0x5a 0 256M',))
        instance, _ = self.define_domain(path=disk, fmt='qcow2')
        image_ids = [self.create_image() for _ in range(3)]
        with events.Subscription(CONF) as sub:
            for image_id in image_ids:
                self.api.create_snapshot(self.context, self.worker.host,
                                         instance, image_id, 'raw')
            # Other test classes' workers publish on the same bus.
            first = sub.wait(30)
            while first is not None and first.image_id not in image_ids:
                first = sub.wait(30)
            self.assertEqual(('snapshot.create.start', image_ids[0]),
                             (first.event_type, first.image_id))
            exit_code = self.worker.stop()
            finals = {}
            while len(finals) < 3:
                event = sub.wait(30)
                self.assertIsNotNone(event, finals)
                if event.image_id in image_ids and event.event_type in (
                        'snapshot.create.end', 'snapshot.create.error'):
                    finals[event.image_id] = (event.event_type,
                                              event.payload['error_code'])
        self.assertEqual(0, exit_code, self.worker.log_tail())
        self.assertEqual(('snapshot.create.end', None), finals[image_ids[0]])
        self.assertEqual('active', self.image_status(image_ids[0]))
        stored = self.download(image_ids[0], 'raw')
        self.assertTrue(base.images_identical(disk, stored))
        for image_id in image_ids[1:]:
            self.assertEqual(('snapshot.create.error', 'WorkerStopping'),
                             finals[image_id])
            self.assertEqual('deleted', self.image_status(image_id))
        left = subprocess.run(['pgrep', '-f', f'qemu-nbd.*{disk}'],
                              capture_output=True)
        self.assertEqual(1, left.returncode, 'qemu-nbd left running')
