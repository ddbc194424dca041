"""Every file and block plan, run by both plan contexts, gives one image.

The pipeline's ``SnapshotJob`` (which fills a Glance image) and
``snapworker stream``'s ``WriteContext`` (which writes a file) implement
the same ``PlanContext``: a plan that reached past the contract (a
payload field, an attribute only one of them has) fails here for the
other one.
"""

import io
import os
import subprocess

import fixtures
import testtools
from oslo_config import fixture as config_fixture
from oslo_context import context as o_context
from oslo_utils import uuidutils

from snapworker import notifications
from snapworker import objects
from snapworker import pipeline
from snapworker.conf import CONF
from snapworker.sources import base
from snapworker.sources import file as file_source
from snapworker.sources import writer
from tests.unit import fakes


class _Notifier:
    def info(self, *args):
        pass

    warn = error = info


def _compare(first, second):
    return subprocess.run(['qemu-img', 'compare', first, second],
                          capture_output=True).returncode == 0


class PlanContractTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(CONF))
        self.dir = self.useFixture(fixtures.TempDir()).path
        self.conf.config(instances_path=self.dir,
                         scratch_dir=os.path.join(self.dir, 'scratch'))
        self.conf.config(journal_dir=os.path.join(self.dir, 'journal'),
                         group='worker')

    def _disk(self, name, fmt, backing=None):
        path = os.path.join(self.dir, name)
        cmd = ['qemu-img', 'create', '-q', '-f', fmt]
        if backing:
            cmd += ['-b', backing, '-F', 'raw']
        subprocess.run(cmd + [path, '8M'], check=True)
        subprocess.run(['qemu-io', '-f', fmt, '-c',
                        f'write -P 0x{len(name):02x} 1M 1M', path],
                       check=True, capture_output=True)
        return path

    def _through_cli(self, path, fmt, target, release_first):
        source = file_source.FileSource(path, fmt, CONF)
        source.inspect()
        plan = source.plan(target, release_first=release_first)
        out = io.BytesIO()
        ctx = writer.WriteContext(out)
        self.assertIsInstance(ctx, base.PlanContext)
        try:
            plan.run(ctx)
        finally:
            plan.cleanup()
            source.close()
        return plan.strategy, out.getvalue()

    def _through_pipeline(self, path, fmt, target, release_first):
        hypervisor, images = fakes.FakeHypervisor(), fakes.FakeImageService()
        instance, image = (uuidutils.generate_uuid(),
                           uuidutils.generate_uuid())
        hypervisor.add(instance, path=path, fmt=fmt,
                       managed_save=release_first)
        images.create(image)
        context = o_context.RequestContext(project_id=fakes.PROJECT,
                                           roles=['member'])
        payload = objects.SnapshotPayload(instance_uuid=instance,
                                          image_id=image, host='h')
        emitter = notifications.SnapshotEmitter(_Notifier(), context,
                                                payload, 0)
        job = pipeline.SnapshotJob(CONF, hypervisor, images, emitter,
                                   instance, image, target, context=context)
        self.assertIsInstance(job, base.PlanContext)
        job.run()
        self.assertIsNone(payload.error_code, payload.error_message)
        return payload.strategy, images.images[image]['data']

    def test_every_plan_gives_the_same_image_through_both(self):
        base_file = self._disk('base.raw', 'raw')
        cases = [
            ('raw', self._disk('r.raw', 'raw'), 'raw', False),
            ('raw', self._disk('r2.raw', 'raw'), 'qcow2', False),
            ('qcow2', self._disk('q', 'qcow2'), 'qcow2', False),
            ('qcow2', self._disk('top', 'qcow2', backing=base_file),
             'qcow2', False),
            ('qcow2', self._disk('top2', 'qcow2', backing=base_file), 'raw',
             False),
            ('qcow2', self._disk('w', 'qcow2'), 'raw', True),
        ]
        seen = set()
        for compress in (False, True):
            self.conf.config(compress_qcow2=compress, group='worker')
            for fmt, path, target, release_first in cases:
                results = [run(path, fmt, target, release_first)
                           for run in (self._through_cli,
                                       self._through_pipeline)]
                (strategy, cli_bytes), (strategy2, job_bytes) = results
                self.assertEqual(strategy, strategy2)
                seen.add(strategy)
                out = os.path.join(self.dir, 'out')
                with open(out, 'wb') as f:
                    f.write(cli_bytes)
                self.assertTrue(_compare(path, out), (path, target))
                if strategy != 'convert':
                    # A stream is deterministic byte for byte; a convert
                    # is one qemu-img run each.
                    self.assertEqual(cli_bytes, job_bytes)
                with open(out, 'wb') as f:
                    f.write(job_bytes)
                self.assertTrue(_compare(path, out), (path, target))
        self.assertEqual({'stream', 'convert'}, seen)
        self.assertEqual([], os.listdir(os.path.join(self.dir, 'scratch')))
