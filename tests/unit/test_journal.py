"""The journal: durable records, and recovery's decisions with doubles.

The records are real files in a temporary directory; Glance, the
sources' cleanup and the notifier are doubles that note what they were
asked. tests/functional/test_crash_recovery.py kills real workers.
"""

import json
import os
import stat
import tempfile
from unittest import mock

import fixtures
import testtools
from oslo_config import fixture as config_fixture
from oslo_context import context as o_context
from oslo_utils import uuidutils

from snapworker import exception
from snapworker import glance
from snapworker import journal
from snapworker import manager
from snapworker import sources
from snapworker.conf import CONF
from snapworker.sources import base
from tests.unit import fakes

SNAP = 'vms/disk@snapworker-x'
CLONE = 'images/x'


def _context():
    ctx = o_context.RequestContext(user_id='u', project_id='p',
                                   auth_token='secret', roles=['member'])
    ctx.service_catalog = [{'type': 'image', 'endpoints': []}]
    return ctx


class JournalTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = os.path.join(self.useFixture(fixtures.TempDir()).path,
                                'journal')
        self.journal = journal.Journal(self.dir)
        self.journal.prepare()

    def _record(self, image_id=None):
        return self.journal.new_record(
            image_id or uuidutils.generate_uuid(),
            uuidutils.generate_uuid(), _context(), 'compute-1')

    def _on_disk(self, record):
        with open(os.path.join(self.dir, record.image_id + '.json')) as f:
            return json.load(f)

    def _files(self):
        return sorted(os.listdir(self.dir))


class RecordTestCase(JournalTestCase):

    def test_nothing_written_before_begin(self):
        record = self._record()
        record.track(base.SCRATCH_DIR, '/s/convert-x')
        record.finish()
        self.assertEqual([], self._files())

    def test_private_record_with_context_and_catalog(self):
        record = self._record()
        record.begin()
        self.assertEqual(0o700, stat.S_IMODE(os.stat(self.dir).st_mode))
        path = os.path.join(self.dir, record.image_id + '.json')
        self.assertEqual(0o600, stat.S_IMODE(os.stat(path).st_mode))
        data = self._on_disk(record)
        self.assertEqual('secret', data['context']['auth_token'])
        self.assertEqual([{'type': 'image', 'endpoints': []}],
                         data['context']['service_catalog'])
        self.assertEqual('compute-1', data['host'])
        self.assertFalse(data['finished'])

    def test_track_is_written_before_returning(self):
        record = self._record()
        record.begin()
        record.track(base.RBD_SNAPSHOT, SNAP)
        record.track(base.RBD_CLONE, CLONE)
        record.handed_over(base.RBD_CLONE, CLONE, to=base.GLANCE)
        self.assertEqual(
            [{'kind': 'rbd_snapshot', 'ref': SNAP, 'owner': 'job'},
             {'kind': 'rbd_clone', 'ref': CLONE, 'owner': 'glance'}],
            self._on_disk(record)['resources'])

    def test_finish_removes_the_record(self):
        record = self._record()
        record.begin()
        record.track(base.RBD_SNAPSHOT, SNAP)
        record.finish()
        self.assertEqual([], self._files())

    def test_what_cleanup_left_is_kept_and_nothing_else(self):
        record = self._record()
        record.begin()
        record.track(base.RBD_SNAPSHOT, SNAP)
        record.track(base.RBD_CLONE, CLONE)
        record.handed_over(base.RBD_CLONE, CLONE, to=base.GLANCE)
        record.track(base.SCRATCH_DIR, '/s/convert-x')
        record.finish(keep=[(base.RBD_SNAPSHOT, SNAP)])
        data = self._on_disk(record)
        self.assertTrue(data['finished'])
        self.assertEqual([{'kind': 'rbd_snapshot', 'ref': SNAP,
                           'owner': 'job'}], data['resources'])

    def test_a_failed_registration_left_behind_is_the_jobs_again(self):
        # Handed to Glance, then the registration failed and so did the
        # removal: no image owns it, the next start must remove it.
        record = self._record()
        record.begin()
        record.track(base.RBD_IMAGE, CLONE)
        record.handed_over(base.RBD_IMAGE, CLONE, to=base.GLANCE)
        self.assertTrue(record.finish(keep=[(base.RBD_IMAGE, CLONE)]))
        self.assertEqual([{'kind': 'rbd_image', 'ref': CLONE,
                           'owner': 'job'}],
                         self._on_disk(record)['resources'])

    def test_a_cleanup_that_said_nothing_keeps_all_the_job_owned(self):
        record = self._record()
        record.begin()
        record.track(base.RBD_SNAPSHOT, SNAP)
        record.track(base.RBD_CLONE, CLONE)
        record.handed_over(base.RBD_CLONE, CLONE, to=base.GLANCE)
        record.finish(keep=journal.EVERYTHING)
        self.assertEqual([SNAP], [e['ref'] for e in
                                  self._on_disk(record)['resources']])

    def test_second_job_for_same_image_is_refused(self):
        first = self._record()
        first.begin()
        second = self._record(first.image_id)
        self.assertRaises(exception.SnapshotInProgress, second.begin)
        second.finish()
        self.assertEqual([first.image_id + '.json'], self._files())

    def test_unwritable_journal_is_a_journal_error(self):
        record = self._record()
        with mock.patch('os.open', side_effect=PermissionError('denied')):
            e = self.assertRaises(exception.JournalError, record.begin)
        self.assertIn('denied', str(e))

    def test_background_work_keeps_the_record_until_done(self):
        record = self._record()
        record.begin()
        record.track(base.RBD_SNAPSHOT, SNAP)
        record.track(base.RBD_CLONE, CLONE)
        record.handed_over(base.RBD_CLONE, CLONE, to=base.GLANCE)
        done = record.handed_over(base.RBD_SNAPSHOT, SNAP,
                                  to=base.FLATTENER, clone=CLONE)
        record.finish()
        data = self._on_disk(record)
        self.assertTrue(data['finished'])
        self.assertEqual(
            [{'kind': 'rbd_snapshot', 'ref': SNAP, 'owner': 'flattener',
              'details': {'clone': CLONE}}], data['resources'])
        done()
        self.assertEqual([], self._files())

    def test_background_done_before_the_job_ends(self):
        record = self._record()
        record.begin()
        done = record.handed_over(base.RBD_SNAPSHOT, SNAP,
                                  to=base.FLATTENER, clone=CLONE)
        done()
        self.assertEqual([], self._on_disk(record)['resources'])
        record.finish()
        self.assertEqual([], self._files())


class AtomicWriteTestCase(JournalTestCase):

    def test_failed_update_keeps_the_previous_record(self):
        record = self._record()
        record.begin()
        record.track(base.RBD_SNAPSHOT, SNAP)
        with mock.patch('os.fsync', side_effect=OSError('disk gone')):
            self.assertRaises(exception.JournalError, record.track,
                              base.RBD_CLONE, CLONE)
        self.assertEqual([record.image_id + '.json'], self._files())
        self.assertEqual([SNAP], [e['ref'] for e in
                                  self._on_disk(record)['resources']])

    def test_record_replaced_by_rename_after_fsync(self):
        record = self._record()
        record.begin()
        calls = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            calls.append('fsync')
            return real_fsync(fd)

        def replace(src, dst):
            calls.append(('replace', os.path.basename(dst)))
            self.assertTrue(src.endswith('.tmp'))
            return real_replace(src, dst)

        with mock.patch('os.fsync', fsync), \
                mock.patch('os.replace', replace):
            record.track(base.RBD_SNAPSHOT, SNAP)
        # File data, then the rename, then the directory entry.
        self.assertEqual(['fsync', ('replace', record.image_id + '.json'),
                          'fsync'], calls)

    def test_prepare_drops_half_written_files(self):
        record = self._record()
        record.begin()
        tmp = os.path.join(self.dir, record.image_id + '.json.abc.tmp')
        with open(tmp, 'w') as f:
            f.write('{"torn')
        self.journal.prepare()
        self.assertEqual([record.image_id + '.json'], self._files())


class RecordsTestCase(JournalTestCase):

    def test_unreadable_records_are_set_aside(self):
        good = self._record()
        good.begin()
        bad = uuidutils.generate_uuid()
        with open(os.path.join(self.dir, bad + '.json'), 'w') as f:
            f.write('{"torn')
        other = uuidutils.generate_uuid()
        with open(os.path.join(self.dir, other + '.json'), 'w') as f:
            json.dump({'image_id': 'someone else'}, f)
        with open(os.path.join(self.dir, 'README'), 'w') as f:
            f.write('not a record')
        found = self.journal.records()
        self.assertEqual([good.image_id], [r.image_id for r in found])
        self.assertIn(bad + '.json.corrupt', self._files())
        self.assertIn(other + '.json.corrupt', self._files())
        self.assertIn('README', self._files())

    def test_oversized_record_is_set_aside(self):
        image_id = uuidutils.generate_uuid()
        with open(os.path.join(self.dir, image_id + '.json'), 'wb') as f:
            f.write(b' ' * (journal._MAX_RECORD_BYTES + 1))
        self.assertEqual([], self.journal.records())

    def test_oldest_first(self):
        records = [self._record() for _ in range(3)]
        for i, record in enumerate(records):
            record.data['started_at'] = f'2024-01-0{3 - i}T00:00:00'
            record.begin()
        self.assertEqual([r.image_id for r in reversed(records)],
                         [r.image_id for r in self.journal.records()])


class _Images:
    """Glance double: one image's status; what was deleted."""

    def __init__(self, status='saving', get_error=None, delete_ok=True,
                 owner='p'):
        self.status = status
        self.owner = owner
        self.get_error = get_error
        self.delete_ok = delete_ok
        self.deleted = []
        self.contexts = []

    def __call__(self, context):
        self.contexts.append(context)
        return self

    def get(self, image_id):
        if self.get_error:
            raise self.get_error
        if self.status is None:
            raise exception.ImageNotFound(image_id=image_id)
        return {'id': image_id, 'status': self.status, 'owner': self.owner}

    def claim(self, image_id, project_id):
        return glance.check_claim(self.get(image_id), project_id)

    def delete(self, image_id, retries=True):
        self.deleted.append(image_id)
        return self.delete_ok


class RecoveryTestCase(JournalTestCase):

    def setUp(self):
        super().setUp()
        self.images = _Images()
        self.undone = []
        self.undo_errors = {}
        self.resumed = []
        self.reports = []

    def _undo(self, kind, ref):
        if ref in self.undo_errors:
            raise self.undo_errors.pop(ref)
        self.undone.append(ref)

    def _resume(self, record, entry, done):
        self.resumed.append((entry['owner'], entry['ref'], done))

    def _report(self, record, outcome, image_status):
        self.reports.append((record.image_id, image_status, outcome))

    def _recover(self):
        return journal.Recovery(self.journal, self.images, self._undo,
                                self._resume, self._report).run()

    def _interrupted_clone(self, registered=True, flattening=False):
        """A clone job's record as a crash left it."""
        record = self._record()
        record.begin()
        record.claim_image()
        record.track(base.RBD_SNAPSHOT, SNAP)
        record.track(base.RBD_CLONE, CLONE)
        if registered:
            record.handed_over(base.RBD_CLONE, CLONE, to=base.GLANCE)
        if flattening:
            record.handed_over(base.RBD_SNAPSHOT, SNAP, to=base.FLATTENER,
                               clone=CLONE)
        return record

    def test_half_uploaded_image_deleted_and_scratch_removed(self):
        record = self._record()
        record.begin()
        record.claim_image()
        record.track(base.SCRATCH_DIR, '/scratch/convert-x')
        self.assertEqual(0, self._recover())
        self.assertEqual([record.image_id], self.images.deleted)
        self.assertEqual(['/scratch/convert-x'], self.undone)
        self.assertEqual('secret', self.images.contexts[0]['auth_token'])
        [(image_id, status, outcome)] = self.reports
        self.assertEqual((record.image_id, 'deleted'), (image_id, status))
        self.assertIn('deleted the unfinished image', outcome)
        self.assertIn('scratch_dir /scratch/convert-x', outcome)
        self.assertEqual([], self._files())

    def test_leftovers_of_a_finished_job_removed_image_untouched(self):
        record = self._record()
        record.begin()
        record.claim_image()
        record.track(base.RBD_SNAPSHOT, SNAP)
        record.track(base.RBD_CLONE, CLONE)
        record.handed_over(base.RBD_CLONE, CLONE, to=base.GLANCE)
        record.finish(keep=[(base.RBD_SNAPSHOT, SNAP)])
        self.undo_errors[SNAP] = OSError('cluster unreachable')
        # Still there: kept for the next start, nothing else done.
        self.assertEqual(1, self._recover())
        self.assertEqual([record.image_id + '.json'], self._files())
        self.assertEqual(0, self._recover())
        self.assertEqual([SNAP], self.undone)
        self.assertEqual([], self._files())
        # The job reported its own ending: no image touched, no report.
        self.assertEqual([], self.images.contexts)
        self.assertEqual([], self.reports)

    def test_background_work_resumed_while_a_leftover_stays(self):
        record = self._record()
        record.begin()
        record.claim_image()
        record.track(base.RBD_IMAGE, CLONE)
        record.handed_over(base.GLANCE_IMAGE, record.image_id,
                           to=base.REAPER)
        record.finish(keep=[(base.RBD_IMAGE, CLONE)])
        self.undo_errors[CLONE] = OSError('cluster unreachable')
        self.assertEqual(1, self._recover())
        # The reaper goes on (Glance's image) although Ceph is down.
        self.assertEqual([('reaper', record.image_id)],
                         [(o, r) for o, r, _ in self.resumed])
        self.resumed[0][2]()  # the reaper is done
        self.assertEqual([record.image_id + '.json'], self._files())
        self.assertEqual(0, self._recover())
        self.assertEqual([CLONE], self.undone)
        self.assertEqual([], self._files())

    def test_unregistered_clone_removed_before_its_snapshot(self):
        self._interrupted_clone(registered=False)
        self._recover()
        self.assertEqual([CLONE, SNAP], self.undone)
        self.assertEqual(1, len(self.images.deleted))

    def test_active_image_keeps_the_clone_glance_owns(self):
        self._interrupted_clone(registered=True)
        self.images.status = 'active'
        self.assertEqual(0, self._recover())
        self.assertEqual([], self.images.deleted)
        self.assertEqual([SNAP], self.undone)
        self.assertEqual('active', self.reports[0][1])
        self.assertIn('kept the image', self.reports[0][2])
        self.assertEqual([], self._files())

    def test_inactive_image_takes_the_registered_clone_with_it(self):
        self._interrupted_clone(registered=True)
        self.images.status = 'queued'
        self._recover()
        self.assertEqual([CLONE, SNAP], self.undone)
        self.assertEqual(1, len(self.images.deleted))

    def test_image_gone_already(self):
        self._interrupted_clone(registered=True)
        self.images.status = None
        self.assertEqual(0, self._recover())
        self.assertEqual([], self.images.deleted)
        self.assertEqual([CLONE, SNAP], self.undone)
        self.assertEqual('deleted', self.reports[0][1])

    def test_glance_unreachable_hands_the_image_to_the_reaper(self):
        record = self._interrupted_clone(registered=True)
        self.images.get_error = exception.GlanceError(image_id='x',
                                                      reason='401')
        self.assertEqual(0, self._recover())
        # What the job alone owned goes; the image (and the clone Glance
        # owns with it) is settled in the background, reported once.
        self.assertEqual([SNAP], self.undone)
        [(image_id, status, outcome)] = self.reports
        self.assertEqual((record.image_id, None), (image_id, status))
        self.assertIn('deleted in the background', outcome)
        [(owner, ref, done)] = self.resumed
        self.assertEqual(('reaper', record.image_id), (owner, ref))
        entry = self._on_disk(record)['resources'][0]
        self.assertEqual({'keep_if_active': True}, entry['details'])
        done()
        self.assertEqual([], self._files())

    def test_failed_delete_keeps_the_record_until_the_reaper_is_done(self):
        self._interrupted_clone(registered=False)
        self.images.delete_ok = False
        self.assertEqual(0, self._recover())
        self.assertEqual(1, len(self.reports))
        self.assertEqual(1, len(self._files()))
        [(owner, _ref, done)] = self.resumed
        self.assertEqual('reaper', owner)
        done()
        self.assertEqual([], self._files())

    def test_failed_cleanup_reported_once_and_retried(self):
        record = self._interrupted_clone(registered=False)
        self.undo_errors[SNAP] = exception.RbdError(
            operation='cleanup', target=SNAP, reason='ceph down')
        self.assertEqual(1, self._recover())
        self.assertIn('could not yet remove rbd_snapshot', self.reports[0][2])
        data = self._on_disk(record)
        self.assertTrue(data['reported'])
        self.assertEqual([SNAP], [e['ref'] for e in data['resources']])
        self.assertEqual(0, self._recover())
        self.assertEqual([CLONE, SNAP], self.undone)
        self.assertEqual(1, len(self.reports))
        self.assertEqual([], self._files())

    def test_queued_flatten_is_resumed_and_record_kept_until_done(self):
        self._interrupted_clone(registered=True, flattening=True)
        self.images.status = 'active'
        self.assertEqual(0, self._recover())
        self.assertEqual([], self.undone)
        [(owner, ref, done)] = self.resumed
        self.assertEqual(('flattener', SNAP), (owner, ref))
        self.assertEqual(1, len(self._files()))
        done()
        self.assertEqual([], self._files())

    def test_finished_job_with_pending_flatten_only_resumes(self):
        record = self._interrupted_clone(registered=True, flattening=True)
        record.finish()
        self._recover()
        self.assertEqual([], self.images.contexts)
        self.assertEqual([], self.reports)
        self.assertEqual(1, len(self.resumed))

    def test_one_bad_record_does_not_stop_the_others(self):
        first = self._record()
        first.data['started_at'] = '2024-01-01T00:00:00'
        first.begin()
        first.claim_image()
        second = self._record()
        second.begin()
        second.claim_image()

        def images(context):
            if not self.images.contexts:
                self.images.contexts.append(context)
                raise RuntimeError('boom')
            return self.images

        recovery = journal.Recovery(self.journal, images, self._undo,
                                    self._resume, self._report)
        self.assertEqual(1, recovery.run())
        self.assertEqual([second.image_id], self.images.deleted)

    def test_record_of_another_host_is_left_alone(self):
        record = self._record()
        record.begin()
        record.claim_image()
        recovery = journal.Recovery(self.journal, self.images, self._undo,
                                    self._resume, self._report,
                                    host='compute-2')
        self.assertEqual(1, recovery.run())
        self.assertEqual([], self.images.contexts)
        self.assertEqual([record.image_id + '.json'], self._files())

    def test_unreadable_journal_directory(self):
        os.rmdir(self.dir)
        self.assertIsNone(self._recover())


class _Notifier:
    def __init__(self):
        self.sent = []

    def info(self, context, event_type, payload):
        self.sent.append((event_type, payload))

    def error(self, context, event_type, payload):
        self.sent.append((event_type, payload))


class ManagerRecoveryTestCase(testtools.TestCase):
    """The manager's wiring: real sources' cleanup, fake Glance."""

    def setUp(self):
        super().setUp()
        tmp = self.useFixture(fixtures.TempDir()).path
        self.scratch = os.path.join(tmp, 'scratch')
        self.conf = self.useFixture(config_fixture.Config(CONF))
        self.conf.config(host='compute-1', scratch_dir=self.scratch,
                         instances_path=os.path.join(tmp, 'instances'))
        self.conf.config(journal_dir=os.path.join(tmp, 'journal'),
                         group='worker')
        self.images = fakes.FakeImageService()
        self.notifier = _Notifier()
        self.manager = manager.SnapshotManager(
            CONF, self.notifier, hypervisor_api=fakes.FakeHypervisor(),
            image_service_factory=self.images)
        self.addCleanup(self.manager.stop)

    def test_crashed_convert_is_cleaned_up_and_reported(self):
        image_id = uuidutils.generate_uuid()
        instance = uuidutils.generate_uuid()
        self.images.create(image_id, status='saving')
        record = self.manager._journal.new_record(image_id, instance,
                                                  _context(), 'compute-1')
        record.begin()
        record.claim_image()
        workdir = os.path.join(self.scratch, f'convert-{image_id}')
        record.track(base.SCRATCH_DIR, workdir)
        os.makedirs(workdir)
        open(os.path.join(workdir, 'image.qcow2'), 'w').close()

        self.assertEqual(0, self.manager.recover())
        self.assertEqual([], os.listdir(self.scratch))
        self.assertEqual([image_id], self.images.deleted)
        [(event_type, payload)] = self.notifier.sent
        data = payload['snapworker_object.data']
        self.assertEqual('snapshot.create.error', event_type)
        self.assertEqual('WorkerRestarted', data['error_code'])
        self.assertEqual(instance, data['instance_uuid'])
        self.assertEqual('deleted', data['image_status'])
        self.assertIn(workdir, data['error_message'])
        self.assertEqual([], os.listdir(CONF.worker.journal_dir))

    def test_interrupted_job_with_an_active_image_ends_as_success(self):
        image_id = uuidutils.generate_uuid()
        self.images.create(image_id, status='active')
        record = self.manager._journal.new_record(
            image_id, uuidutils.generate_uuid(), _context(), 'compute-1')
        record.begin()
        record.claim_image()

        self.assertEqual(0, self.manager.recover())
        self.assertEqual([], self.images.deleted)
        [(event_type, payload)] = self.notifier.sent
        data = payload['snapworker_object.data']
        self.assertEqual('snapshot.create.end', event_type)
        self.assertEqual('active', data['image_status'])
        self.assertIn('recovered after a restart', data['plan_reason'])

    def test_scratch_path_outside_scratch_dir_is_refused(self):
        outside = self.useFixture(fixtures.TempDir()).path
        self.assertRaises(ValueError, sources.remove_leftover, CONF,
                          base.SCRATCH_DIR, outside)
        self.assertTrue(os.path.isdir(outside))
        self.assertRaises(ValueError, sources.remove_leftover, CONF,
                          base.SCRATCH_DIR,
                          os.path.join(self.scratch, 'other'))

    def test_unknown_kind_is_refused(self):
        self.assertRaises(ValueError, sources.remove_leftover, CONF,
                          'lvm_snapshot', 'vg/lv')


class FilesystemTypeTestCase(testtools.TestCase):
    """Which filesystem a journal directory is (or would be) on."""

    def mountinfo(self, *mounts):
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.unlink, path)
        with os.fdopen(fd, 'w') as f:
            for i, (point, fstype) in enumerate(mounts):
                f.write(f'{20 + i} 1 0:{i} / {point} rw,relatime - '
                        f'{fstype} src rw\n')
        return path

    def test_longest_mount_point_decides(self):
        info = self.mountinfo(('/', 'ext4'), ('/var/lib', 'xfs'),
                              ('/var/lib/snap\\040dir', 'tmpfs'))
        self.assertEqual('xfs', journal.filesystem_type(
            '/var/lib/snapworker/journal', info))
        self.assertEqual('tmpfs', journal.filesystem_type(
            '/var/lib/snap dir/journal', info))
        self.assertEqual('ext4', journal.filesystem_type(
            '/var/library', info))

    def test_a_later_mount_over_the_same_point_wins(self):
        info = self.mountinfo(('/', 'ext4'), ('/srv', 'ext4'),
                              ('/srv', 'tmpfs'))
        self.assertEqual('tmpfs', journal.filesystem_type('/srv/j', info))

    def test_no_mountinfo(self):
        self.assertIsNone(journal.filesystem_type('/', '/nonexistent'))

class ProbeTestCase(testtools.TestCase):

    def test_probe_writes_nothing_that_stays(self):
        directory = self.useFixture(fixtures.TempDir()).path
        opened = []
        real_open = os.open
        self.useFixture(fixtures.MockPatch(
            'os.open', side_effect=lambda path, *a: opened.append(path)
            or real_open(path, *a)))
        journal.Journal(directory).probe()
        self.assertEqual([], os.listdir(directory))
        # The probe file has the suffix prepare() drops after a crash.
        self.assertTrue(opened[0].endswith('.tmp'), opened)

    def test_probe_of_a_missing_directory_raises(self):
        directory = self.useFixture(fixtures.TempDir()).path
        self.assertRaises(OSError, journal.Journal(
            os.path.join(directory, 'gone')).probe)
