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
import subprocess
import sys
import tempfile
import time
import uuid

import fixtures
import libvirt
import testtools
from oslo_context import context as o_context

from snapworker import events
from snapworker import manager
from snapworker import notifications
from snapworker import rpc
from snapworker import rpcapi
from snapworker.conf import CONF
from tests.services import __main__ as services_main
from tests.services import glance as glance_service
from tests.services import worker as worker_service

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


def nova_metadata(project_id, user_id='user', base_image=None):
    """The ``<metadata>`` Nova writes into a domain: owner, base image."""
    root = (f"<nova:root type='image' uuid='{base_image}'/>" if base_image
            else "")
    return (f"<metadata><nova:instance xmlns:nova="
            f"'http://openstack.org/xmlns/libvirt/nova/1.1'>"
            f"<nova:owner><nova:user uuid='{user_id}'>u</nova:user>"
            f"<nova:project uuid='{project_id}'>p</nova:project>"
            f"</nova:owner>{root}</nova:instance></metadata>")


def process_running(pid):
    """Whether ``pid`` is a live process (a zombie is not).

    A helper killed with its worker is an orphan whose zombie waits for
    PID 1 to reap it; an init that reaps lazily (this machine's polls
    about once a second) keeps ``/proc/<pid>`` for a while after the
    process has ended and released everything.
    """
    try:
        with open(f'/proc/{pid}/stat') as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ('Z', 'X')


def qemu_img(*args):
    return subprocess.run(('qemu-img',) + args, check=True,
                          capture_output=True, text=True).stdout


def images_identical(first, second):
    """``qemu-img compare``: same guest-visible content, any formats."""
    proc = subprocess.run(['qemu-img', 'compare', first, second],
                          capture_output=True, text=True)
    return proc.returncode == 0


class WorkerProcess(fixtures.Fixture):
    """A worker for one test class, with a host name of its own."""

    def __init__(self, services, workdir, instances_path, **conf):
        super().__init__()
        self.scratch_dir = os.path.join(workdir, 'scratch')
        self.host = f'compute-{uuid.uuid4().hex[:8]}'
        conf_path = os.path.join(workdir, f'{self.host}.conf')
        glance_url = conf.pop('glance.endpoint_override', None)
        worker_service.write_config(
            conf_path, host=self.host, services=services,
            instances_path=instances_path, scratch_dir=self.scratch_dir,
            glance_url=glance_url, extra=conf)
        self.process = worker_service.WorkerProcess(
            conf_path, os.path.join(workdir, f'{self.host}.log'))

    def _setUp(self):
        self.addCleanup(self.stop)
        self.process.start()

    def log_tail(self, lines=60):
        return self.process.log_tail(lines)

    def stop(self, timeout=60):
        return self.process.stop(timeout)


class FunctionalTestCase(testtools.TestCase):
    """One worker per class; helpers for domains, images and events."""

    worker_conf = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.services = shared_services()
        cls.workdir = tempfile.mkdtemp(prefix='snapworker-test-')
        cls.instances_path = os.path.join(cls.workdir, 'instances')
        os.makedirs(cls.instances_path)
        cls.prepare_instances_path(cls.instances_path)
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
    def prepare_instances_path(cls, path):
        """Hook: make ``path`` (empty) what the class's disks live on."""

    @classmethod
    def release_instances_path(cls, path):
        """Hook: undo ``prepare_instances_path``."""

    @classmethod
    def tearDownClass(cls):
        cls.worker.cleanUp()
        cls.libvirt.close()
        cls.release_instances_path(cls.instances_path)
        shutil.rmtree(cls.workdir, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.Timeout(300, gentle=True))
        transport = rpc.get_transport(CONF)
        self.addCleanup(transport.cleanup)
        # Capped at what this tree's worker answers, as an operator caps
        # clients that are newer than their workers.
        self.api = rpcapi.SnapworkerAPI(transport, topic=CONF.worker.topic,
                                        version_cap=manager.RPC_API_VERSION)
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
                      running=False, owner=None, base_image=None):
        """A libvirt domain named like Nova's, with this root disk.

        :param owner: the project in Nova's metadata; the test context's
            project by default.
        :param base_image: the Glance image Nova's metadata says the
            instance was built from.
        """
        instance_uuid = str(uuid.uuid4())
        metadata = nova_metadata(owner or self.context.project_id,
                                 base_image=base_image)
        if disk_xml is None:
            disk_xml = (f"<disk type='file' device='disk'>"
                        f"<driver name='qemu' type='{fmt}'/>"
                        f"<source file='{path}'/>"
                        f"<target dev='vda' bus='virtio'/></disk>")
        dom = self.libvirt.defineXML(
            f"<domain type='test'><name>instance-{instance_uuid[:8]}</name>"
            f"<uuid>{instance_uuid}</uuid><memory>65536</memory>"
            f"{metadata}"
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
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
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
                 timeout=120, host=None, context=None, **fields):
        """Cast a snapshot and return its events up to the final one.

        :param fields: sent as they are, with no client-side check (a
            forged or malformed request); the RPC client's method is
            used otherwise.
        """
        with events.Subscription(CONF, image_id=image_id) as sub:
            if fields:
                self.api.client.prepare(
                    server=host or self.worker.host).cast(
                    context or self.context, 'create_snapshot',
                    instance_uuid=instance_uuid, image_id=image_id,
                    target_format=target_format, **fields)
            else:
                self.api.create_snapshot(
                    context or self.context, host or self.worker.host,
                    instance_uuid, image_id, target_format=target_format)
            received = list(sub.until_finished(timeout))
        if not received or received[-1].event_type not in (
                notifications.FINAL):
            self.fail(f'no final event for {image_id}; worker log:\n'
                      f'{self.worker.log_tail()}')
        return received

    def final_events(self, sub, image_ids, timeout=60):
        """``{image id: (event type, error code)}`` of each one's final
        event on ``sub`` (other images' events, other classes' workers'
        included, are skipped)."""
        finals = {}
        while len(finals) < len(image_ids):
            event = sub.wait(timeout)
            self.assertIsNotNone(event, finals)
            if event.image_id in image_ids and (
                    event.event_type in notifications.FINAL):
                finals[event.image_id] = (event.event_type,
                                          event.payload['error_code'])
        return finals

    def wait_for(self, predicate, what, timeout=60):
        """Poll ``predicate`` until true; fail with the worker's log."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f'timed out waiting for {what}\n'
                          f'{self.worker.log_tail()}')
            time.sleep(0.05)

    def assertNoHelperLeft(self):
        """No qemu-img or qemu-nbd is left in the worker's process tree."""
        left = []
        for pid in worker_service.process_tree(self.worker.process.proc.pid):
            try:
                with open(f'/proc/{pid}/comm') as f:
                    name = f.read().strip()
            except OSError:
                continue
            if name.startswith(('qemu-img', 'qemu-nbd', 'prlimit')):
                left.append((pid, name))
        self.assertEqual([], left)

    def assertNoScratchLeft(self):
        scratch = self.worker.scratch_dir
        left = os.listdir(scratch) if os.path.isdir(scratch) else []
        self.assertEqual([], left)
