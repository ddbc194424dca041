"""What every disk source answers, and the plans it can produce.

A source is one instance disk of one kind (``file.py``: a disk file and its
backing chain; ``rbd.py``: an RBD image; block devices). The pipeline asks
it, in this order:

1. ``inspect()`` - facts about the disk, read without reading its data,
   after checking and pinning what will be read (``chain.py``)::

       SourceFacts(kind='file', format='qcow2', virtual_size=1073741824,
                   location='/var/lib/nova/instances/<uuid>/disk',
                   backing_chain=['/var/lib/nova/instances/_base/<sha1>'])

   It raises ``UnsupportedDisk`` for anything the worker cannot snapshot
   faithfully (encryption, external data files, unknown formats), before
   a single byte of data is read or sent.
2. ``plan(target_format, store)`` - the cheapest ``Plan`` that produces the
   image: ``clone`` (no data moves), ``direct`` (one read, only data
   written into Glance's RBD pool), ``stream`` (one read, no scratch) or
   ``convert`` (what Nova does today).
3. ``verify_unchanged()`` - once the data is read: what was pinned is
   still what it was (else ``SourceChanged``).
4. ``close()`` - always, success or failure.

A plan moves the data. ``run(ctx)`` is given a ``PlanContext`` (the
pipeline's job, which fills a Glance image, or ``snapworker stream``'s,
which writes a file) and may call only what that class declares::

    ctx.image_id                     # names resources before they exist
    ctx.upload(stream, disk_format)  # an image stream (see streams/);
                                     # its reads count as bytes_read, live,
                                     # unless reads_source=False (a copy)
    ctx.register_location(url, validation_data)   # clone, direct plans
    ctx.source_released()            # the disk is no longer needed
    ctx.add_scratch_bytes(n)         # truthful scratch accounting
    ctx.add_bytes_read(n)            # reads not made through upload()
    ctx.check_cancelled()            # while waiting on a helper
    ctx.track(kind, ref)             # before creating a resource
    ctx.handed_over(kind, ref, to, **details)   # someone else owns it now

It returns None or a ``PlanResult``: facts only the plan knows, which the
pipeline copies into the notification payload.

``track`` and ``handed_over`` journal the resources a plan creates, so
that a worker killed mid-job removes them when it starts again (see
journal.py; plans never import it). ``kind`` is one of the resource kinds
below, ``ref`` names one resource, e.g.::

    ctx.track(RBD_SNAPSHOT, 'vms/<uuid>_disk@snapworker-<image id>')
    ctx.handed_over(RBD_CLONE, 'images/<image id>', to=GLANCE)
    done = ctx.handed_over(RBD_SNAPSHOT, ..., to=FLATTENER,
                           clone='images/<image id>')

``handed_over`` to background work returns the callable that work calls
when it has finished with the resource. ``sources.remove_leftover`` and
``sources.resume_background`` are what recovery calls with these.

A plan's ``cleanup()`` undoes everything it created (scratch files, RBD
snapshots and clones). It is called after every run, successful or not, so
it must be idempotent and keep what a successful run handed over (for
example the clone that became the image's data). It never raises: each
removal is one ``_remove`` step, isolated from the others, and it returns
the ``(kind, ref)`` of every resource it could not remove. The pipeline
keeps those in the job's journal record, so that the next start of the
worker retries them: what the job journalled is not forgotten while it
may still exist.
"""

import abc
import dataclasses

from oslo_log import log as logging

LOG = logging.getLogger(__name__)

SUPPORTED_TARGET_FORMATS = ('raw', 'qcow2')

#: Resource kinds a plan journals (``job.track``), with their ``ref``:
#: a directory under ``scratch_dir``; ``pool/image@snapshot``;
#: ``pool/image`` (a clone named by the Glance image id).
SCRATCH_DIR = 'scratch_dir'
RBD_SNAPSHOT = 'rbd_snapshot'
RBD_CLONE = 'rbd_clone'
#: An RBD image the direct plan writes into Glance's pool (``pool/<image
#: id>``, named as glance_store names its images).
RBD_IMAGE = 'rbd_image'
#: The job's Glance image (ref: its id), when its deletion is pending.
GLANCE_IMAGE = 'glance_image'
#: A reflink copy's directory under ``<instances_path>/.snapworker``.
REFLINK_DIR = 'reflink_dir'
#: Who a resource can be handed over to (``job.handed_over(to=...)``):
#: Glance, as the image's data; the background RBD flattener; the image
#: reaper (reaper.py), which deletes an image Glance did not delete.
GLANCE = 'glance'
FLATTENER = 'flattener'
REAPER = 'reaper'


@dataclasses.dataclass(frozen=True)
class SourceFacts:
    kind: str
    format: str
    virtual_size: int
    location: str
    backing_chain: tuple = ()

    @property
    def has_backing(self):
        return bool(self.backing_chain)


class PlanContext(abc.ABC):
    """What a plan may ask of whoever runs it (see the module docstring).

    Counters are kept here; a context that reports them elsewhere (the
    pipeline's payload) overrides the two ``add_`` methods.
    """

    #: Names what the plan creates (scratch directory, clone) before it
    #: exists, so that it can be journalled.
    image_id = None

    def __init__(self):
        self.bytes_read = 0
        self.scratch_bytes = 0

    @abc.abstractmethod
    def upload(self, stream, disk_format, store=None, reads_source=True):
        """Consume the image stream to its end as the image's data.

        :param reads_source: the stream reads the source disk, so its
            ``bytes_read`` are the job's (counted while it runs, for
            progress); false for a stream of a scratch copy.
        """

    @abc.abstractmethod
    def register_location(self, url, validation_data=None):
        """Make data already in a store (an RBD clone) the image's data."""

    @abc.abstractmethod
    def source_released(self):
        """The disk is no longer read: a waiting guest may resume."""

    @abc.abstractmethod
    def track(self, kind, ref):
        """Journal a resource the plan is about to create."""

    @abc.abstractmethod
    def handed_over(self, kind, ref, to, **details):
        """Someone else owns the resource now; returns its ``done``."""

    def add_bytes_read(self, n):
        self.bytes_read += n

    def add_scratch_bytes(self, n):
        self.scratch_bytes += n

    def check_cancelled(self):
        """Raise ``Cancelled`` if the job was cancelled; plans that wait
        on a helper call it while they wait."""


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """Facts a plan learnt while running, for the notification payload.

    Each field has the name of the ``SnapshotPayload`` field it fills.
    """

    #: Clone plans: when the clone stops depending on the instance disk.
    flatten_policy: str | None = None
    #: Reflink copies: bytes the copy shares with the disk (no new space
    #: until the resumed guest rewrites them).
    shared_bytes: int | None = None
    #: Plans that write the image's data themselves (direct): the Glance
    #: store it went to, and the bytes written into it.
    store: str | None = None
    bytes_written: int | None = None


class Plan(abc.ABC):
    """One way of turning a source into the image's data."""

    #: 'clone', 'direct', 'stream' or 'convert', as in notifications.
    strategy = None

    def __init__(self, target_format, reason):
        self.target_format = target_format
        self.reason = reason
        self._leftovers = []

    @abc.abstractmethod
    def run(self, ctx):
        """Move the data through ``ctx`` (a ``PlanContext``).

        :returns: None or a ``PlanResult``.
        """

    def cleanup(self):
        """Remove what ``run`` created and did not hand over.

        Idempotent; never raises. Plans that create resources remove each
        with ``_remove`` and end with ``return super().cleanup()``.

        :returns: ``[(kind, ref), ...]``, every resource a removal failed
            for, on this call or an earlier one.
        """
        return list(self._leftovers)

    def _undoing(self, run, ctx):
        """``run(ctx)``, undoing what it made (``cleanup``) before any
        failure propagates, as glance_store's rbd driver does in ``add()``:
        the resources are gone before the pipeline deletes the image and
        reports the error (its own later ``cleanup`` finds nothing)."""
        try:
            return run(ctx)
        except BaseException:
            self.cleanup()
            raise

    def _remove(self, kind, ref, remove, *args):
        """One removal step of ``cleanup``: ``remove(*args)``.

        A failure is logged and the resource noted as left over; it is
        not raised, so that the next step still runs and the cause of a
        failing job is not replaced by its cleanup's.

        :returns: whether the resource is gone.
        """
        try:
            remove(*args)
            return True
        except Exception:
            LOG.exception('Could not remove %s %s; kept in the journal for '
                          'the next start of the worker to remove', kind,
                          ref)
            self._leftovers.append((kind, ref))
            return False


class StreamPlan(Plan):
    """Upload an image stream generated as the disk is read: no scratch."""

    strategy = 'stream'

    def __init__(self, target_format, reason, open_stream):
        super().__init__(target_format, reason)
        self._open_stream = open_stream

    def run(self, ctx):
        stream = self._open_stream()
        try:
            ctx.upload(stream, self.target_format)
        finally:
            stream.close()
        ctx.source_released()


class Source(abc.ABC):
    """One instance disk."""

    #: Whether ``plan()`` needs Glance's stores (a source that can
    #: reference its data in place, RBD, or write it into a store itself,
    #: ``[rbd] direct_write``; the others skip the call).
    wants_glance_stores = False

    @abc.abstractmethod
    def inspect(self):
        """Return ``SourceFacts``; raise UnsupportedDisk when unusable."""

    @abc.abstractmethod
    def plan(self, target_format, store=None, release_first=False,
             store_id=None):
        """Return the cheapest ``Plan`` for the target format.

        :param target_format: 'raw' or 'qcow2' (already resolved: None
            means the source's own format and is replaced by the caller).
        :param store: Glance's stores (``glance.ImageService.stores()``),
            for plans that put data in a store themselves (RBD clones,
            direct writes); given only to sources that want them
            (``wants_glance_stores``).
        :param store_id: the store ``[glance] snapshot_store`` resolved to
            for this instance; None: Glance's default store.
        :param release_first: a suspended guest waits for the disk
            (``[worker] suspended_guest_plan``): prefer the plan that
            releases it soonest over the one that finishes soonest.
        """

    def verify_unchanged(self):
        """Raise ``SourceChanged`` if what ``inspect`` pinned has changed.

        Called once the data has been read (``job.source_released``):
        a source that cannot change under the worker (an RBD snapshot)
        has nothing to check.
        """

    def close(self):
        """Release handles held since ``inspect``."""
