"""RBD images (Nova's ``images_type = rbd``): clone in Ceph, or stream.

The source and its two plans; the Ceph plumbing they share (connection,
``RbdRef``, removal) is in ceph.py, the disk view in streams/rbd.py and
the background flatten in flattener.py. Two plans:

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
see tests/functional/sources/test_rbd.py:

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
``snapworker-<glance image id>`` (``ceph.SNAP_PREFIX``), and the plans
journal each snapshot and clone before creating it (``ctx.track``), the
clone as Glance's before registering it and the snapshot as the
flattener's when a background flatten is queued (``ctx.handed_over``). A
worker killed in between removes them when it starts again
(``ceph.remove_leftover``) or queues the flatten again
(``sources.resume_background``); see journal.py. Without a journal
record, whether the image id is still an active Glance image tells the
operator whether to flatten its clone first (``rbd flatten <glance
pool>/<image id>``) or just to remove the snapshot.
"""

import rados
import rbd
from oslo_log import log as logging

from snapworker import exception
from snapworker import streams
from snapworker.sources import base
from snapworker.sources import ceph
from snapworker.streams import rbd as rbd_stream

LOG = logging.getLogger(__name__)

#: Features a clone may take over from its parent, plus deep-flatten (see
#: the module docstring); journaling and data pools are not copied.
_CLONE_FEATURES = (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
                   | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)


def _guarded(what, step, *args):
    """Run one cleanup step; a failure is logged, never raised.

    Cleanup runs after failures, and one step failing (a pool that cannot
    be opened, a connection already gone) must not keep the next from
    removing what it can: each is isolated, as ironic's service stop
    isolates its steps.
    """
    try:
        step(*args)
    except Exception:
        LOG.exception('%s failed', what)


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

    def __init__(self, pool, name, conf, flattener=None):
        """:param flattener: the worker's ``flattener.Flattener``; without
            one, ``[rbd] flatten = background`` flattens synchronously.
        """
        try:
            self.ref = ceph.RbdRef(pool, name)
        except ValueError as e:
            raise exception.UnsupportedDisk(path=f'rbd:{pool}/{name}',
                                            reason=str(e)) from e
        self.pool = pool
        self.name = name
        self.conf = conf
        self.flattener = flattener
        self.conn = None
        self.ioctx = None
        self.fsid = None
        self.features = 0
        self.facts = None

    def inspect(self):
        self.conn = ceph.connect(self.conf)
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
        return f'rbd:{self.ref}'

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

    def plan(self, target_format, store=None, release_first=False,
             store_id=None):
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
        soon as their RBD snapshot exists. ``store_id`` is not used: ``[rbd]
        glance_store`` says where RBD disks' snapshots go.
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
        if policy == 'background' and self.flattener is None:
            return 'sync', ' (no background flattener)'
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
        """Close the pool, then the connection, even if the first fails."""
        ioctx, self.ioctx = self.ioctx, None
        conn, self.conn = self.conn, None
        if ioctx is not None:
            _guarded(f'Closing pool {self.pool} of {self.location}',
                     ioctx.close)
        if conn is not None:
            _guarded(f'Shutting down the Ceph connection of {self.location}',
                     conn.shutdown)


class _SourceSnapshotMixin:
    """Owns ``<disk>@snapworker-<image id>`` until it is removed or handed
    to the background flattener."""

    _snap = None

    def _snap_ref(self, snap):
        return self._source.ref.at(snap)

    def _take_snapshot(self, ctx):
        snap = ceph.snap_name(ctx.image_id)
        ctx.track(base.RBD_SNAPSHOT, str(self._snap_ref(snap)))
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
        ctx.source_released()
        return snap

    def _drop_snapshot(self):
        if self._snap is None:
            return
        snap, self._snap = self._snap, None
        self._remove(base.RBD_SNAPSHOT, str(self._snap_ref(snap)),
                     ceph.remove_snapshot, self._source.ioctx,
                     self._source.name, snap)


class RbdStreamPlan(_SourceSnapshotMixin, base.Plan):
    """Stream a snapshot of the disk into any store: one sparse read."""

    strategy = 'stream'

    def __init__(self, target_format, reason, source, store_id, chunk_size):
        super().__init__(target_format, reason)
        self._source = source
        self._store_id = store_id
        self._chunk_size = chunk_size

    def run(self, ctx):
        snap = self._take_snapshot(ctx)
        view = rbd_stream.RbdView(rbd.Image(
            self._source.ioctx, self._source.name, snapshot=snap,
            read_only=True))
        stream = streams.open_stream(view, self.target_format,
                                     self._chunk_size)
        try:
            ctx.upload(stream, self.target_format, store=self._store_id)
        finally:
            stream.close()

    def cleanup(self):
        self._drop_snapshot()
        return super().cleanup()


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

    def run(self, ctx):
        """Clone and register; on any failure undo what was made, here,
        before the exception propagates."""
        return self._undoing(self._run, ctx)

    def _run(self, ctx):
        src = self._source
        try:
            self._glance_ioctx = src.conn.open_ioctx(self._glance_pool)
        except rados.Error as e:
            raise exception.RbdError(
                operation='open pool',
                target=self._glance_pool,
                reason=str(e)) from e
        snap = self._take_snapshot(ctx)
        clone_ref = ceph.RbdRef(self._glance_pool, ctx.image_id)
        ctx.track(base.RBD_CLONE, str(clone_ref))
        try:
            protected = self._make_clone(ctx.image_id, snap)
            if protected and self.policy == 'never':
                # Clone v1: the protected snapshot would pin the disk for
                # good; v2 is what makes never possible.
                self.policy = 'sync'
            with rbd.Image(self._glance_ioctx, self._clone) as clone:
                if self.policy == 'sync':
                    # Flatten first: a snapshot taken before would keep the
                    # parent (a snapshot keeps its clone's parent), the source
                    # snapshot can go.
                    clone.flatten()
                    self._drop_snapshot()
                clone.create_snap(ceph.GLANCE_SNAP)
                clone.protect_snap(ceph.GLANCE_SNAP)
        except rbd.Error as e:
            raise exception.RbdError(
                operation='clone',
                target=src.location,
                reason=str(e)) from e
        url = ceph.RbdRef(self._glance_pool, ctx.image_id, ceph.GLANCE_SNAP,
                          src.fsid).url
        # Journalled first: after a crash during registration, the clone
        # is kept if the image became active and removed with it if not.
        ctx.handed_over(base.RBD_CLONE, str(clone_ref), to=base.GLANCE)
        ctx.register_location(url)
        # Glance owns the clone now: deleting the image deletes it.
        self._handed_over = True
        if self.policy == 'never':
            # The clone (format v2) keeps the data it needs alive; the
            # named snapshot goes so that nothing visible pins the disk.
            self._drop_snapshot()
        elif self.policy == 'background' and self._snap:
            snapshot = self._snap_ref(self._snap)
            done = ctx.handed_over(base.RBD_SNAPSHOT, str(snapshot),
                                   to=base.FLATTENER, clone=str(clone_ref))
            src.flattener.submit(clone_ref, snapshot, on_done=done)
            self._snap = None
        return base.PlanResult(flatten_policy=self.policy)

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
        """Remove the clone unless Glance owns it, then the snapshot, then
        close Glance's pool: each step even if the one before failed."""
        clone, self._clone = self._clone, None
        if clone and not self._handed_over:
            self._remove(base.RBD_CLONE,
                         str(ceph.RbdRef(self._glance_pool, clone)),
                         ceph.remove_image, self._glance_ioctx, clone)
        self._drop_snapshot()
        ioctx, self._glance_ioctx = self._glance_ioctx, None
        if ioctx is not None:
            _guarded(f'Closing pool {self._glance_pool}', ioctx.close)
        return super().cleanup()
