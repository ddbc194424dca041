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
   image: ``clone`` (no data moves), ``stream`` (one read, no scratch) or
   ``convert`` (what Nova does today).
3. ``verify_unchanged()`` - once the data is read: what was pinned is
   still what it was (else ``SourceChanged``).
4. ``close()`` - always, success or failure.

A plan moves the data. ``run(job)`` calls back into the job it is given::

    job.upload(body, disk_format)    # body: .size, .read(n), .bytes_read
    job.register_location(url, validation_data)   # clone plans
    job.source_released()            # the disk is no longer needed
    job.add_scratch_bytes(n)         # truthful scratch accounting
    job.add_bytes_read(n)
    job.track(kind, ref)             # before creating a resource
    job.handed_over(kind, ref, to, **details)   # someone else owns it now

``track`` and ``handed_over`` journal the resources a plan creates, so
that a worker killed mid-job removes them when it starts again (see
journal.py; plans never import it). ``kind`` is one of the resource kinds
below, ``ref`` names one resource, e.g.::

    job.track(RBD_SNAPSHOT, 'vms/<uuid>_disk@snapworker-<image id>')
    job.handed_over(RBD_CLONE, 'images/<image id>', to=GLANCE)
    done = job.handed_over(RBD_SNAPSHOT, ..., to=FLATTENER,
                           clone='images/<image id>')

``handed_over`` to background work returns the callable that work calls
when it has finished with the resource. ``sources.remove_leftover`` and
``sources.resume_background`` are what recovery calls with these.

and ``cleanup()`` undoes everything the plan created (scratch files, RBD
snapshots and clones). It is called after every run, successful or not, so
it must be idempotent and keep what a successful run handed over (for
example the clone that became the image's data).
"""

import abc
import dataclasses

SUPPORTED_TARGET_FORMATS = ('raw', 'qcow2')

#: Resource kinds a plan journals (``job.track``), with their ``ref``:
#: a directory under ``scratch_dir``; ``pool/image@snapshot``;
#: ``pool/image`` (a clone named by the Glance image id).
SCRATCH_DIR = 'scratch_dir'
RBD_SNAPSHOT = 'rbd_snapshot'
RBD_CLONE = 'rbd_clone'
#: The job's Glance image (ref: its id), when its deletion is pending.
GLANCE_IMAGE = 'glance_image'
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


class Plan(abc.ABC):
    """One way of turning a source into the image's data."""

    #: 'clone', 'stream' or 'convert', as reported in notifications.
    strategy = None

    def __init__(self, target_format, reason):
        self.target_format = target_format
        self.reason = reason

    @abc.abstractmethod
    def run(self, job):
        """Move the data; see the module docstring for the job's API."""

    def cleanup(self):
        """Remove what ``run`` created and did not hand over."""


class StreamPlan(Plan):
    """Upload a body generated from the disk as it is read: no scratch."""

    strategy = 'stream'

    def __init__(self, target_format, reason, open_body):
        super().__init__(target_format, reason)
        self._open_body = open_body

    def run(self, job):
        body = self._open_body()
        try:
            job.upload(body, self.target_format)
        finally:
            job.add_bytes_read(body.bytes_read)
            body.close()
        job.source_released()


class Source(abc.ABC):
    """One instance disk."""

    #: Whether ``plan()`` needs Glance's stores (only a source that can
    #: reference its data in place, RBD, does; the others skip the call).
    wants_glance_stores = False

    @abc.abstractmethod
    def inspect(self):
        """Return ``SourceFacts``; raise UnsupportedDisk when unusable."""

    @abc.abstractmethod
    def plan(self, target_format, store=None, release_first=False):
        """Return the cheapest ``Plan`` for the target format.

        :param target_format: 'raw' or 'qcow2' (already resolved: None
            means the source's own format and is replaced by the caller).
        :param store: facts about the Glance store the image will live in,
            for plans that can reference data in place (RBD clones).
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
