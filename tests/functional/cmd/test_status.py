"""``snapworker-status upgrade check`` run as an operator runs it.

The real command (a subprocess) with a worker configuration pointing at
the real services of the test run: RabbitMQ, the trusted-headers Glance,
libvirtd and the Ceph cluster with Glance's ``images`` pool. It passes
on a good configuration and names the failing checks (exit 2, a warning
alone exit 1) on bad ones.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import testtools

from tests.functional import base
from tests.services import worker as worker_service

STATUS = os.path.join(os.path.dirname(sys.executable), 'snapworker-status')
CHECKS = ('Journal directory', 'Instances path', 'libvirt', 'Glance',
          'Ceph RBD', 'RPC version cap')
SUCCESS, WARNING, FAILURE = 0, 1, 2


def _closed_port():
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class UpgradeCheckTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.services = base.shared_services()
        if not self.services.get('ceph'):
            self.skipTest('the test services run without Ceph')
        self.workdir = tempfile.mkdtemp(prefix='snapworker-status-')
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.instances = os.path.join(self.workdir, 'instances')
        self.journal = os.path.join(self.workdir, 'journal')
        os.makedirs(self.instances)
        os.makedirs(self.journal)

    def config(self, name, journal_dir=None, glance_url=None, **extra):
        """A worker config for the services, as the tests' workers get."""
        path = os.path.join(self.workdir, f'{name}.conf')
        extra.setdefault('rbd.glance_pool', 'images')
        worker_service.write_config(
            path, host=f'status-{name}', services=self.services,
            instances_path=self.instances,
            scratch_dir=os.path.join(self.workdir, 'scratch'),
            journal_dir=journal_dir or self.journal, glance_url=glance_url,
            extra=extra)
        return path

    def run_check(self, conf_path, *args):
        proc = subprocess.run(
            [STATUS, '--config-file', conf_path, 'upgrade', 'check', *args],
            capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr

    def results(self, conf_path):
        """``(exit code, {check: (result, details)})`` of a --json run."""
        code, out, err = self.run_check(conf_path, '--json')
        checks = json.loads(out)['checks']
        return code, {c['check']: (c['result'], c['details'])
                      for c in checks}

    def assertVerdicts(self, expected, results):
        self.assertEqual(expected, {name: result for name, (result, _)
                                    in results.items()}, results)

    def test_good_configuration_passes(self):
        code, out, err = self.run_check(self.config('good'))
        self.assertEqual(0, code, out + err)
        for name in CHECKS:
            self.assertIn(f'Check: {name}', out)
        self.assertEqual(len(CHECKS), out.count('Result: Success'), out)
        self.assertNotIn('Failure', out)
        # What each check found, in its details.
        self.assertIn(self.services['glance_url'], out)
        self.assertIn('pool images readable', out)
        self.assertEqual([], os.listdir(self.journal))

    def test_bad_configuration_names_each_failing_check(self):
        glance_url = f'http://127.0.0.1:{_closed_port()}'
        missing_parent = os.path.join(self.workdir, 'not-mounted')
        code, results = self.results(self.config(
            'bad', glance_url=glance_url,
            journal_dir=os.path.join(missing_parent, 'journal'),
            **{'upgrade_levels.snapworker': '2.0',
               'rbd.glance_pool': 'no-such-pool'}))
        self.assertEqual(2, code, results)
        self.assertVerdicts({'Journal directory': FAILURE,
                             'Instances path': SUCCESS,
                             'libvirt': SUCCESS,
                             'Glance': FAILURE,
                             'Ceph RBD': FAILURE,
                             'RPC version cap': FAILURE}, results)
        self.assertIn(missing_parent, results['Journal directory'][1])
        self.assertIn(glance_url, results['Glance'][1])
        self.assertIn('no-such-pool', results['Ceph RBD'][1])
        self.assertIn('= 2.0', results['RPC version cap'][1])
        self.assertFalse(os.path.exists(missing_parent))

    def test_journal_on_tmpfs_fails(self):
        shm = tempfile.mkdtemp(prefix='snapworker-status-', dir='/dev/shm')
        self.addCleanup(shutil.rmtree, shm, True)
        code, results = self.results(self.config('tmpfs', journal_dir=shm))
        self.assertEqual(2, code, results)
        result, details = results['Journal directory']
        self.assertEqual(FAILURE, result)
        self.assertIn('tmpfs', details)

    def test_an_older_version_cap_only_warns(self):
        code, results = self.results(self.config(
            'capped', **{'upgrade_levels.snapworker': '1.0'}))
        self.assertEqual(1, code, results)
        self.assertEqual(WARNING, results['RPC version cap'][0])
        self.assertEqual({SUCCESS}, {result for name, (result, _)
                                     in results.items()
                                     if name != 'RPC version cap'})
