"""The ``direct`` plan: a local disk written straight into Glance's RBD pool.

Through Glance's API every byte of a raw snapshot crosses the wire and is
hashed by glance-api, zeros included: a 10 GiB disk holding 1 GiB of data
costs ~100 s at Glance's ingest rate. When the image goes to an rbd store
in the cluster the worker reaches, and the operator allows the worker to
write Glance's pool (``[rbd] direct_write``, the access Nova's
``direct_snapshot`` needs too), the worker does what glance_store's rbd
driver would do with the upload, minus the zeros:

1. journal ``<pool>/<image id>`` (``base.RBD_IMAGE``), then create it as
   glance_store does (rbd_write.py);
2. read the disk's view once: data pieces are written (``aio_write``,
   several in flight), zero extents and all-zero pieces are not (the
   image stays thin); md5 and ``[glance] hash_algorithm`` are computed
   over the *whole* virtual byte stream, zeros included, on a thread of
   their own (streams/digest.py), so they equal what Glance would have
   computed from an upload of the same raw image;
3. ``snap``, protected; the source is released (checked unchanged, the
   domain still off);
4. the image is journalled as Glance's and its location registered with
   that validation data (``ctx.register_location``); deleting the Glance
   image deletes the RBD image from then on.

Anything failing before step 4 completes removes the RBD image (its
snapshot unprotected first) before the error propagates; a crash leaves a
journal entry that recovery removes (``ceph.remove_leftover``).

The disk's allocation map comes from the guest's own data (a qcow2's
tables, a file's holes); it only decides what is skipped. Every extent
must follow the previous one and end within the virtual size the
pipeline already checked, which is also the size of the RBD image: a
hostile map cannot make the worker write outside the image.

This module imports no librados: the Ceph half is rbd_write.py, loaded
when a direct plan runs.
"""

import dataclasses

from oslo_log import log as logging

from snapworker import exception
from snapworker import hostio
from snapworker.sources import base
from snapworker.streams import digest as streams_digest
from snapworker.streams import generated as streams_generated

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RbdTarget:
    """The rbd store an image goes to, as far as Glance described it."""

    #: Glance's id of the store (None: Glance did not say which it is).
    store_id: str | None
    pool: str
    #: Bytes per RBD object (the store's ``rbd_store_chunk_size``).
    chunk_size: int | None = None
    fsid: str | None = None


def rbd_target(stores, store_id, conf):
    """The rbd store a direct write would go to, or None.

    :param stores: ``glance.ImageService.stores()`` (None: not asked).
    :param store_id: the store ``[glance] snapshot_store`` resolved to;
        None: Glance's default store.

    ============================================  =======================
    the store the image goes to                   target
    ============================================  =======================
    rbd, with its pool (admin: store details)     that pool
    not rbd                                       None (upload)
    type unknown (ids only, or single store)      ``[rbd] glance_pool``
    ============================================  =======================
    """
    if not conf.rbd.direct_write or stores is None:
        return None
    if store_id:
        store = next((s for s in stores if s.get('id') == store_id), None)
    else:
        store = next((s for s in stores if s.get('default')), None)
    if store is not None and 'type' in store:
        props = store.get('properties') or {}
        if store['type'] != 'rbd' or not props.get('pool'):
            return None
        return RbdTarget(store['id'], props['pool'],
                         props.get('chunk_size'), props.get('fsid'))
    if conf.rbd.glance_pool:
        # Glance did not describe the store: trust the operator's pool.
        return RbdTarget(store_id, conf.rbd.glance_pool)
    return None


class DirectPlan(base.Plan):
    """Write the disk's data into Glance's pool; register it hashed.

    :param open_view: returns a fresh ``DiskView`` of the disk (raw
        guest content), closed by the plan.
    :param virtual_size: the size the pipeline checked; the view must
        agree, and the RBD image has exactly this size.
    """

    strategy = 'direct'

    def __init__(self, reason, open_view, virtual_size, target, conf):
        super().__init__('raw', reason)
        self._open_view = open_view
        self._virtual_size = virtual_size
        self._target = target
        self._conf = conf
        self._image = None
        self._handed_over = False

    def run(self, ctx):
        """Write, then register; any failure removes the RBD image here,
        before the exception propagates."""
        return self._undoing(self._run, ctx)

    def _run(self, ctx):
        from snapworker.sources import rbd_write

        conf = self._conf
        self._image = image = rbd_write.GlanceRbdImage(
            conf, self._target.pool, ctx.image_id,
            writes_in_flight=conf.rbd.direct_writes_in_flight,
            stall_timeout=conf.worker.helper_stall_timeout)
        ctx.track(base.RBD_IMAGE, str(image.ref))
        image.create(self._virtual_size,
                     rbd_write.order_of(self._target.chunk_size),
                     fsid=self._target.fsid)
        digest = streams_digest.BackgroundDigest(conf.glance.hash_algorithm)
        try:
            with self._open_view() as view:
                self._copy(view, image, digest, ctx)
            image.finish()
            md5, value = digest.finish()
        finally:
            digest.close()
        ctx.source_released()
        # Journalled first: after a crash during registration the image
        # is kept if the Glance image became active, removed if not.
        ctx.handed_over(base.RBD_IMAGE, str(image.ref), to=base.GLANCE)
        ctx.register_location(image.url, {
            'checksum': md5, 'os_hash_algo': digest.algorithm,
            'os_hash_value': value})
        self._handed_over = True
        return base.PlanResult(store=self._target.store_id,
                               bytes_written=image.bytes_written)

    def _copy(self, view, image, digest, ctx):
        """Every byte to the digest, every non-zero piece to the image;
        the view's reads counted as they happen (``snapworker jobs``)."""
        chunk = self._conf.worker.chunk_size
        zeros = bytes(chunk)
        throttle = hostio.Throttle(
            self._conf.worker.max_read_bytes_per_second)
        extents = checked_extents(view, self._virtual_size)
        counted = 0
        try:
            for offset, length, data in streams_generated.placed_pieces(
                    view, extents, chunk):
                ctx.check_cancelled()
                ctx.add_bytes_read(view.bytes_read - counted)
                counted = view.bytes_read
                if data is None:
                    _digest_zeros(digest, zeros, length)
                    continue
                throttle(length)
                digest.update(data)
                if data != (zeros if length == chunk else bytes(length)):
                    image.write(offset, data)
        finally:
            ctx.add_bytes_read(view.bytes_read - counted)

    def cleanup(self):
        """Remove the RBD image unless Glance owns it; close Ceph.

        A removal that fails (a cluster that stopped answering) leaves the
        image among the leftovers the journal keeps (``Plan.cleanup``).
        """
        image, self._image = self._image, None
        if image is not None:
            if not self._handed_over:
                self._remove(base.RBD_IMAGE, str(image.ref), image.remove)
            try:
                image.close()
            except Exception:
                LOG.exception('Closing the Ceph connection of %s failed',
                              image.ref)
        return super().cleanup()


def checked_extents(view, virtual_size):
    """The view's extents, refused unless they tile ``[0, virtual_size)``.

    The map is the guest's to shape (qcow2 tables, file holes): an
    extent that overlaps, leaves a gap, is empty or runs past the checked
    size fails the snapshot instead of being written somewhere.

    :raises SourceReadError:
    """
    def refuse(reason):
        return exception.SourceReadError(
            path=getattr(view, 'path', '?'),
            reason=f'allocation map: {reason}')

    if view.virtual_size != virtual_size:
        raise refuse(f'{view.virtual_size} bytes, not the {virtual_size} '
                     f'checked')
    pos = 0
    for ext in view.extents():
        if ext.start != pos or ext.length <= 0 or ext.end > virtual_size:
            raise refuse(f'extent {ext.start}+{ext.length} after {pos} '
                         f'(size {virtual_size})')
        pos = ext.end
        yield ext
    if pos != virtual_size:
        raise refuse(f'ends at {pos} of {virtual_size}')


def _digest_zeros(digest, zeros, length):
    """Hash ``length`` zero bytes from the shared buffer (no copies)."""
    while length > 0:
        step = min(length, len(zeros))
        digest.update(zeros if step == len(zeros) else bytes(step))
        length -= step
