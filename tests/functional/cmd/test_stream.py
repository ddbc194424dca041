"""``snapworker stream``: what the worker would upload, written locally."""

import hashlib
import json
import os
import subprocess
import sys

from tests.functional import base


def _md5(path):
    digest = hashlib.md5()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


class StreamCommandTest(base.FunctionalTestCase):
    """The diagnostic command writes what the worker would upload."""

    def _stream(self, disk, *args):
        proc = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), 'snapworker'),
             'stream', disk, *args], capture_output=True, text=True)
        self.assertEqual(0, proc.returncode, proc.stderr)
        return json.loads(proc.stderr.strip().splitlines()[-1])

    def test_overlay_streams_identical_and_reads_only(self):
        base_file = self.make_disk('_base/cli', 'raw', size='32M',
                                   writes=('write -P 0x12 0 3M',))
        overlay = self.make_disk('cli-overlay', 'qcow2', size='32M',
                                 backing=base_file,
                                 writes=('write -P 0x34 2M 2M',))
        before = (_md5(base_file), _md5(overlay))
        for target in ('qcow2', 'raw'):
            out = os.path.join(self.workdir, f'cli-out.{target}')
            self.addCleanup(self._remove, out)
            plan = self._stream(overlay, '--source-format', 'qcow2',
                                '--format', target, '-o', out)
            self.assertEqual(('stream', 'qcow2', target, 0),
                             (plan['strategy'], plan['source_format'],
                              plan['target_format'], plan['scratch_bytes']))
            self.assertEqual(os.path.getsize(out), plan['bytes_out'])
            self.assertTrue(base.images_identical(overlay, out))
            if target == 'qcow2':
                info = json.loads(base.qemu_img('info', '--output=json',
                                                out))
                self.assertNotIn('backing-filename', info)
                base.qemu_img('check', out)
        self.assertEqual(before, (_md5(base_file), _md5(overlay)))

    def test_compressed_qcow2_runs_the_convert_plan(self):
        disk = self.make_disk('cli-raw', 'raw', size='16M',
                              writes=('write -P 0x56 0 4M',))
        conf = os.path.join(self.workdir, 'cli-compress.conf')
        scratch = os.path.join(self.workdir, 'cli-scratch')
        with open(conf, 'w') as f:
            f.write(f'[DEFAULT]\nscratch_dir = {scratch}\n'
                    f'[worker]\ncompress_qcow2 = true\n')
        out = os.path.join(self.workdir, 'cli-compressed.qcow2')
        self.addCleanup(self._remove, out)
        plan = self._stream(disk, '--config-file', conf, '--source-format',
                            'raw', '--format', 'qcow2', '-o', out)
        self.assertEqual('convert', plan['strategy'])
        self.assertGreater(plan['scratch_bytes'], 0)
        self.assertTrue(base.images_identical(disk, out))
        base.qemu_img('check', out)
        # The scratch copy went with the command.
        self.assertEqual([], os.listdir(scratch))

    def test_format_is_required_and_a_failure_leaves_no_output(self):
        disk = self.make_disk('cli-plain', 'raw', size='1M')
        out = os.path.join(self.workdir, 'cli-none.qcow2')
        proc = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), 'snapworker'),
             'stream', disk, '--source-format', 'qcow2', '-o', out],
            capture_output=True, text=True)
        self.assertEqual(1, proc.returncode)
        self.assertIn('no qcow2 magic', proc.stderr)
        self.assertFalse(os.path.exists(out))
