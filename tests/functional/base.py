"""What every functional test stands on: real services, a real worker.

The services (RabbitMQ, Glance, libvirtd serving libvirt's test driver,
Ceph) are started once per test run by ``tools/run-tests``, which points
``SNAPWORKER_SERVICES`` at their ``services.json``. A test process started
without it (a developer running one test) brings its own up once and stops
them at exit.

Each test class runs its own ``snapworker-worker`` process, started by its
console script with a host name of its own, so classes running in parallel
never take each other's requests.
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import fixtures
import libvirt
import testtools
from oslo_context import context as o_context

from snapworker import events
from snapworker import rpcapi
from snapworker.conf import CONF
from tests.services import __main__ as services_main
from tests.services import glance as glance_service

_SERVICES = None
_BIN = os.path.dirname(sys.executable)

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def shared_services():
    """The services of this test run (see the module docstring)."""
    global _SERVICES
    if _SERVICES is None:
        path = os.environ.get('SNAPWORKER_SERVICES')
        if path:
            with open(path) as f:
                _SERVICES = json.load(f)
        else:
            state_dir = tempfile.mkdtemp(prefix='snapworker-services-')
            _SERVICES = services_main.up(state_dir, with_ceph=True)
            atexit.register(shutil.rmtree, state_dir, True)
            atexit.register(services_main.down, state_dir)
        CONF([], project='snapworker', default_config_files=[])
        CONF.set_override('transport_url', _SERVICES['transport_url'])
    return _SERVICES


def qemu_img(*args):
    return subprocess.run(('qemu-img',) + args, check=True,
                          capture_output=True, text=True).stdout


def images_identical(first, second):
    """``qemu-img compare``: same guest-visible content, any formats."""
    proc = subprocess.run(['qemu-img', 'compare', first, second],
                          capture_output=True, text=True)
    return proc.returncode == 0


class WorkerProcess(fixtures.Fixture):
    """``snapworker-worker`` as a separate process, stopped by SIGTERM."""

    def __init__(self, services, workdir, instances_path, **conf):
        super().__init__()
        self.services = services
        self.workdir = workdir
        self.instances_path = instances_path
        self.scratch_dir = os.path.join(workdir, 'scratch')
        self.host = f'compute-{uuid.uuid4().hex[:8]}'
        self.log_path = os.path.join(workdir, f'{self.host}.log')
        self.conf_path = os.path.join(workdir, f'{self.host}.conf')
        self.extra_conf = conf
        self.proc = None

    def _config(self):
        s = self.services
        text = textwrap.dedent(f"""\
            [DEFAULT]
            host = {self.host}
            debug = True
            instances_path = {self.instances_path}
            scratch_dir = {self.scratch_dir}
            libvirt_uri = {s['libvirt_uri']}
            transport_url = {s['transport_url']}
            graceful_shutdown_timeout = 60
            [worker]
            progress_interval = 0.2
            [glance]
            auth_strategy = noauth
            endpoint_override = {s['glance_url']}
            """)
        ceph = s.get('ceph')
        if ceph:
            text += textwrap.dedent(f"""\
                [rbd]
                ceph_conf = {ceph['conf_path']}
                user = {ceph['client_user']}
                keyring = {ceph['client_keyring']}
                """)
        for key, value in self.extra_conf.items():
            group, _, name = key.rpartition('.')
            text += f'[{group or "DEFAULT"}]\n{name} = {value}\n'
        return text

    def _setUp(self):
        with open(self.conf_path, 'w') as f:
            f.write(self._config())
        self.log = open(self.log_path, 'ab')
        self.addCleanup(self.log.close)
        self.proc = subprocess.Popen(
            [os.path.join(_BIN, 'snapworker-worker'),
             '--config-file', self.conf_path],
            stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.addCleanup(self.stop)
        self._wait_for_log('snapworker listening', 60)

    def _wait_for_log(self, text, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, errors='replace') as f:
                if text in f.read():
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f'worker did not log {text!r}:\n'
                             f'{self.log_tail()}')

    def log_tail(self, lines=60):
        with open(self.log_path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])

    def stop(self, timeout=60):
        """SIGTERM the worker's process group; return its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc and self.proc.returncode
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


class FunctionalTestCase(testtools.TestCase):
    """One worker per class; helpers for domains, images and events."""

    worker_conf = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.services = shared_services()
        cls.workdir = tempfile.mkdtemp(prefix='snapworker-test-')
        cls.instances_path = os.path.join(cls.workdir, 'instances')
        os.makedirs(os.path.join(cls.instances_path, '_base'))
        cls.worker = WorkerProcess(cls.services, cls.workdir,
                                   cls.instances_path, **cls.worker_conf)
        try:
            cls.worker.setUp()
        except BaseException:
            cls.worker.cleanUp()
            raise
        cls.glance = glance_service.GlanceService(
            url=cls.services['glance_url'], state_dir='', log_path='',
            pid=0, pipeline='trusted-headers').client()
        cls.libvirt = libvirt.open(cls.services['libvirt_uri'])

    @classmethod
    def tearDownClass(cls):
        cls.worker.cleanUp()
        cls.libvirt.close()
        shutil.rmtree(cls.workdir, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.Timeout(300, gentle=True))
        self.api = rpcapi.SnapworkerAPI()
        self.context = o_context.RequestContext(
            user_id=glance_service.IDENTITY_HEADERS['X-User-Id'],
            project_id=glance_service.IDENTITY_HEADERS['X-Project-Id'],
            roles=['admin', 'member', 'reader'], auth_token='unused')

    # -- disks and domains -------------------------------------------------

    def make_disk(self, name, fmt='qcow2', size='16M', backing=None,
                  backing_fmt='raw', writes=('write -P 0x5a 0 1M',)):
        """A disk under the class's instances path, with some data."""
        path = os.path.join(self.instances_path, name)
        args = ['create', '-q', '-f', fmt]
        if backing:
            args += ['-b', backing, '-F', backing_fmt]
        qemu_img(*args, path, size)
        for command in writes:
            subprocess.run(['qemu-io', '-f', fmt, '-c', command, path],
                           check=True, capture_output=True)
        self.addCleanup(self._remove, path)
        return path

    @staticmethod
    def _remove(path):
        if os.path.lexists(path):
            os.unlink(path)

    def define_domain(self, disk_xml=None, path=None, fmt='qcow2',
                      running=False):
        """A libvirt domain named like Nova's, with this root disk."""
        instance_uuid = str(uuid.uuid4())
        if disk_xml is None:
            disk_xml = (f"<disk type='file' device='disk'>"
                        f"<driver name='qemu' type='{fmt}'/>"
                        f"<source file='{path}'/>"
                        f"<target dev='vda' bus='virtio'/></disk>")
        dom = self.libvirt.defineXML(
            f"<domain type='test'><name>instance-{instance_uuid[:8]}</name>"
            f"<uuid>{instance_uuid}</uuid><memory>65536</memory>"
            f"<os><type>hvm</type></os><devices>{disk_xml}</devices>"
            f"</domain>")
        self.addCleanup(self._undefine, dom)
        if running:
            dom.create()
        return instance_uuid, dom

    @staticmethod
    def _undefine(dom):
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass

    # -- Glance ---------------------------------------------------------------

    def create_image(self, **props):
        image = self.glance.images.create(name=f'snap-{self.id()}', **props)
        self.addCleanup(self._delete_image, image['id'])
        return image['id']

    def _delete_image(self, image_id):
        try:
            self.glance.images.delete(image_id)
        except Exception:
            pass

    def image_status(self, image_id):
        try:
            return self.glance.images.get(image_id)['status']
        except Exception as e:
            if type(e).__name__ == 'HTTPNotFound':
                return 'deleted'
            raise

    def download(self, image_id, suffix):
        path = os.path.join(self.workdir, f'{image_id}.{suffix}')
        with open(path, 'wb') as f:
            for chunk in self.glance.images.data(image_id):
                f.write(chunk)
        self.addCleanup(self._remove, path)
        return path

    # -- snapshots ------------------------------------------------------------

    def snapshot(self, instance_uuid, image_id, target_format=None,
                 timeout=120, host=None):
        """Cast a snapshot and return its events up to the final one."""
        with events.Subscription(CONF, image_id=image_id) as sub:
            self.api.create_snapshot(self.context, host or self.worker.host,
                                     instance_uuid, image_id,
                                     target_format=target_format)
            received = list(sub.until_finished(timeout))
        if not received or received[-1].event_type not in (
                'snapshot.create.end', 'snapshot.create.error'):
            self.fail(f'no final event for {image_id}; worker log:\n'
                      f'{self.worker.log_tail()}')
        return received

    def assertNoScratchLeft(self):
        scratch = self.worker.scratch_dir
        left = os.listdir(scratch) if os.path.isdir(scratch) else []
        self.assertEqual([], left)
