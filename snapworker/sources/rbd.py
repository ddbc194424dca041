"""RBD images (Nova's ``images_type = rbd``): clone in Ceph, or stream.

The only module that imports rados/rbd. Two plans:

``clone`` (raw target, Glance has an rbd store in the same cluster)
    No data moves. ``<pool>/<disk>@snapworker-<image_id>`` is created
    (point in time: the guest may resume at once), cloned into Glance's
    pool as ``<image_id>``, the clone gets Glance's protected ``snap`` and
    ``rbd://<fsid>/<glance pool>/<image_id>/snap`` becomes the image's
    location. From then on the clone belongs to Glance (deleting the image
    deletes it); before that, ``cleanup()`` removes everything created.

``stream`` (any other store, or a qcow2 target)
    The same kind of snapshot is taken and read sparsely (``diff_iterate``
    extents, holes never read) into the upload; it is removed afterwards.

Flattening (``[rbd] flatten``) decides when the clone stops depending on
the instance disk. Measured on a real Ceph (Pacific) while writing this,
see tests/functional/test_rbd.py:

* A snapshot of the clone taken *before* a flatten keeps referencing the
  parent unless the clone has the ``deep-flatten`` feature; with it, a
  flatten detaches the snapshots too and the source snapshot can then be
  removed. Clones are therefore always created with deep-flatten, which
  is what lets ``background`` register (and activate) the image first and
  flatten later.
* With clone format v2 the source snapshot can be removed while the clone
  still needs it (librbd moves it to the snapshot trash namespace), but
  the instance disk itself still cannot be removed by ``rbd.RBD().remove``
  (ImageHasSnapshots) unless the deleting client sets
  ``rbd_move_parent_to_trash_on_remove = true``; librbd then moves the
  disk to the trash and purges it when the last clone goes. ``never``
  relies on that Nova-side setting.
* Cost of ``background`` (benchmarks/rbd_clone.py): on BlueStore the
  flatten of a clone whose ``snap`` already exists writes the data once,
  like ``sync`` (7.2 GiB for an 8 GiB image 90 % written), and takes
  about as long as Nova's synchronous flatten (22 s against 17-20 s),
  but after the image is active (0.45 s) instead of before. On memstore
  (the tests' RAM-only OSD) the same flatten wrote several times the
  data (a 4 GiB clone with 1.6 GiB of data had passed 5.4 GiB when the
  OSD filled up).

Crash safety: every snapshot the worker makes on an instance disk is named
``snapworker-<glance image id>`` (SNAP_PREFIX), and the plans journal each
snapshot and clone before creating it (``job.track``), the clone as
Glance's before registering it and the snapshot as the flattener's when a
background flatten is queued (``job.handed_over``). A worker killed in
between removes them when it starts again (``remove_leftover``) or queues
the flatten again (``resume_flatten``); see journal.py. Without a journal
record, whether the image id is still an active Glance image tells the
operator whether to flatten its clone first (``rbd flatten <glance
pool>/<image id>``) or just to remove the snapshot.
"""

import queue
import threading
import time

import rados
import rbd
from oslo_log import log as logging
from oslo_utils import uuidutils

from snapworker import exception
from snapworker import streams
from snapworker.sources import base
from snapworker.streams import extents

LOG = logging.getLogger(__name__)

#: Every snapshot this worker makes on an instance disk starts with this.
SNAP_PREFIX = 'snapworker-'
#: The snapshot Glance's rbd store expects on its images.
GLANCE_SNAP = 'snap'
#: Features a clone may take over from its parent, plus deep-flatten (see
#: the module docstring); journaling and data pools are not copied.
_CLONE_FEATURES = (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
                   | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)
#: How long a stopping worker waits for background flattens.
_STOP_WAIT = 10.0


def connect(conf):
    """A connected ``rados.Rados`` for ``[rbd]``; the caller shuts it down.

    ``client_mount_timeout`` is what bounds the wait for the monitors (the
    ``timeout`` argument of ``connect()`` does not): an unreachable
    cluster fails the snapshot in ``connect_timeout`` seconds.
    """
    opts = conf.rbd
    settings = {'client_mount_timeout': str(opts.connect_timeout)}
    if opts.keyring:
        settings['keyring'] = opts.keyring
    conn = rados.Rados(conffile=opts.ceph_conf, rados_id=opts.user,
                       conf=settings)
    try:
        conn.connect(timeout=opts.connect_timeout)
    except rados.Error as e:
        conn.shutdown()
        raise exception.RbdError(
            operation='connect',
            target=opts.ceph_conf,
            reason=str(e)) from e
    return conn


def snap_name(image_id):
    return SNAP_PREFIX + image_id


def _split_ref(ref):
    """``pool/image[@snap]`` -> (pool, image, snap or None)."""
    spec, _, snap = ref.partition('@')
    pool, _, name = spec.partition('/')
    if not (pool and name):
        raise ValueError(f'{ref!r} is not pool/image[@snapshot]')
    return pool, name, snap or None


def remove_leftover(conf, kind, ref):
    """Remove an RBD snapshot or clone that a crashed worker's job left.

    :param kind: ``base.RBD_SNAPSHOT`` (ref ``pool/image@snapworker-*``)
        or ``base.RBD_CLONE`` (ref ``pool/<image id>``).

    The ref comes from a journal file, so only what this worker creates
    is touched: snapshots named with SNAP_PREFIX, clones named by an
    image id. Gone already (image, snapshot or pool) is success.
    """
    pool, name, snap = _split_ref(ref)
    if kind == base.RBD_SNAPSHOT:
        if not (snap or '').startswith(SNAP_PREFIX):
            raise ValueError(f'{ref!r} is not a snapworker snapshot')
    elif kind != base.RBD_CLONE or snap or not uuidutils.is_uuid_like(name):
        raise ValueError(f'{ref!r} is not a snapworker {kind}')
    conn = connect(conf)
    try:
        with conn.open_ioctx(pool) as ioctx:
            if snap:
                _remove_snap(ioctx, name, snap)
            else:
                _remove_image(ioctx, name)
    except rados.ObjectNotFound:
        LOG.info('Pool %s is gone, and %s with it', pool, ref)
    except (rados.Error, rbd.Error) as e:
        raise exception.RbdError(operation='cleanup', target=ref,
                                 reason=str(e)) from e
    finally:
        conn.shutdown()


def resume_flatten(conf, snapshot_ref, clone_ref, done):
    """Queue again a background flatten a stopped worker did not finish.

    The clone stayed valid (a partial flatten is), so the task simply
    starts over: flatten ``clone_ref``, then remove ``snapshot_ref``.
    """
    pool, name, snap = _split_ref(snapshot_ref)
    glance_pool, clone, _ = _split_ref(clone_ref)
    if not (snap or '').startswith(SNAP_PREFIX):
        raise ValueError(f'{snapshot_ref!r} is not a snapworker snapshot')
    FLATTENER.submit(conf, pool, name, snap, glance_pool, clone,
                     on_done=done)


def _remove_snap(ioctx, name, snap):
    """Remove ``name@snap`` (unprotecting it first); gone already is fine."""
    try:
        with rbd.Image(ioctx, name) as image:
            if image.is_protected_snap(snap):
                image.unprotect_snap(snap)
            image.remove_snap(snap)
    except rbd.ImageNotFound:
        pass


def _remove_image(ioctx, name):
    """Remove an image and its snapshots; gone already is fine."""
    try:
        with rbd.Image(ioctx, name) as image:
            for snap in list(image.list_snaps()):
                if image.is_protected_snap(snap['name']):
                    image.unprotect_snap(snap['name'])
                image.remove_snap(snap['name'])
        rbd.RBD().remove(ioctx, name)
    except rbd.ImageNotFound:
        pass


class RbdView(extents.DiskView):
    """A read-only RBD snapshot as a disk view.

    Extents come from ``diff_iterate`` against nothing (what is allocated
    in the image or, for a clone, its parents), at whole-object
    granularity: with object-map/fast-diff this visits only the objects
    that exist; without them every object is asked, still without reading
    data. Holes are reported as ``data=False`` and never read.
    """

    def __init__(self, ioctx, name, snapshot):
        super().__init__()
        self._image = rbd.Image(ioctx, name, snapshot=snapshot,
                                read_only=True)
        try:
            self._size = self._image.size()
        except BaseException:
            self.close()
            raise

    @property
    def virtual_size(self):
        return self._size

    def extents(self):
        found = []

        def on_extent(offset, length, exists):
            if exists:
                found.append(extents.Extent(offset, length, True))

        self._image.diff_iterate(0, self._size, None, on_extent,
                                 include_parent=True, whole_object=True)
        return extents.merge_extents(self._fill_holes(sorted(found)))

    def _fill_holes(self, data_extents):
        pos = 0
        for ext in data_extents:
            start = max(ext.start, pos)
            end = min(ext.end, self._size)
            if start >= end:
                continue
            if start > pos:
                yield extents.Extent(pos, start - pos, False)
            yield extents.Extent(start, end - start, True)
            pos = end
        if pos < self._size:
            yield extents.Extent(pos, self._size - pos, False)

    def pread(self, offset, length):
        return self._count(self._image.read(offset, length), offset, length)

    def close(self):
        if self._image is not None:
            self._image.close()
            self._image = None


class RbdSource(base.Source):
    """One RBD image, read through the source's own Ceph connection.

    ``inspect()`` facts for a disk Nova cloned from a Glance image::

        SourceFacts(kind='rbd', format='raw', virtual_size=1073741824,
                    location='rbd:vms/<uuid>_disk',
                    backing_chain=('images/<image id>@snap',))
    """

    kind = 'rbd'
    #: The pipeline passes Glance's stores to ``plan()`` (see pipeline.py).
    wants_glance_stores = True

    def __init__(self, pool, name, conf):
        self.pool = pool
        self.name = name
        self.conf = conf
        self.conn = None
        self.ioctx = None
        self.fsid = None
        self.features = 0
        self.facts = None

    def inspect(self):
        self.conn = connect(self.conf)
        try:
            self.fsid = self.conn.get_fsid()
            self.ioctx = self.conn.open_ioctx(self.pool)
            with rbd.Image(self.ioctx, self.name, read_only=True) as image:
                size = image.size()
                self.features = image.features()
                chain = self._parents(image)
        except rbd.ImageNotFound as e:
            raise exception.UnsupportedDisk(
                path=self.location, reason='no such RBD image') from e
        except (rados.Error, rbd.Error) as e:
            raise exception.RbdError(
                operation='inspect',
                target=self.location,
                reason=str(e)) from e
        self.facts = base.SourceFacts(
            kind=self.kind, format='raw', virtual_size=size,
            location=self.location, backing_chain=tuple(chain))
        return self.facts

    @property
    def location(self):
        return f'rbd:{self.pool}/{self.name}'

    @property
    def clone_depth(self):
        """Parents above the disk (a clone of it adds one more)."""
        return len(self.facts.backing_chain)

    def _parents(self, image):
        """``pool/name@snap`` of every ancestor, nearest first.

        A parent in a pool the worker may not read ends the walk; it is
        still counted, so the depth is never under-estimated by more than
        the unreadable part.
        """
        chain = []
        opened = []
        try:
            while True:
                try:
                    spec = image.get_parent_image_spec()
                    parent_id = image.parent_id()
                except rbd.ImageNotFound:
                    return chain
                chain.append(f"{spec['pool_name']}/{spec['image_name']}"
                             f"@{spec['snap_name']}")
                try:
                    ioctx = self.conn.open_ioctx(spec['pool_name'])
                    opened.append(ioctx)
                    # By id: a parent in the trash has no name any more.
                    image = rbd.Image(ioctx, image_id=parent_id,
                                      read_only=True)
                    opened.append(image)
                except (rados.Error, rbd.Error) as e:
                    LOG.warning('Cannot follow the parent chain of %s past '
                                '%s: %s', self.location, chain[-1], e)
                    return chain
        finally:
            for handle in reversed(opened):
                handle.close()

    def plan(self, target_format, store=None, release_first=False):
        """Clone when Glance keeps raw images in this cluster, else stream.

        ``store`` is the list ``ImageService.stores()`` returns (or None):

        =============================================  ========  =======
        Glance store the image goes to                 target    plan
        =============================================  ========  =======
        rbd, same cluster (fsid) as the disk           raw       clone
        rbd, same cluster                              qcow2     stream
        any other store, or none known                 any       stream
        =============================================  ========  =======

        ``release_first`` changes nothing: both plans release the disk as
        soon as their RBD snapshot exists.
        """
        target = self._glance_target(store or [])
        if target_format == 'raw' and target.get('pool'):
            policy, why = self._flatten_policy()
            return ClonePlan(
                target_format,
                f'RBD disk, Glance store {target["id"] or "(by location)"} '
                f'is rbd pool {target["pool"]} in the same cluster: '
                f'copy-on-write clone, flatten {policy}{why}',
                self, target['pool'], policy)
        where = target.get('id') or "Glance's default store"
        return RbdStreamPlan(
            target_format,
            f'RBD disk to {target_format} in {where}: snapshot read '
            f'sparsely (allocated objects only) into the upload',
            self, target.get('id'), self.conf.worker.chunk_size)

    def _flatten_policy(self):
        policy = self.conf.rbd.flatten
        depth = self.clone_depth + 1
        if depth > self.conf.rbd.max_clone_depth and policy != 'sync':
            return 'sync', (f' (clone depth {depth} exceeds max_clone_depth '
                            f'{self.conf.rbd.max_clone_depth})')
        return policy, ''

    def _glance_target(self, stores):
        """``{'id': store id or None, 'pool': pool or None}`` to use.

        ``pool`` is set only for an rbd store in this cluster: store
        details from Glance first, then ``[rbd] glance_pool``.
        """
        opts = self.conf.rbd
        wanted = opts.glance_store

        def clonable(store):
            props = store.get('properties') or {}
            return (store.get('type') == 'rbd' and props.get('pool')
                    and props.get('fsid') in (None, self.fsid))

        if wanted:
            store = next((s for s in stores if s.get('id') == wanted), {})
            if 'type' in store:
                pool = (store['properties']['pool'] if clonable(store)
                        else None)
                return {'id': wanted, 'pool': pool}
            # Glance did not describe it: trust the operator's pool.
            return {'id': wanted, 'pool': opts.glance_pool}
        candidates = sorted((s for s in stores if clonable(s)),
                            key=lambda s: not s.get('default'))
        if candidates:
            return {'id': candidates[0]['id'],
                    'pool': candidates[0]['properties']['pool']}
        if opts.glance_pool and not any('type' in s for s in stores):
            return {'id': None, 'pool': opts.glance_pool}
        return {'id': None, 'pool': None}

    def close(self):
        if self.ioctx is not None:
            self.ioctx.close()
            self.ioctx = None
        if self.conn is not None:
            self.conn.shutdown()
            self.conn = None


class _SourceSnapshotMixin:
    """Owns ``<disk>@snapworker-<image id>`` until it is removed or handed
    to the background flattener."""

    _snap = None

    def _snap_ref(self, snap):
        return f'{self._source.pool}/{self._source.name}@{snap}'

    def _take_snapshot(self, job):
        snap = snap_name(job.image_id)
        job.track(base.RBD_SNAPSHOT, self._snap_ref(snap))
        try:
            with rbd.Image(self._source.ioctx, self._source.name) as image:
                image.create_snap(snap)
        except rbd.Error as e:
            raise exception.RbdError(
                operation='snapshot',
                target=self._source.location,
                reason=str(e)) from e
        self._snap = snap
        # A point-in-time copy exists: the guest may run again.
        job.source_released()
        return snap

    def _drop_snapshot(self):
        if self._snap is None:
            return
        try:
            _remove_snap(self._source.ioctx, self._source.name, self._snap)
        except rbd.Error:
            LOG.exception('Could not remove snapshot %s@%s; remove it by '
                          'hand (prefix %s)', self._source.location,
                          self._snap, SNAP_PREFIX)
        self._snap = None


class RbdStreamPlan(_SourceSnapshotMixin, base.Plan):
    """Stream a snapshot of the disk into any store: one sparse read."""

    strategy = 'stream'

    def __init__(self, target_format, reason, source, store_id, chunk_size):
        super().__init__(target_format, reason)
        self._source = source
        self._store_id = store_id
        self._chunk_size = chunk_size

    def run(self, job):
        snap = self._take_snapshot(job)
        view = RbdView(self._source.ioctx, self._source.name, snap)
        body = streams.open_stream(view, self.target_format,
                                   self._chunk_size)
        try:
            job.upload(body, self.target_format, store=self._store_id)
        finally:
            job.add_bytes_read(body.bytes_read)
            body.close()

    def cleanup(self):
        self._drop_snapshot()


class ClonePlan(_SourceSnapshotMixin, base.Plan):
    """Snapshot, copy-on-write clone into Glance's pool, register.

    Validation data: none is sent. A checksum or os_hash of the image
    would have to be computed by reading all of it, the very read the
    clone avoids, so the worker leaves hashing to Glance: with the v2.17
    location API Glance's ``location_import`` task hashes the image
    itself after activating it (when its ``do_secure_hash`` is on), with
    the old API the image has no checksum. ``image_hashed`` in the payload
    says which it was when the image became active.
    """

    strategy = 'clone'

    def __init__(self, target_format, reason, source, glance_pool, policy):
        super().__init__(target_format, reason)
        self._source = source
        self._glance_pool = glance_pool
        self.policy = policy
        self._glance_ioctx = None
        self._clone = None
        self._handed_over = False

    def run(self, job):
        """Clone and register; on any failure undo what was made, here.

        The pipeline calls ``cleanup()`` again afterwards (idempotent),
        but undoing before the exception propagates means the RBD objects
        are gone before the pipeline deletes the image and reports the
        error, as glance_store's rbd driver does in ``add()``.
        """
        try:
            self._run(job)
        except BaseException:
            self.cleanup()
            raise

    def _run(self, job):
        src = self._source
        try:
            self._glance_ioctx = src.conn.open_ioctx(self._glance_pool)
        except rados.Error as e:
            raise exception.RbdError(
                operation='open pool',
                target=self._glance_pool,
                reason=str(e)) from e
        snap = self._take_snapshot(job)
        clone_ref = f'{self._glance_pool}/{job.image_id}'
        job.track(base.RBD_CLONE, clone_ref)
        try:
            protected = self._make_clone(job.image_id, snap)
            if protected and self.policy == 'never':
                # Clone v1: the protected snapshot would pin the disk for
                # good; v2 is what makes never possible.
                self.policy = 'sync'
            job.payload.flatten_policy = self.policy
            with rbd.Image(self._glance_ioctx, self._clone) as clone:
                if self.policy == 'sync':
                    # Flatten first: a snapshot taken before would keep the
                    # parent (notes/ceph.md), the source snapshot can go.
                    clone.flatten()
                    self._drop_snapshot()
                clone.create_snap(GLANCE_SNAP)
                clone.protect_snap(GLANCE_SNAP)
        except rbd.Error as e:
            raise exception.RbdError(
                operation='clone',
                target=src.location,
                reason=str(e)) from e
        url = (f'rbd://{src.fsid}/{self._glance_pool}/{self._clone}/'
               f'{GLANCE_SNAP}')
        # Journalled first: after a crash during registration, the clone
        # is kept if the image became active and removed with it if not.
        job.handed_over(base.RBD_CLONE, clone_ref, to=base.GLANCE)
        job.register_location(url)
        # Glance owns the clone now: deleting the image deletes it.
        self._handed_over = True
        if self.policy == 'never':
            # The clone (format v2) keeps the data it needs alive; the
            # named snapshot goes so that nothing visible pins the disk.
            self._drop_snapshot()
        elif self.policy == 'background' and self._snap:
            done = job.handed_over(base.RBD_SNAPSHOT,
                                   self._snap_ref(self._snap),
                                   to=base.FLATTENER, clone=clone_ref)
            FLATTENER.submit(src.conf, src.pool, src.name, self._snap,
                             self._glance_pool, self._clone, on_done=done)
            self._snap = None

    def _make_clone(self, image_id, snap):
        """Clone ``snap`` as ``<glance pool>/<image_id>``; return whether
        the parent snapshot had to be protected (clone format v1)."""
        src = self._source
        features = (src.features & _CLONE_FEATURES
                    | rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_DEEP_FLATTEN)
        try:
            rbd.RBD().clone(src.ioctx, src.name, snap, self._glance_ioctx,
                            image_id, features=features)
            self._clone = image_id
            return False
        except rbd.InvalidArgument:
            LOG.info('Clone format v1 here: protecting %s@%s', src.location,
                     snap)
        with rbd.Image(src.ioctx, src.name) as image:
            image.protect_snap(snap)
        rbd.RBD().clone(src.ioctx, src.name, snap, self._glance_ioctx,
                        image_id, features=features)
        self._clone = image_id
        return True

    def cleanup(self):
        """Remove the clone unless Glance owns it, then the snapshot."""
        if self._clone and not self._handed_over:
            try:
                _remove_image(self._glance_ioctx, self._clone)
            except rbd.Error:
                LOG.exception('Could not remove clone %s/%s',
                              self._glance_pool, self._clone)
            self._clone = None
        self._drop_snapshot()
        if self._glance_ioctx is not None:
            self._glance_ioctx.close()
            self._glance_ioctx = None


class Flattener:
    """Background flattening of clones registered before their flatten.

    One daemon thread, started on first use, works through a queue with
    its own Ceph connection per task: flatten the clone (deep-flatten:
    its ``snap`` too), then remove the source snapshot and call the
    task's ``on_done`` (which drops it from the journal; a task that
    failed stays there for the next start to retry). A clone Glance
    already deleted is not an error (the snapshot is removed anyway). On
    stop (``stop()``, when the worker stops) it waits up to
    ``_STOP_WAIT`` seconds and then abandons the rest: an interrupted
    flatten leaves a valid, partly flattened clone and the named source
    snapshot (see the module docstring for recovering from that).
    """

    def __init__(self):
        self._queue = queue.Queue()
        self._thread = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.pending = 0

    def submit(self, conf, pool, name, snap, glance_pool, clone,
               on_done=None):
        with self._lock:
            self.pending += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name='rbd-flatten', daemon=True)
                self._thread.start()
        self._queue.put(((conf, pool, name, snap, glance_pool, clone),
                         on_done))

    def _loop(self):
        while not self._stopping.is_set():
            try:
                task, on_done = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._flatten(*task)
            except Exception:
                LOG.exception('Background flatten of %s/%s failed; snapshot '
                              '%s/%s@%s left in place', task[4], task[5],
                              task[1], task[2], task[3])
            else:
                if on_done is not None:
                    on_done()
            finally:
                with self._lock:
                    self.pending -= 1

    @staticmethod
    def _flatten(conf, pool, name, snap, glance_pool, clone):
        started = time.monotonic()
        conn = connect(conf)
        try:
            with conn.open_ioctx(glance_pool) as ioctx:
                try:
                    with rbd.Image(ioctx, clone) as image:
                        image.flatten()
                except rbd.ImageNotFound:
                    LOG.info('Clone %s/%s is gone (image deleted)',
                             glance_pool, clone)
            with conn.open_ioctx(pool) as ioctx:
                _remove_snap(ioctx, name, snap)
        finally:
            conn.shutdown()
        LOG.info('Flattened %s/%s and removed %s/%s@%s in %.2f s',
                 glance_pool, clone, pool, name, snap,
                 time.monotonic() - started)

    def wait(self, timeout):
        """Wait until nothing is pending; return whether that happened."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.pending

    def stop(self, timeout=_STOP_WAIT):
        if self._thread is None:
            return
        if not self.wait(timeout):
            LOG.warning('Abandoning %d background flatten(s); their source '
                        'snapshots (%s*) stay', self.pending, SNAP_PREFIX)
        self._stopping.set()


#: The worker's flattener; the manager stops it (sources.stop_background_work)
FLATTENER = Flattener()
