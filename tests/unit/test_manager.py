"""The manager and pipeline over the fake:// transport.

Requests are cast through the real rpcapi client to a real RPC server on
oslo.messaging's in-process transport, and the notifications are received
by a real notification listener on the same transport.
"""

import hashlib
import os
import queue
import subprocess
import threading
from unittest import mock

import fixtures
import oslo_messaging as messaging
import testtools
from oslo_config import fixture as config_fixture
from oslo_context import context as o_context
from oslo_utils import uuidutils

from snapworker import manager
from snapworker import notifications
from snapworker import rpc
from snapworker import rpcapi
from snapworker.conf import CONF
from tests.unit import fakes

HOST = 'compute-1'


class _Collector:
    def __init__(self):
        self.events = queue.Queue()

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self.events.put((event_type, payload['snapworker_object.data']))

    error = warn = info


class ManagerTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(CONF))
        self.tmp = self.useFixture(fixtures.TempDir()).path
        self.instances = os.path.join(self.tmp, 'instances')
        self.scratch = os.path.join(self.tmp, 'scratch')
        os.makedirs(self.instances)
        self.conf.config(host=HOST, instances_path=self.instances,
                         scratch_dir=self.scratch, transport_url='fake:/',
                         # The fake driver's exchanges are process-global:
                         # a stopped listener of an earlier test would
                         # still take one message from a shared one.
                         control_exchange=uuidutils.generate_uuid())
        self.conf.config(progress_interval=0,
                         journal_dir=os.path.join(self.tmp, 'journal'),
                         group='worker')
        # As snapworker-worker sets it: dispatch in arrival order.
        self.conf.config(executor_thread_pool_size=1)
        self.hypervisor = fakes.FakeHypervisor()
        self.images = fakes.FakeImageService()
        self.formats = {}
        self._start_messaging()

    def _start_messaging(self):
        self.transport = messaging.get_rpc_transport(CONF, 'fake:/')
        self.notify_transport = messaging.get_notification_transport(
            CONF, 'fake:/')
        self.collector = _Collector()
        listener = messaging.get_notification_listener(
            self.notify_transport,
            [messaging.Target(topic='notifications')],
            [self.collector])
        listener.start()
        self.addCleanup(listener.wait)
        self.addCleanup(listener.stop)
        self.api = rpcapi.SnapworkerAPI(transport=self.transport)
        self.context = o_context.RequestContext(
            user_id='u', project_id='p', roles=['member'])
        self._start_worker()

    def _start_worker(self, max_concurrent=2):
        self.conf.config(max_concurrent_snapshots=max_concurrent,
                         group='worker')
        notifier = notifications.get_notifier(self.notify_transport, CONF)
        self.manager = manager.SnapshotManager(
            CONF, notifier, hypervisor_api=self.hypervisor,
            image_service_factory=self.images)
        self.server = messaging.get_rpc_server(
            self.transport,
            messaging.Target(topic='snapworker', server=HOST),
            [self.manager], serializer=rpc.RequestContextSerializer())
        self.server.start()
        self.addCleanup(self.manager.stop)
        self.addCleanup(self.server.wait)
        self.addCleanup(self.server.stop)

    def _restart_with(self, max_concurrent):
        self.server.stop()
        self.server.wait()
        self.manager.stop()
        self._start_worker(max_concurrent)

    def _disk(self, name='disk', fmt='qcow2', size='4M', backing=None):
        path = os.path.join(self.instances, name)
        cmd = ['qemu-img', 'create', '-q', '-f', fmt]
        if backing:
            cmd += ['-b', backing, '-F', 'raw']
        subprocess.run(cmd + [path, size], check=True)
        subprocess.run(['qemu-io', '-f', fmt, '-c', 'write -P 0x5a 0 1M',
                        path], check=True, capture_output=True)
        # What Nova would write into the domain XML for this disk.
        self.formats[path] = fmt
        return path

    def _request(self, path, state='shut off', image_status='queued',
                 target_format=None, managed_save=False):
        instance, image = (uuidutils.generate_uuid(),
                           uuidutils.generate_uuid())
        self.hypervisor.add(instance, state=state, path=path,
                            managed_save=managed_save,
                            fmt=self.formats.get(path))
        self.images.create(image, status=image_status)
        self.api.create_snapshot(self.context, HOST, instance, image,
                                 target_format=target_format)
        return instance, image

    def _events_until_final(self, timeout=20):
        events = []
        while True:
            event_type, payload = self.collector.events.get(timeout=timeout)
            events.append((event_type, payload))
            if event_type in (notifications.END, notifications.ERROR,
                              notifications.REFUSED):
                return events

    def test_qcow2_without_backing_is_streamed_as_is(self):
        path = self._disk()
        _, image = self._request(path)
        events = self._events_until_final()
        types = [t for t, _ in events if t != notifications.PROGRESS]
        self.assertEqual([notifications.START, notifications.SOURCE_RELEASED,
                          notifications.END], types)
        end = events[-1][1]
        self.assertEqual('stream', end['strategy'])
        self.assertEqual(0, end['scratch_bytes'])
        self.assertEqual('active', end['image_status'])
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), self.images.images[image]['data'])
        self.assertEqual(os.path.getsize(path), end['bytes_read'])

    def test_suspended_guest_is_released_after_a_local_copy(self):
        path = self._disk()
        _, image = self._request(path, managed_save=True)
        events = self._events_until_final()
        released = next(p for t, p in events
                        if t == notifications.SOURCE_RELEASED)
        end = events[-1][1]
        self.assertEqual(notifications.END, events[-1][0])
        self.assertEqual('convert', end['strategy'])
        self.assertGreater(end['scratch_bytes'], 0)
        # Released before the upload started, not after it ended.
        self.assertEqual(0, released['bytes_uploaded'])
        self.assertEqual([], os.listdir(self.scratch))

    def test_scratch_that_cannot_be_removed_is_named_and_kept(self):
        """A cleanup that fails is not forgotten: the error says what is
        left, the journal keeps it, the next start removes it."""
        busy = mock.patch('snapworker.sources.convert.remove_scratch_dir',
                          side_effect=OSError('device busy'))
        busy.start()
        self.addCleanup(mock.patch.stopall)
        self.images.upload = mock.Mock(side_effect=OSError('glance down'))
        _, image = self._request(self._disk(), managed_save=True)
        error = self._events_until_final()[-1][1]
        workdir = os.path.join(self.scratch, f'convert-{image}')
        self.assertIn(f'Could not remove scratch_dir {workdir}: the worker '
                      f'retries at its next start.', error['error_message'])
        self.assertEqual([image], self.images.deleted)
        self.assertTrue(os.path.isdir(workdir))
        journal_dir = CONF.worker.journal_dir
        self.assertEqual([f'{image}.json'], os.listdir(journal_dir))
        busy.stop()
        self.assertEqual(0, self.manager.recover())
        self.assertEqual([], os.listdir(self.scratch))
        self.assertEqual([], os.listdir(journal_dir))

    def test_suspended_guest_streams_when_configured_to(self):
        self.conf.config(suspended_guest_plan='stream', group='worker')
        path = self._disk()
        self._request(path, managed_save=True)
        end = self._events_until_final()[-1][1]
        self.assertEqual(('stream', 0), (end['strategy'],
                                         end['scratch_bytes']))

    def test_running_instance_is_refused_and_image_deleted(self):
        path = self._disk()
        _, image = self._request(path, state='running')
        events = self._events_until_final()
        self.assertEqual([notifications.ERROR], [t for t, _ in events])
        self.assertEqual('InstanceNotShutOff', events[-1][1]['error_code'])
        self.assertIn('running', events[-1][1]['error_message'])
        self.assertEqual([image], self.images.deleted)
        self.assertEqual([], self.images.uploads)

    def test_disk_outside_instances_path_is_refused(self):
        _, image = self._request('/etc/passwd')
        events = self._events_until_final()
        self.assertEqual('DiskOutsideInstancesPath',
                         events[-1][1]['error_code'])
        self.assertEqual([image], self.images.deleted)

    def test_symlink_out_of_instances_path_is_refused(self):
        link = os.path.join(self.instances, 'disk')
        os.symlink('/etc/passwd', link)
        self._request(link)
        events = self._events_until_final()
        self.assertEqual('DiskOutsideInstancesPath',
                         events[-1][1]['error_code'])

    def test_backing_file_outside_instances_path_is_refused(self):
        outside = os.path.join(self.tmp, 'base.raw')
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'raw', outside,
                        '4M'], check=True)
        path = self._disk(backing=outside)
        self._request(path)
        events = self._events_until_final()
        self.assertEqual('DiskOutsideInstancesPath',
                         events[-1][1]['error_code'])
        self.assertIn(outside, events[-1][1]['error_message'])

    def test_image_not_queued_is_refused(self):
        path = self._disk()
        _, image = self._request(path, image_status='active')
        events = self._events_until_final()
        self.assertEqual(notifications.REFUSED, events[-1][0])
        self.assertEqual('ImageNotQueued', events[-1][1]['error_code'])
        self.assertEqual('active', events[-1][1]['image_status'])
        # Someone else's (or an earlier delivery's) image: never deleted.
        self.assertEqual([], self.images.deleted)
        self.assertEqual('active', self.images.get(image)['status'])

    def test_unknown_instance(self):
        image = uuidutils.generate_uuid()
        self.images.create(image)
        self.api.create_snapshot(self.context, HOST,
                                 uuidutils.generate_uuid(), image)
        events = self._events_until_final()
        self.assertEqual('InstanceNotFound', events[-1][1]['error_code'])
        self.assertEqual([image], self.images.deleted)

    def test_unsupported_disk_format(self):
        path = self._disk(fmt='vmdk')
        self._request(path)
        events = self._events_until_final()
        self.assertEqual('UnsupportedDisk', events[-1][1]['error_code'])
        self.assertIn('vmdk', events[-1][1]['error_message'])

    def test_requests_beyond_the_limit_wait_in_order(self):
        self._restart_with(max_concurrent=1)
        gate = threading.Event()
        self.images.upload_gate = gate
        path = self._disk()
        images = [self._request(path)[1] for _ in range(3)]
        # Only the first job may be started while the gate is closed.
        first = self.collector.events.get(timeout=10)
        self.assertEqual((notifications.START, images[0]),
                         (first[0], first[1]['image_id']))
        self.assertRaises(queue.Empty, self.collector.events.get,
                          timeout=0.5)
        gate.set()
        ends = []
        while len(ends) < 3:
            event_type, payload = self.collector.events.get(timeout=10)
            if event_type == notifications.END:
                ends.append(payload['image_id'])
        self.assertEqual(images, ends)
        self.assertEqual(images, self.images.uploads)

    def test_stop_fails_queued_jobs_and_finishes_running_ones(self):
        self._restart_with(max_concurrent=1)
        gate = threading.Event()
        self.images.upload_gate = gate
        path = self._disk()
        running = self._request(path)[1]
        queued = self._request(path)[1]
        self.assertEqual(notifications.START,
                         self.collector.events.get(timeout=10)[0])
        stopper = threading.Thread(target=self.manager.stop)
        stopper.start()
        gate.set()
        stopper.join(10)
        outcome = {}
        while len(outcome) < 2:
            event_type, payload = self.collector.events.get(timeout=10)
            if event_type in (notifications.END, notifications.ERROR):
                outcome[payload['image_id']] = (event_type,
                                                payload['error_code'])
        self.assertEqual((notifications.END, None), outcome[running])
        self.assertEqual((notifications.ERROR, 'WorkerStopping'),
                         outcome[queued])
        self.assertEqual([queued], self.images.deleted)

    def test_malformed_ids_are_dropped_without_io(self):
        self.manager.create_snapshot(self.context, 'not-a-uuid', 'nope')
        self.assertRaises(queue.Empty, self.collector.events.get,
                          timeout=0.3)
        self.assertEqual([], self.images.deleted)

    # -- what Glance stored must hash to what the worker sent ---------------

    def test_image_that_does_not_hold_what_was_sent_is_deleted(self):
        real_upload = self.images.upload

        def corrupting_upload(image_id, body, size, disk_format, store=None):
            real_upload(image_id, body, size, disk_format, store)
            # Glance's store holds a flipped byte: so do its hashes.
            data = bytearray(self.images.images[image_id]['data'])
            data[0] ^= 1
            self.images.images[image_id].update(
                checksum=hashlib.md5(data).hexdigest(),
                os_hash_value=hashlib.sha512(data).hexdigest())

        self.images.upload = corrupting_upload
        _, image = self._request(self._disk())
        events = self._events_until_final()
        self.assertEqual(('snapshot.create.error', 'ImageDataMismatch'),
                         (events[-1][0], events[-1][1]['error_code']))
        self.assertEqual([image], self.images.deleted)

    def test_verified_image_says_so(self):
        self._request(self._disk())
        events = self._events_until_final()
        self.assertEqual(notifications.END, events[-1][0])
        self.assertTrue(events[-1][1]['data_verified'])

    # -- operators: status and cancel ------------------------------------

    def test_status_and_cancel_of_queued_and_running_jobs(self):
        self._restart_with(max_concurrent=1)
        gate = threading.Event()
        self.images.upload_gate = gate
        path = self._disk(size='64M')
        running = self._request(path)[1]
        queued = self._request(path)[1]
        self.assertEqual(notifications.START,
                         self.collector.events.get(timeout=10)[0])
        admin = o_context.RequestContext(user_id='ops', project_id='p',
                                         roles=['admin'])
        status = self.manager.get_status(self.context)
        self.assertEqual((1, 1, None), (status['running'], status['queued'],
                                        status.get('jobs')))
        jobs = self.manager.get_status(admin)['jobs']
        self.assertEqual([(running, 'running'), (queued, 'queued')],
                         [(j['image_id'], j['state']) for j in jobs])
        # Only an admin may cancel.
        self.assertFalse(self.manager.cancel_snapshot(
            self.context, queued)['cancelled'])
        for image in (queued, running):
            self.assertTrue(self.manager.cancel_snapshot(
                admin, image)['cancelled'])
        gate.set()
        outcome = {}
        while len(outcome) < 2:
            event_type, payload = self.collector.events.get(timeout=10)
            if event_type in notifications.FINAL:
                outcome[payload['image_id']] = (event_type,
                                                payload['error_code'])
        for image in (running, queued):
            self.assertEqual((notifications.ERROR, 'Cancelled'),
                             outcome[image])
        self.assertEqual(sorted([running, queued]),
                         sorted(self.images.deleted))
        self.assertFalse(self.manager.cancel_snapshot(
            admin, running)['cancelled'])


    def test_a_running_stream_reports_its_reads_as_they_happen(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.images.mid_upload_gate = gate
        # Raw to raw: the stream reads the disk's data and nothing else.
        _, image = self._request(self._disk(fmt='raw', size='8M'))
        self.assertTrue(self.images.mid_upload.wait(10))
        admin = o_context.RequestContext(user_id='ops', project_id='p',
                                         roles=['admin'])
        [job] = self.manager.get_status(admin)['jobs']
        self.assertEqual(image, job['image_id'])
        self.assertGreater(job['bytes_read'], 0)
        gate.set()
        end = self._events_until_final()[-1][1]
        # Counted once: what the disk holds (1 MiB written), not twice.
        self.assertEqual(1024 * 1024, end['bytes_read'])


class PlanTestCase(ManagerTestCase):
    """``plan_snapshot`` (RPC 1.2): a snapshot's checks and choice, no I/O
    on data, nothing created, nothing sent on the notification bus."""

    def _plan(self, path, context=None, owner=fakes.PROJECT,
              target_format=None, **domain):
        instance = uuidutils.generate_uuid()
        self.hypervisor.add(instance, path=path, owner=owner,
                            fmt=self.formats.get(path), **domain)
        return instance, self.api.plan_snapshot(
            context or self.context, HOST, instance, target_format,
            timeout=10)

    def assertNothingHappened(self):
        self.assertEqual(([], [], {}), (self.images.uploads,
                                        self.images.deleted,
                                        self.images.images))
        self.assertRaises(queue.Empty, self.collector.events.get,
                          timeout=0.5)
        self.assertFalse(os.path.exists(self.scratch)
                         and os.listdir(self.scratch))

    def test_plan_names_strategy_and_reason(self):
        base = self._disk('base.raw', fmt='raw')
        path = self._disk(backing=base)
        before = os.stat(path).st_mtime_ns

        instance, plan = self._plan(path, target_format='raw')

        self.assertEqual((HOST, instance, 'stream', 'file', 'qcow2', 'raw',
                          4 * 1024 ** 2, fakes.PROJECT),
                         (plan['host'], plan['instance_uuid'],
                          plan['strategy'], plan['source_kind'],
                          plan['source_format'], plan['target_format'],
                          plan['virtual_size'], plan['instance_owner']))
        self.assertTrue(plan['reason'])
        self.assertNotIn('error_code', plan)
        self.assertEqual(before, os.stat(path).st_mtime_ns)
        self.assertNothingHappened()

    def test_suspended_guest_plans_the_local_copy(self):
        path = self._disk()
        _, plan = self._plan(path, managed_save=True)
        self.assertEqual(('convert', True),
                         (plan['strategy'], plan['managed_save']))
        self.assertNothingHappened()

    def test_forged_plan_for_another_projects_instance_is_refused(self):
        path = self._disk()
        intruder = o_context.RequestContext(user_id='x', project_id='other',
                                            roles=['member'])
        _, plan = self._plan(path, context=intruder)
        self.assertEqual('InstanceNotOwned', plan['error_code'])
        self.assertNotIn('strategy', plan)
        # An admin may look at any instance, as they may snapshot it.
        admin = o_context.RequestContext(user_id='ops', project_id='other',
                                         roles=['admin'])
        self.assertEqual('stream',
                         self._plan(path, context=admin)[1]['strategy'])
        self.assertNothingHappened()

    def test_hostile_disks_are_refused_as_a_snapshot_would_be(self):
        outside = os.path.join(self.tmp, 'base.raw')
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'raw', outside,
                        '4M'], check=True)
        link = os.path.join(self.instances, 'link')
        os.symlink('/etc/passwd', link)
        for path, code in ((self._disk(backing=outside),
                            'DiskOutsideInstancesPath'),
                           (link, 'DiskOutsideInstancesPath'),
                           (self._disk('d.vmdk', fmt='vmdk'),
                            'UnsupportedDisk')):
            _, plan = self._plan(path)
            self.assertEqual(code, plan['error_code'], plan)
        _, plan = self._plan(self._disk('up'), state='running')
        self.assertEqual('InstanceNotShutOff', plan['error_code'])
        self.conf.config(max_virtual_size=1024 ** 2, group='worker')
        _, plan = self._plan(self._disk('big'))
        self.assertEqual('DiskTooLarge', plan['error_code'])
        self.assertNothingHappened()

    def test_malformed_request_is_refused(self):
        answer = self.api.plan_snapshot(self.context, HOST, 'not-a-uuid',
                                        timeout=10)
        self.assertEqual('InvalidRequest', answer['error_code'])
        answer = self.api.plan_snapshot(
            self.context, HOST, uuidutils.generate_uuid(), 'vmdk',
            timeout=10)
        self.assertEqual('InvalidRequest', answer['error_code'])
        self.assertNothingHappened()
