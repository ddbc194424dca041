"""Durable record of in-flight work, for crash recovery and cleanup.

oslo.messaging acknowledges a cast before it dispatches it, so a worker
that is killed mid-snapshot (SIGKILL, the OOM killer, a host crash) loses
the request and everything the job knew: its scratch directory, the RBD
snapshot on the instance disk, the half-uploaded Glance image. The journal
keeps that knowledge on disk, one small JSON file per snapshot in progress,
``<[worker] journal_dir>/<image id>.json``::

    {"version": 1,
     "image_id": "<image id>", "instance_uuid": "<uuid>",
     "host": "compute-1", "started_at": "2024-05-01T10:00:00.000000",
     "context": {...RequestContext.to_dict(), "service_catalog": [...]},
     "finished": false, "reported": false, "image_owned": true,
     "resources": [
         {"kind": "rbd_snapshot", "owner": "job",
          "ref": "vms/<uuid>_disk@snapworker-<image id>"},
         {"kind": "rbd_clone", "owner": "glance",
          "ref": "images/<image id>"}]}

A record is written when the request is accepted, before it waits for a
slot, so a second delivery of the same request is recognised and a request
lost in a crash before it started still gets its ending. ``image_owned``
turns true once the job has claimed the image (``glance.claim``): only
then may the image be deleted on its behalf.

A resource is added *before* it is created (a crash in between leaves an
entry for something that does not exist, which recovery tolerates; the
other order could leave something that no entry names). Its ``owner``
says who must remove it:

``job``
    The job made it and still owns it: recovery removes it. A job that
    ends keeps in its record only what its cleanup could not remove
    (``finish(keep=...)``), for the next start to retry.
``glance``
    Handed to Glance as the image's data (a registered location): kept
    with an active image, removed with an image that recovery deletes.
anything else, e.g. ``flattener``
    Handed to background work of the worker that outlives the job. The
    record outlives the job until that work reports it done; recovery
    resumes it.

Each write goes to a temporary file that is fsynced and then renamed over
the record (the first one is linked, so that a second job for the same
image is refused), and the directory is fsynced: a record is always
either the old or the new version, never a torn one.

``Recovery`` runs when the worker starts, before it takes requests. This
module decides *what* to do with each record; the callables it is given
do the I/O (Glance, the sources' cleanup functions, notifications), so
that it imports neither librbd nor glanceclient.
"""

import functools
import json
import os
import threading

from oslo_log import log as logging
from oslo_utils import timeutils
from oslo_utils import units
from oslo_utils import uuidutils

from snapworker import exception

LOG = logging.getLogger(__name__)

VERSION = 1
#: Owners (see the module docstring); any other owner is background work.
JOB = 'job'
GLANCE = 'glance'
#: The background deletion of an image (reaper.py; sources.base names).
REAPER = 'reaper'
GLANCE_IMAGE = 'glance_image'
#: Records hold a few resources and a request context (with its service
#: catalog); anything bigger is not a record this worker wrote.
_MAX_RECORD_BYTES = units.Mi
#: ``Record.finish(keep=EVERYTHING)``: the job's cleanup did not say what
#: it removed, so every resource it still owned is kept.
EVERYTHING = object()
_SUFFIX = '.json'
_TMP_SUFFIX = '.tmp'
_ASIDE_SUFFIX = '.corrupt'


#: Filesystems whose content is gone after a reboot: a journal there
#: cannot do its one job, cleaning up after a host crash.
VOLATILE_FILESYSTEMS = frozenset({'tmpfs', 'ramfs', 'devtmpfs'})
_MOUNTINFO = '/proc/self/mountinfo'


def filesystem_type(path, mountinfo=_MOUNTINFO):
    """The type (``ext4``, ``tmpfs`` ...) of the filesystem holding ``path``.

    ``path`` need not exist: the mount point that is the longest prefix
    of its real path decides, which is where it would be created.
    Returns None when no mount is listed (no /proc).
    """
    real = os.path.realpath(path)
    best, best_type = '', None
    try:
        with open(mountinfo) as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in lines:
        fields, _, rest = line.partition(' - ')
        mount_point = _unescape(fields.split()[4])
        inside = (real == mount_point or mount_point == '/'
                  or real.startswith(mount_point + '/'))
        # Later lines are mounts over earlier ones: >= keeps the last.
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, rest.split()[0]
    return best_type


def _unescape(field):
    """mountinfo writes space, tab, newline and backslash as octal."""
    for code, char in (('\\040', ' '), ('\\011', '\t'),
                       ('\\012', '\n'), ('\\134', '\\')):
        field = field.replace(code, char)
    return field


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _context_dict(context):
    """What recovery needs to talk to Glance as the requesting user.

    ``to_dict()`` leaves out the service catalog, which is where the
    worker finds Glance without ``[glance] endpoint_override``.
    """
    data = dict(context.to_dict())
    data['service_catalog'] = list(
        getattr(context, 'service_catalog', None) or [])
    return data


class Journal:
    """The journal directory: creates, lists and removes records."""

    def __init__(self, directory):
        self.directory = directory

    def prepare(self):
        """Create the directory (0700) and drop half-written files.

        Raises OSError when the directory cannot be used: a worker that
        cannot journal should not start (see JournalError).
        """
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        for name in os.listdir(self.directory):
            if name.endswith(_TMP_SUFFIX):
                os.unlink(os.path.join(self.directory, name))

    def probe(self):
        """Write, fsync and remove a scratch file the way records are written.

        For ``snapworker-status upgrade check``: proves the directory takes
        a durable write from this user without creating a record. The
        file has the temporary suffix, so a probe interrupted half-way is
        dropped by the next ``prepare()``.

        :raises OSError: the directory cannot take a record.
        """
        path = os.path.join(self.directory,
                            f'probe.{uuidutils.generate_uuid()}{_TMP_SUFFIX}')
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b'{}')
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(path)
        _fsync_dir(self.directory)

    def new_record(self, image_id, instance_uuid, context, host):
        """A record for one job; nothing is written until ``begin()``."""
        return Record(self, {
            'version': VERSION,
            'image_id': image_id,
            'instance_uuid': instance_uuid,
            'host': host,
            'started_at': timeutils.utcnow().isoformat(),
            'context': _context_dict(context),
            'finished': False,
            'reported': False,
            'image_owned': False,
            'resources': [],
        })

    def records(self):
        """Records left in the directory, oldest job first.

        A file that is not a readable record is renamed ``*.corrupt``
        (kept for the operator, never read again) rather than retried at
        every start.
        """
        found = []
        for name in os.listdir(self.directory):
            image_id = name[:-len(_SUFFIX)]
            if not (name.endswith(_SUFFIX)
                    and uuidutils.is_uuid_like(image_id)):
                continue
            try:
                data = self._load(image_id)
            except (OSError, ValueError) as e:
                LOG.error('Journal record %s is unreadable (%s); set aside '
                          'as %s%s', name, e, name, _ASIDE_SUFFIX)
                self._set_aside(name)
                continue
            found.append(Record(self, data, written=True))
        return sorted(found, key=lambda r: r.data.get('started_at') or '')

    # -- file I/O ------------------------------------------------------------

    def _path(self, image_id):
        return os.path.join(self.directory, image_id + _SUFFIX)

    def _load(self, image_id):
        with open(self._path(image_id), 'rb') as f:
            raw = f.read(_MAX_RECORD_BYTES + 1)
        if len(raw) > _MAX_RECORD_BYTES:
            raise ValueError(f'larger than {_MAX_RECORD_BYTES} bytes')
        data = json.loads(raw)
        if not (isinstance(data, dict) and data.get('image_id') == image_id
                and isinstance(data.get('resources'), list)
                and isinstance(data.get('context'), dict)):
            raise ValueError('not a snapworker journal record')
        return data

    def write(self, image_id, data, exclusive=False):
        """Replace the record atomically and durably.

        :param exclusive: fail with FileExistsError if a record for the
            image exists (a job is already running for it).
        """
        raw = json.dumps(data, sort_keys=True).encode()
        if len(raw) > _MAX_RECORD_BYTES:
            raise OSError(f'record of {len(raw)} bytes exceeds '
                          f'{_MAX_RECORD_BYTES}')
        path = self._path(image_id)
        tmp = f'{path}.{uuidutils.generate_uuid()}{_TMP_SUFFIX}'
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.write(fd, raw)
                os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                os.link(tmp, path)
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(self.directory)

    def remove(self, image_id):
        try:
            os.unlink(self._path(image_id))
        except FileNotFoundError:
            return
        _fsync_dir(self.directory)

    def _set_aside(self, name):
        path = os.path.join(self.directory, name)
        try:
            os.replace(path, path + _ASIDE_SUFFIX)
        except OSError:
            LOG.exception('Could not set %s aside', path)


class Record:
    """The journal record of one job; every change is written at once.

    Thread-safe: the job's thread and background work (the RBD
    flattener) update it concurrently.
    """

    def __init__(self, journal, data, written=False):
        self._journal = journal
        self.data = data
        self._written = written
        self._lock = threading.Lock()

    @property
    def image_id(self):
        return self.data['image_id']

    @property
    def instance_uuid(self):
        return self.data.get('instance_uuid')

    @property
    def context(self):
        return self.data['context']

    @property
    def finished(self):
        return bool(self.data.get('finished'))

    @property
    def reported(self):
        return bool(self.data.get('reported'))

    @property
    def image_owned(self):
        # Records of earlier releases were written only once the job had
        # checked its image: theirs is owned.
        return bool(self.data.get('image_owned', True))

    @property
    def resources(self):
        with self._lock:
            return [dict(entry) for entry in self.data['resources']]

    # -- the job's side ----------------------------------------------------

    def begin(self):
        """Write the record as the job starts.

        :raises SnapshotInProgress: a record for this image exists.
        :raises JournalError: the record could not be written.
        """
        with self._lock:
            try:
                self._journal.write(self.image_id, self.data, exclusive=True)
            except FileExistsError:
                raise exception.SnapshotInProgress(
                    image_id=self.image_id) from None
            except OSError as e:
                raise exception.JournalError(image_id=self.image_id,
                                             reason=str(e)) from e
            self._written = True

    def claim_image(self):
        """The job claimed its image: a failure may now delete it."""
        with self._lock:
            if not self._written:
                return
            self.data['image_owned'] = True
            self._save()

    def track(self, kind, ref):
        """Note a resource the job is about to create (owner ``job``)."""
        self._set_owner(kind, ref, JOB, {})

    def handed_over(self, kind, ref, to, **details):
        """Note that ``to`` owns the resource from now on.

        :returns: for background owners, the callable that work calls
            once it has finished with the resource; a no-op otherwise.
        """
        self._set_owner(kind, ref, to, details)
        if to in (JOB, GLANCE):
            return _noop
        return functools.partial(self._background_done, kind, ref)

    def finish(self, keep=()):
        """The job ended: remove the record unless something is pending.

        Pending are the resources background work holds (recovery resumes
        it) and the resources in ``keep``: what the job's cleanup could
        not remove, the job's again even if it had been handed to Glance
        (a registration that failed), for recovery to remove.

        :param keep: ``[(kind, ref)]``, or ``EVERYTHING`` the job owned.
        :returns: whether the record is as asked on disk (written, or
            removed when nothing is pending); a failure is logged.
        """
        kept = set() if keep is EVERYTHING else {tuple(k) for k in keep}

        def pending(entry):
            if (entry['kind'], entry['ref']) in kept:
                entry['owner'] = JOB
                return True
            if entry.get('owner') == JOB:
                return keep is EVERYTHING
            return entry.get('owner') != GLANCE

        with self._lock:
            if not self._written:
                return True
            self.data['finished'] = True
            self.data['resources'] = [
                e for e in self.data['resources'] if pending(e)]
            return self._persist_quietly()

    # -- recovery's side ---------------------------------------------------

    def mark_reported(self):
        """The error notification for the interrupted job was sent."""
        with self._lock:
            self.data['reported'] = True
            self._save()

    def forget(self, entry):
        """The resource is gone (recovery removed it)."""
        with self._lock:
            self._remove_entry(entry['kind'], entry['ref'])
            self._save()

    def done_callback(self, entry):
        return functools.partial(self._background_done, entry['kind'],
                                 entry['ref'])

    # -- helpers -----------------------------------------------------------

    def _set_owner(self, kind, ref, owner, details):
        with self._lock:
            if not self._written:
                return
            entry = self._find(kind, ref)
            if entry is None:
                entry = {'kind': kind, 'ref': ref}
                self.data['resources'].append(entry)
            entry['owner'] = owner
            if details:
                entry['details'] = details
            self._save()

    def _background_done(self, kind, ref):
        """Called from background work: logs, never raises."""
        with self._lock:
            self._remove_entry(kind, ref)
            self._persist_quietly()

    def _persist_quietly(self):
        """Save, or remove once the job ended and nothing is pending;
        return whether that worked (a failure is logged)."""
        try:
            if self.finished and not self.data['resources']:
                self._journal.remove(self.image_id)
                self._written = False
            else:
                self._journal.write(self.image_id, self.data)
        except OSError:
            LOG.exception('Could not update the journal record of image %s',
                          self.image_id)
            return False
        return True

    def _save(self):
        try:
            self._journal.write(self.image_id, self.data)
        except OSError as e:
            raise exception.JournalError(image_id=self.image_id,
                                         reason=str(e)) from e

    def _find(self, kind, ref):
        for entry in self.data['resources']:
            if entry['kind'] == kind and entry['ref'] == ref:
                return entry
        return None

    def _remove_entry(self, kind, ref):
        self.data['resources'] = [
            e for e in self.data['resources']
            if not (e['kind'] == kind and e['ref'] == ref)]


def _noop():
    pass


class Recovery:
    """Cleans up after the jobs of a worker that did not stop cleanly.

    For every record (oldest first) of a job that had not finished:

    1. the image: kept if Glance says it is active (its data is complete
       and registered), deleted otherwise, as a failed job would;
    2. resources owned by the job are removed, newest first (a clone
       before the snapshot it was made from), and so are the ones handed
       to Glance when the image was deleted;
    3. one ``snapshot.create.error`` (``WorkerRestarted``) says what
       happened.

    A job that did finish keeps in its record only what its cleanup could
    not remove (its own ending already reported that): those are removed,
    nothing else is touched. Then, for any record, background work that
    was handed resources is resumed, and the record is removed once
    nothing is left. Whatever fails is logged and stays in the record for
    the next start; recovery never raises.

    :param images: ``images(context_dict)`` -> object with ``get`` and
        ``delete`` (``glance.ImageService``).
    :param undo: ``undo(kind, ref)`` removes one resource, gone already
        being success; raises on failure.
    :param resume: ``resume(record, entry, done)`` restarts background
        work on a resource; it calls ``done()`` when finished. An image
        that recovery cannot settle (Glance does not answer) is handed to
        such work too: an entry ``{'kind': 'glance_image', 'ref': <image
        id>, 'owner': 'reaper', 'details': {'keep_if_active': true}}``.
    :param report: ``report(record, outcome, image_status)`` sends the
        error notification; ``outcome`` says what recovery did.
    :param host: this worker's host; a record written by another host (a
        journal directory shared by mistake) is left alone, since that
        worker may still be running the job.
    """

    def __init__(self, journal, images, undo, resume, report, host=None):
        self._journal = journal
        self._images = images
        self._undo = undo
        self._resume = resume
        self._report = report
        self._host = host

    def run(self):
        """Recover every record; return how many are still left."""
        try:
            records = self._journal.records()
        except OSError:
            LOG.exception('Cannot read the journal in %s',
                          self._journal.directory)
            return None
        left = 0
        for record in records:
            try:
                done = self._recover(record)
            except Exception:
                LOG.exception('Recovery of the snapshot into image %s '
                              'failed; retried at the next start',
                              record.image_id)
                done = False
            left += not done
        if records:
            LOG.info('Recovered %d of %d interrupted snapshot(s)',
                     len(records) - left, len(records))
        return left

    def _recover(self, record):
        if self._host and record.data.get('host') != self._host:
            LOG.warning('Journal record of image %s was written by host %s, '
                        'not %s; left alone', record.image_id,
                        record.data.get('host'), self._host)
            return False
        if not record.finished:
            LOG.warning('Snapshot of %s into image %s (started %s) was '
                        'interrupted by a worker restart; cleaning up',
                        record.instance_uuid, record.image_id,
                        record.data.get('started_at'))
            status = self._settle_image(record)
            # Glance did not answer about an image the job had claimed:
            # settle it in the background, not only at the next start.
            pending = status is None and record.image_owned
            if pending:
                record.handed_over(GLANCE_IMAGE, record.image_id, REAPER,
                                   keep_if_active=True)
            removed, failed = self._undo_owned(record, status)
            if (status is not None or pending) and not record.reported:
                self._report(record, _outcome(status, removed, failed),
                             status)
                record.mark_reported()
            if failed or (status is None and not pending):
                return False
            resumed = self._resume_background(record)
            record.finish()
            return resumed
        # A job that ended and could not remove all it made (its ending
        # named these): only their removal is left, beside its background
        # work, which is resumed whatever the removal does.
        failed = self._undo_owned(record, None)[1]
        resumed = self._resume_background(record)
        if not failed:
            record.finish()
        return resumed and not failed

    def _settle_image(self, record):
        """'active' (kept), 'deleted', the status of an image left alone,
        or None when Glance did not say.

        A job that never claimed its image (it was still waiting for a
        slot) is claimed here by the same rule (``claim``): the image is
        deleted only if it is the request's to fill, else left as it is.
        """
        images = self._images(record.context)
        try:
            if record.image_owned:
                image = images.get(record.image_id)
            else:
                image = images.claim(record.image_id,
                                     record.context.get('project_id'))
        except exception.ImageNotFound:
            return 'deleted'
        except (exception.ImageNotOwned, exception.ImageNotQueued) as e:
            return e.kwargs.get('status') or 'unknown'
        except exception.SnapshotError as e:
            LOG.warning('Cannot look up image %s: %s', record.image_id, e)
            return None
        if image.get('status') == 'active':
            return 'active'
        return 'deleted' if images.delete(record.image_id) else None

    def _undo_owned(self, record, image_status):
        removed, failed = [], []
        for entry in reversed(record.resources):
            owner = entry.get('owner')
            if not (owner == JOB or (owner == GLANCE
                                     and image_status == 'deleted')):
                continue
            name = f"{entry['kind']} {entry['ref']}"
            try:
                self._undo(entry['kind'], entry['ref'])
            except Exception as e:
                LOG.warning('Could not remove %s left by image %s: %s',
                            name, record.image_id, e)
                failed.append(name)
                continue
            LOG.info('Removed %s left by image %s', name, record.image_id)
            record.forget(entry)
            removed.append(name)
        return removed, failed

    def _resume_background(self, record):
        ok = True
        for entry in record.resources:
            if entry.get('owner') in (JOB, GLANCE):
                continue
            try:
                self._resume(record, entry, record.done_callback(entry))
            except Exception:
                LOG.exception('Could not resume %s of %s %s', entry['owner'],
                              entry['kind'], entry['ref'])
                ok = False
        return ok


def _outcome(image_status, removed, failed):
    """The end of WorkerRestarted's message: what recovery did."""
    if image_status == 'active':
        parts = ['kept the image, which Glance reports active (its data '
                 'was complete and registered before the stop)']
    elif image_status is None:
        parts = ['could not reach Glance: the image is deleted in the '
                 'background once Glance answers (kept if it is active)']
    elif image_status == 'deleted':
        parts = ['deleted the unfinished image']
    else:
        parts = [f'left the image untouched ({image_status}): it was not '
                 f'the request\'s to fill']
    if removed:
        parts.append('removed ' + ', '.join(removed))
    if failed:
        parts.append('could not yet remove ' + ', '.join(failed)
                     + ' (retried at the next start)')
    return '; '.join(parts)
