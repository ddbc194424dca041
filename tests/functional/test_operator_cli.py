"""The operator's commands against a real worker: status, jobs, cancel.

Each command runs as a subprocess with the worker's own configuration
file (so it finds the same RabbitMQ), as an operator would run it.
"""

import json
import os
import subprocess
import sys
import time

from snapworker import events
from snapworker import notifications
from snapworker.conf import CONF
from tests.functional import base

CLI = os.path.join(os.path.dirname(sys.executable), 'snapworker')


class OperatorCliTest(base.FunctionalTestCase):

    worker_conf = {'worker.max_concurrent_snapshots': '1',
                   # Slow enough to be seen running and still be running
                   # when cancelled: the five CLI runs before that take
                   # 2-4 s each on a loaded machine, the 200 MiB read at
                   # this cap 100 s (a cancel stops it within a chunk).
                   'worker.max_read_bytes_per_second': str(2 * 1024 ** 2)}

    def cli(self, *args, roles='admin,member', timeout=60):
        proc = subprocess.run(
            [CLI, '--config-file', self.worker.process.conf_path, *args,
             '--user-id', self.context.user_id,
             '--project-id', self.context.project_id, '--roles', roles],
            capture_output=True, text=True, timeout=timeout)
        answer = (json.loads(proc.stdout.splitlines()[-1])
                  if proc.stdout.strip() else None)
        return proc.returncode, answer, proc.stderr

    def test_status_of_a_live_worker_and_of_a_host_without_one(self):
        code, status, err = self.cli('status', '--host', self.worker.host)
        self.assertEqual(0, code, err)
        self.assertEqual(('1.1', self.worker.host, 0, 0),
                         (status['version'], status['host'],
                          status['running'], status['queued']))
        started = time.monotonic()
        code, _, err = self.cli('status', '--host', 'no-such-host',
                                '--timeout', '3')
        self.assertEqual(3, code)
        self.assertIn('No snapworker worker answered for host no-such-host',
                      err)
        self.assertLess(time.monotonic() - started, 15)

    def test_jobs_lists_and_cancel_stops_cleanly(self):
        disk = self.make_disk('cancel-me', 'raw', size='256M',
                              writes=('write -P 0x44 0 200M',))
        instance, _ = self.define_domain(path=disk, fmt='raw')
        running, queued = self.create_image(), self.create_image()
        with events.Subscription(CONF) as sub:
            for image in (running, queued):
                self.api.create_snapshot(self.context, self.worker.host,
                                         instance, image)
            self.wait_for(lambda: self._states().get(running) == 'running',
                          'the first snapshot to run')
            code, status, err = self.cli('jobs', '--host', self.worker.host)
            self.assertEqual(0, code, err)
            jobs = {j['image_id']: j for j in status['jobs']}
            self.assertEqual(('running', 'queued'),
                             (jobs[running]['state'], jobs[queued]['state']))
            self.assertEqual('stream', jobs[running]['strategy'])
            # A member may not cancel; an admin may.
            code, answer, _ = self.cli('cancel', '--host', self.worker.host,
                                       running, roles='member')
            self.assertEqual((1, False), (code, answer['cancelled']))
            # The queued one first: cancelling the running one first would
            # let the queued one start.
            for image, state in ((queued, 'queued'), (running, 'running')):
                code, answer, err = self.cli('cancel', '--host',
                                             self.worker.host, image)
                self.assertEqual((0, True, state),
                                 (code, answer['cancelled'],
                                  answer['state']), err)
            finals = self.final_events(sub, (running, queued))
        for image in (running, queued):
            self.assertEqual((notifications.ERROR, 'Cancelled'),
                             finals[image])
            self.assertEqual('deleted', self.image_status(image))
        self.assertNoScratchLeft()
        self.assertNoHelperLeft()
        code, status, _ = self.cli('status', '--host', self.worker.host)
        self.assertEqual((0, 0), (status['running'], status['queued']))

    def _states(self):
        code, status, _ = self.cli('jobs', '--host', self.worker.host)
        if code != 0:
            return {}
        return {j['image_id']: j['state'] for j in status['jobs']}
