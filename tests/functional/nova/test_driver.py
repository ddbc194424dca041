"""Nova's real libvirt driver, with and without snapworker, side by side.

Each snapshot is taken by a child process that is a minimal nova-compute:
it parses a nova.conf with ``nova.config.parse_args`` (Nova's exchange,
its RPC transport), builds the driver - Nova's unmodified
``LibvirtDriver`` or ``SnapworkerLibvirtDriver`` - on libvirtd's test
driver, skipping only ``init_host`` (it insists on QEMU), and calls
``snapshot()`` with an ``update_task_state`` that records what the compute
manager would save. Nova talks to the unauthenticated Glance (Nova sends
only a token); the class's worker uses the same Glance, Nova's exchange
and the host name the child uses as ``CONF.host``.

Root disks of every delegated type are covered: qcow2 files, RBD images
on the real Ceph (cloned into Glance's rbd store) and a loop device
standing in for Nova's LVM volumes. Nova's own path is run beside the
delegated one where it can run here; for block disks it cannot (its LVM
backend asks ``lvs`` through privsep about the volume, and there is no
device-mapper here).

Why a child process: Nova and snapworker both register options on the
global CONF, Nova's ``[DEFAULT] host`` among them. In a nova-compute,
Nova's come first and snapworker's defer to them; in this test runner the
other test modules import snapworker first, and Nova's own registration
would then fail. A separate process is also what nova-compute is.
"""

import json
import os
import subprocess
import sys
import textwrap
import uuid

from oslo_utils import units
from testtools import content

from snapworker import manager
from tests.functional import base
from tests.functional import rbd_helpers
from tests.services import glance as glance_service

# nova-compute's own order: parse nova.conf (which sets Nova's messaging
# defaults, control_exchange = nova), then load the driver.
_CHILD = ('import sys; '
          'import nova.monkey_patch; nova.monkey_patch.patch(); '
          'from nova import config; '
          'config.parse_args(["nova-compute", "--config-file", sys.argv[1]], '
          'configure_db=False); '
          'from tests.functional.nova import compute_child; '
          'compute_child.main(sys.argv[2])')

MiB = units.Mi
RBD_SIZE = 32 * MiB
#: (offset, length, byte) written to each RBD disk; the rest is holes.
RBD_WRITES = ((0, MiB, 0x11), (9 * MiB, 2 * MiB, 0x22),
              (RBD_SIZE - MiB, MiB, 0x33))

# (task_state, expected_state) as Nova's own cold snapshot sets them.
NOVA_COLD_TASK_STATES = [('image_pending_upload', None),
                         ('image_uploading', 'image_pending_upload'),
                         ('image_pending_upload', 'image_uploading'),
                         ('image_uploading', 'image_pending_upload')]


class NovaComputeTestBase(base.FunctionalTestCase):
    """A worker on Nova's exchange and a child nova-compute per snapshot."""

    @classmethod
    def setUpClass(cls):
        services = base.shared_services()
        cls.worker_conf = {
            'control_exchange': 'nova',
            'glance.endpoint_override': services['glance_noauth_url'],
            **cls.worker_conf,
        }
        super().setUpClass()
        cls.glance = glance_service.GlanceService(
            url=cls.services['glance_noauth_url'], state_dir='',
            log_path='', pid=0, pipeline='noauth').client()

    def create_image(self, **props):
        """An image of the user's project, as Nova's API creates one.

        The unauthenticated Glance gives images no owner; Nova's API
        creates a snapshot image as the user, so it is the user's
        project's, which the worker checks.
        """
        return super().create_image(owner=self.context.project_id, **props)

    def nova_snapshot(self, driver, instance_uuid, image_id, host=None,
                      live=False, libvirt_opts=None, **snapworker_opts):
        """Run one ``driver.snapshot()`` in a child nova-compute.

        :param libvirt_opts: extra ``[libvirt]`` options of its nova.conf.
        :param snapworker_opts: its ``[snapworker]`` options.
        """
        name = uuid.uuid4().hex[:8]
        conf_path = os.path.join(self.workdir, f'nova-{name}.conf')
        spec_path = os.path.join(self.workdir, f'spec-{name}.json')
        result_path = os.path.join(self.workdir, f'result-{name}.json')
        opts = {'status_poll_interval': 2, **snapworker_opts}
        snapshots_dir = os.path.join(self.workdir, f'snapshots-{name}')
        with open(conf_path, 'w') as f:
            f.write(self._nova_conf(host or self.worker.host, snapshots_dir,
                                    opts, libvirt_opts or {}))
        with open(spec_path, 'w') as f:
            json.dump({'driver': driver,
                       'instance_uuid': instance_uuid, 'image_id': image_id,
                       'project_id': self.context.project_id,
                       'user_id': self.context.user_id, 'live': live,
                       'result_path': result_path}, f)
        env = dict(os.environ, OS_NOVA_DISABLE_EVENTLET_PATCHING='1')
        proc = subprocess.run([sys.executable, '-c', _CHILD, conf_path,
                               spec_path],
                              capture_output=True, text=True, env=env,
                              cwd=os.getcwd(), timeout=240)
        if proc.returncode or not os.path.exists(result_path):
            self.fail(f'nova-compute child failed:\n{proc.stderr[-4000:]}')
        with open(result_path) as f:
            result = json.load(f)
        result['snapshots_directory'] = snapshots_dir
        self.addDetail(f'nova-compute-{driver}-{name}',
                       content.text_content(json.dumps(result, indent=1)))
        return result

    def _nova_conf(self, host, snapshots_dir, snapworker_opts,
                   libvirt_opts):
        s = self.services
        libvirt = ''.join(f'{k} = {v}\n' for k, v in libvirt_opts.items())
        text = textwrap.dedent(f"""\
            [DEFAULT]
            host = {host}
            transport_url = {s['transport_url']}
            instances_path = {self.instances_path}
            state_path = {self.workdir}/nova-state
            [libvirt]
            connection_uri = {s['libvirt_uri']}
            snapshots_directory = {snapshots_dir}
            """) + libvirt + textwrap.dedent(f"""\
            [glance]
            endpoint_override = {s['glance_noauth_url']}
            num_retries = 0
            [oslo_concurrency]
            lock_path = {self.workdir}/locks
            [upgrade_levels]
            snapworker = {manager.RPC_API_VERSION}
            [snapworker]
            """)
        text += ''.join(f'{k} = {v}\n' for k, v in snapworker_opts.items())
        return text

    # -- what a snapshot looked like from Nova's side ---------------------

    @staticmethod
    def task_states(result):
        return [(e['task_state'], e['expected_state'])
                for e in result['timeline'] if e['what'] == 'task_state']

    @staticmethod
    def steps(result):
        """The timeline as compact strings: what happened, guest state."""
        out = []
        for e in result['timeline']:
            what = e['what']
            if what == 'task_state':
                what = f"task_state={e['task_state']}"
            elif what == 'event':
                what = e['event_type']
            out.append(f"{what} [{e['state']}]")
        return out

    def assertImageIs(self, image_id, disk, fmt):
        image = self.glance.images.get(image_id)
        self.assertEqual('active', image['status'])
        self.assertEqual(fmt, image['disk_format'])
        self.assertEqual('snapshot', image['image_location'])
        self.assertEqual('linux', image['os_type'])
        self.assertTrue(base.images_identical(
            disk, self.download(image_id, fmt)))

    @staticmethod
    def event_payload(result, event_type):
        """The recorded payload fields of the last ``event_type`` event."""
        return [e['payload'] for e in result['timeline']
                if e['what'] == 'event' and e['event_type'] == event_type][-1]

    @staticmethod
    def at(result, step):
        """Child clock time of the first timeline entry rendered ``step``."""
        steps = NovaComputeTestBase.steps(result)
        return result['timeline'][steps.index(step)]['t']


class NovaDriverTestCase(NovaComputeTestBase):
    """Snapshots of file disks through Nova's driver, delegated and native."""

    def test_shut_off_instance_matches_nova(self):
        disk = self.make_disk('shutoff.qcow2')
        instance_uuid, _dom = self.define_domain(path=disk)
        native_image = self.create_image()
        native = self.nova_snapshot('native', instance_uuid, native_image)
        image_id = self.create_image()

        delegated = self.nova_snapshot('snapworker', instance_uuid, image_id)

        self.assertIsNone(native['error'])
        self.assertIsNone(delegated['error'], self.worker.log_tail())
        self.assertEqual([('image_pending_upload', None),
                          ('image_uploading', 'image_pending_upload')],
                         self.task_states(delegated))
        # Nova's own sequence has a detour (its direct_snapshot attempt,
        # RBD only, goes to uploading and back); both end where the
        # compute manager expects: image_uploading.
        self.assertEqual(NOVA_COLD_TASK_STATES, self.task_states(native))
        self.assertEqual(self.task_states(native)[-1],
                         self.task_states(delegated)[-1])
        self.assertEqual('shutdown', delegated['timeline'][-1]['state'])
        self.assertImageIs(image_id, disk, 'qcow2')
        self.assertImageIs(native_image, disk, 'qcow2')
        # Nova's path extracts a copy into snapshots_directory (and leaves
        # the emptied directory); the delegated one never creates it.
        self.assertTrue(os.path.isdir(native['snapshots_directory']))
        self.assertFalse(os.path.exists(delegated['snapshots_directory']))
        # The light client: the worker's configuration never got loaded.
        self.assertNotIn('snapworker.conf', delegated['snapworker_modules'])
        self.assertIn('snapworker.nova.driver',
                      delegated['snapworker_modules'])

    def test_running_instance_resumed_when_source_released(self):
        disk = self.make_disk('running.qcow2')
        instance_uuid, dom = self.define_domain(path=disk, running=True)
        native_image = self.create_image()
        native = self.nova_snapshot('native', instance_uuid, native_image)
        image_id = self.create_image()

        delegated = self.nova_snapshot('snapworker', instance_uuid, image_id)

        self.assertIsNone(native['error'])
        self.assertIsNone(delegated['error'], self.worker.log_tail())
        steps = self.steps(delegated)
        self.assertEqual(
            ['begin [running]',
             '_suspend_guest_for_snapshot [shutdown]',
             'task_state=image_pending_upload [shutdown]',
             'snapshot.create.start [shutdown]',
             'task_state=image_uploading [shutdown]',
             'snapshot.source_released [shutdown]',
             '_resume_guest_after_snapshot [running]'],
            [s for s in steps if not s.startswith('snapshot.progress')][:7])
        self.assertEqual('end [running]', steps[-1])
        self.assertIn('snapshot.create.end [running]', steps)
        self.assertEqual(1, dom.isActive())
        self.assertImageIs(image_id, disk, 'qcow2')
        self.assertEqual('end [running]', self.steps(native)[-1])

    def test_worker_failure_raises_and_resumes_guest(self):
        outside = os.path.join(self.workdir, 'outside.qcow2')
        base.qemu_img('create', '-q', '-f', 'qcow2', outside, '16M')
        instance_uuid, dom = self.define_domain(path=outside, running=True)
        image_id = self.create_image()

        result = self.nova_snapshot('snapworker', instance_uuid, image_id)

        self.assertEqual('SnapshotOffloadFailed', result['error']['type'])
        self.assertIn('DiskOutsideInstancesPath', result['error']['message'])
        self.assertIn('_resume_guest_after_snapshot [running]',
                      self.steps(result))
        self.assertEqual(1, dom.isActive())
        self.assertEqual('deleted', self.image_status(image_id))

    def test_no_worker_fails_within_accept_timeout(self):
        disk = self.make_disk('orphan.qcow2')
        instance_uuid, dom = self.define_domain(path=disk, running=True)
        image_id = self.create_image()

        result = self.nova_snapshot(
            'snapworker', instance_uuid, image_id,
            host=f'no-worker-{uuid.uuid4().hex[:8]}', accept_timeout=3,
            status_poll_interval=1)

        self.assertEqual('WorkerNotResponding', result['error']['type'])
        # The status call found no worker before the guest was touched:
        # never suspended, no task state set.
        self.assertEqual(['begin [running]', 'end [running]'],
                         self.steps(result))
        self.assertEqual([], self.task_states(result))
        self.assertEqual(1, dom.isActive())

    def test_live_snapshot_takes_nova_path(self):
        disk = self.make_disk('live.qcow2')
        instance_uuid, _dom = self.define_domain(path=disk, running=True)
        image_id = self.create_image()

        result = self.nova_snapshot('snapworker', instance_uuid, image_id,
                                    live=True)

        self.assertIsNone(result['error'])
        self.assertEqual(['begin [running]',
                          'LibvirtDriver.snapshot [running]',
                          'end [running]'], self.steps(result))
        self.assertEqual('queued', self.image_status(image_id))

    def test_disk_type_not_delegated_takes_nova_path(self):
        disk = self.make_disk('notlisted.qcow2')
        instance_uuid, _dom = self.define_domain(path=disk)
        image_id = self.create_image()

        result = self.nova_snapshot('snapworker', instance_uuid, image_id,
                                    disk_types='raw')

        self.assertIsNone(result['error'])
        self.assertEqual(NOVA_COLD_TASK_STATES, self.task_states(result))
        self.assertTrue(os.path.isdir(result['snapshots_directory']))
        self.assertImageIs(image_id, disk, 'qcow2')


class NovaDriverRbdTest(rbd_helpers.RbdTestMixin, NovaComputeTestBase):
    """RBD root disks (Nova's ``images_type = rbd``) on the real Ceph.

    The worker's Glance (the unauthenticated one, which Nova's token-only
    calls need) has a ``ceph`` rbd store on pool ``images`` in the disk's
    cluster, so a raw snapshot is a copy-on-write clone: no byte is read,
    nothing lands in ``snapshots_directory``. Glance refuses its store
    details (``GET /v2/info/stores/detail`` is ``role:admin``, and this
    context has no roles), exactly as it refuses them to the ordinary
    users whose snapshots Nova delegates; the worker is therefore told the
    pool (``[rbd] glance_pool``), as a deployment must tell it.
    """

    worker_conf = {'rbd.glance_pool': 'images'}

    def make_rbd_disk(self):
        return super().make_rbd_disk(RBD_SIZE, RBD_WRITES)

    def rbd_libvirt_opts(self):
        """nova.conf ``[libvirt]`` of a compute host on this Ceph."""
        return {'images_type': 'rbd', 'images_rbd_pool': 'vms',
                'images_rbd_ceph_conf': self.cluster.conf_path,
                'rbd_user': self.cluster.client_user,
                'rbd_secret_uuid': str(uuid.uuid4())}

    def assertCloned(self, image_id, result, data):
        end = self.event_payload(result, 'snapshot.create.end')
        self.assertEqual(('clone', 'rbd', 'raw', 0, 0),
                         (end['strategy'], end['source_kind'],
                          end['target_format'], end['bytes_read'],
                          end['scratch_bytes']))
        image = self.glance.images.get(image_id)
        self.assertEqual('active', image['status'])
        self.assertEqual('raw', image['disk_format'])
        self.assertEqual('snapshot', image['image_location'])
        self.assertEqual('linux', image['os_type'])
        self.assertEqual('ceph', image['stores'])
        self.assertEqual(
            [f'rbd://{self.cluster.fsid}/images/{image_id}/snap'],
            [loc['url'] for loc in image['locations']])
        self.assertEqual(data, self.read_rbd(self.images, image_id, 'snap'))
        self.assertFalse(os.path.exists(result['snapshots_directory']))

    def test_shut_off_rbd_instance_is_cloned(self):
        name, data = self.make_rbd_disk()
        instance_uuid, _dom = self.define_rbd_domain(name)
        native_image = self.create_image()
        native = self.nova_snapshot('native', instance_uuid, native_image,
                                    libvirt_opts=self.rbd_libvirt_opts())
        image_id = self.create_image()

        # Nova's default images_type: the delegated path does not need
        # Nova's rbd image backend, only the domain XML. (Events, not the
        # status poll: see the running instance's test.)
        result = self.nova_snapshot('snapworker', instance_uuid, image_id,
                                    status_poll_interval=30)

        # Nova's direct_snapshot clones only a disk that is itself a clone
        # of a Glance image; this one is not, so Nova falls back to
        # qemu-img convert through snapshots_directory and uploads the
        # copy into Glance's default (file) store.
        self.assertIsNone(native['error'])
        self.assertEqual(NOVA_COLD_TASK_STATES, self.task_states(native))
        self.assertTrue(os.path.isdir(native['snapshots_directory']))
        self.assertEqual('local',
                         self.glance.images.get(native_image)['stores'])
        self.assertEqual(data,
                         b''.join(self.glance.images.data(native_image)))
        self.assertIsNone(result['error'], self.worker.log_tail())
        self.assertEqual([('image_pending_upload', None),
                          ('image_uploading', 'image_pending_upload')],
                         self.task_states(result))
        # Nova's suspend and resume helpers are called and do nothing for
        # a guest that is not running.
        self.assertEqual(
            ['begin [shutdown]',
             '_suspend_guest_for_snapshot [shutdown]',
             'task_state=image_pending_upload [shutdown]',
             'snapshot.create.start [shutdown]',
             'task_state=image_uploading [shutdown]',
             'snapshot.source_released [shutdown]',
             '_resume_guest_after_snapshot [shutdown]',
             'snapshot.create.end [shutdown]',
             'end [shutdown]'],
            [s for s in self.steps(result)
             if not s.startswith('snapshot.progress')])
        self.assertCloned(image_id, result, data)
        self.assertEqual(data, b''.join(self.glance.images.data(image_id)))
        # The worker flattens in the background, then drops its snapshot:
        # the instance disk is left as it was.
        self.wait_no_worker_snaps(name)
        self.assertEqual(data, self.read_rbd(self.vms, name))

    def test_running_rbd_instance_resumed_after_rbd_snapshot(self):
        name, data = self.make_rbd_disk()
        instance_uuid, dom = self.define_rbd_domain(name, running=True)
        image_id = self.create_image()

        # A real RBD compute host's nova.conf; still Nova's backend unused.
        # The test follows the events: Glance reports a clone active
        # before the worker has closed its Ceph connection and sent the
        # end event, and a 2 s status poll would end the wait first.
        result = self.nova_snapshot('snapworker', instance_uuid, image_id,
                                    libvirt_opts=self.rbd_libvirt_opts(),
                                    status_poll_interval=30)

        self.assertIsNone(result['error'], self.worker.log_tail())
        steps = [s for s in self.steps(result)
                 if not s.startswith('snapshot.progress')]
        self.assertEqual(
            ['begin [running]',
             '_suspend_guest_for_snapshot [shutdown]',
             'task_state=image_pending_upload [shutdown]',
             'snapshot.create.start [shutdown]',
             'task_state=image_uploading [shutdown]',
             'snapshot.source_released [shutdown]',
             '_resume_guest_after_snapshot [running]',
             'snapshot.create.end [running]',
             'end [running]'], steps)
        # Held only until the RBD snapshot existed, not for the clone and
        # its registration in Glance.
        suspended = self.at(result, '_suspend_guest_for_snapshot [shutdown]')
        resumed = self.at(result, '_resume_guest_after_snapshot [running]')
        ended = self.at(result, 'snapshot.create.end [running]')
        self.assertLess(resumed, ended)
        end = self.event_payload(result, 'snapshot.create.end')
        self.assertLess(end['source_held_seconds'], end['duration_seconds'])
        self.addDetail('guest-held', content.text_content(json.dumps({
            'guest_held_s': round(resumed - suspended, 3),
            'suspend_to_end_s': round(ended - suspended, 3),
            'worker': end})))
        self.assertEqual(1, dom.isActive())
        self.assertCloned(image_id, result, data)
        self.wait_no_worker_snaps(name)


class NovaDriverLvmTest(NovaComputeTestBase):
    """Block-device root disks: what Nova's LVM backend (``images_type =
    lvm``) gives an instance. No device-mapper here, so a read-only loop
    device stands in for the logical volume; Nova names both ``lvm``."""

    def loop_device(self, backing_file):
        dev = subprocess.run(['losetup', '--find', '--show', '--read-only',
                              backing_file], check=True, capture_output=True,
                             text=True).stdout.strip()
        self.addCleanup(subprocess.run, ['losetup', '-d', dev])
        return dev

    def define_lvm_domain(self, running=False):
        backing = self.make_disk(f'lv-{uuid.uuid4().hex[:8]}', 'raw',
                                 size='24M',
                                 writes=('write -P 0x66 0 2M',
                                         'write -P 0x77 20M 1M'))
        dev = self.loop_device(backing)
        instance_uuid, dom = self.define_domain(running=running, disk_xml=(
            "<disk type='block' device='disk'>"
            "<driver name='qemu' type='raw'/>"
            f"<source dev='{dev}'/><target dev='vda' bus='virtio'/>"
            "</disk>"))
        return backing, instance_uuid, dom

    def assertSnapshotOf(self, image_id, result, backing,
                         strategy='stream'):
        """The image is the device's content, made by ``strategy``:
        ``stream`` (no scratch) for a shut-off instance, ``convert`` (a
        local copy first) for a guest Nova suspended and waits to resume.
        """
        end = self.event_payload(result, 'snapshot.create.end')
        self.assertEqual((strategy, 'block', 'raw'),
                         (end['strategy'], end['source_kind'],
                          end['target_format']))
        self.assertEqual(strategy == 'convert', end['scratch_bytes'] > 0)
        self.assertEqual('local', self.glance.images.get(image_id)['stores'])
        self.assertImageIs(image_id, backing, 'raw')
        self.assertFalse(os.path.exists(result['snapshots_directory']))

    def test_shut_off_lvm_instance_is_streamed(self):
        backing, instance_uuid, _dom = self.define_lvm_domain()
        image_id = self.create_image()

        result = self.nova_snapshot('snapworker', instance_uuid, image_id)

        self.assertIsNone(result['error'], self.worker.log_tail())
        self.assertEqual([('image_pending_upload', None),
                          ('image_uploading', 'image_pending_upload')],
                         self.task_states(result))
        self.assertEqual('end [shutdown]', self.steps(result)[-1])
        self.assertSnapshotOf(image_id, result, backing)

    def test_running_lvm_instance_is_cold_even_on_qemu(self):
        # Nova never snapshots an lvm disk live; with QEMU's version check
        # satisfied (live=True) the running guest is still suspended and
        # the snapshot delegated, not handed to LibvirtDriver.snapshot.
        backing, instance_uuid, dom = self.define_lvm_domain(running=True)
        image_id = self.create_image()

        result = self.nova_snapshot('snapworker', instance_uuid, image_id,
                                    live=True)

        self.assertIsNone(result['error'], self.worker.log_tail())
        steps = self.steps(result)
        self.assertNotIn('LibvirtDriver.snapshot [running]', steps)
        self.assertEqual(['begin [running]',
                          '_suspend_guest_for_snapshot [shutdown]',
                          'task_state=image_pending_upload [shutdown]'],
                         steps[:3])
        self.assertLess(steps.index('_resume_guest_after_snapshot [running]'),
                        steps.index('end [running]'))
        self.assertEqual(1, dom.isActive())
        # The guest waits: the worker copies the device first to resume
        # it sooner ([worker] suspended_guest_plan = release_first).
        self.assertSnapshotOf(image_id, result, backing, 'convert')
