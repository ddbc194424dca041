"""Writing an image into Glance's RBD pool, as glance_store's rbd driver would.

The Ceph half of the direct plan (sources/direct.py), and with ceph.py and
rbd.py one of the only modules that import rados/rbd: the plan itself
stays free of librados, so a worker that never writes directly never
loads it.

glance_store (``_drivers/rbd.py``, ``add()``) makes an image's data as:

* an RBD image named by the Glance image id, in the store's pool, format
  2, with the client's ``rbd_default_features`` (layering when unset)
  and the order of the store's chunk size (8 MiB: order 23);
* the data written at its offsets;
* a snapshot ``snap``, protected (so that Nova and Cinder can clone it);
* the location ``rbd://<fsid>/<pool>/<image id>/snap``.

``GlanceRbdImage`` does the same, except that only what is not zero is
written: a new RBD image reads as zeros, so skipping zeros keeps it thin
(what glance_store does only with ``rbd_thin_provisioning``, after it
received every zero). Several writes are in flight (librbd
``aio_write``), at most ``[rbd] direct_writes_in_flight``, each holding
its own buffer: memory is that many chunks.

Every failure path removes what was made (the image, its snapshot
unprotected first), as glance_store's ``add()`` does before its exception
propagates; a crash is covered by the journal (``base.RBD_IMAGE``).
"""

import threading

import rados
import rbd
from oslo_log import log as logging

from snapworker import exception
from snapworker.sources import ceph

LOG = logging.getLogger(__name__)

#: glance_store's ``rbd_store_chunk_size`` default, 8 MiB: order 23.
DEFAULT_ORDER = 23
#: Object sizes librbd accepts: 4 KiB to 32 MiB.
_ORDERS = range(12, 26)


def order_of(chunk_size):
    """The RBD order of a Glance store's chunk size (bytes), as
    glance_store computes it (``log2``); the default for anything that is
    not a power of two librbd takes."""
    if isinstance(chunk_size, int) and chunk_size > 0 and (
            chunk_size & (chunk_size - 1) == 0):
        order = chunk_size.bit_length() - 1
        if order in _ORDERS:
            return order
    return DEFAULT_ORDER


def default_features(conn):
    """``rbd_default_features`` of the connection's configuration, as
    glance_store reads it (layering when unset or zero)."""
    try:
        features = int(conn.conf_get('rbd_default_features') or 0)
    except (ValueError, rados.Error):
        features = 0
    return features or rbd.RBD_FEATURE_LAYERING


class GlanceRbdImage:
    """``<pool>/<name>`` in Glance's pool: created, written, snapshotted.

    Use: ``create()``, ``write()`` per data piece, ``finish()`` (waits
    for the writes, then ``snap`` protected), ``url``; ``remove()`` undoes
    it at any point, ``close()`` releases the connection either way.

    :param writes_in_flight: ``aio_write`` requests outstanding at most.
    :param stall_timeout: seconds a write may take before the image is
        given up (a full pool blocks writes rather than failing them).
    """

    def __init__(self, conf, pool, name, writes_in_flight=8,
                 stall_timeout=120):
        self.ref = ceph.RbdRef(pool, name)
        self._conf = conf
        self._slots = threading.BoundedSemaphore(writes_in_flight)
        self._in_flight = writes_in_flight
        self._stall_timeout = stall_timeout
        self._conn = None
        self._ioctx = None
        self._image = None
        self._fsid = None
        self._created = False
        self._size = 0
        self._error = None
        #: Bytes handed to librbd (only what is not zero).
        self.bytes_written = 0

    def create(self, size, order, fsid=None):
        """Create the (empty, thin) image of ``size`` bytes.

        :param fsid: the cluster Glance's store is in, when Glance said.
        :raises RbdError: cannot connect, another cluster, no such pool,
            or the image exists already (another job, or a leftover:
            never reused).
        """
        self._conn = ceph.connect(self._conf,
                                  op_timeout=self._stall_timeout)
        try:
            self._fsid = self._conn.get_fsid()
            if fsid and fsid != self._fsid:
                raise exception.RbdError(
                    operation='create', target=str(self.ref),
                    reason=f'Glance\'s store is in cluster {fsid}, the '
                           f'worker reaches {self._fsid}')
            self._ioctx = self._conn.open_ioctx(self.ref.pool)
            try:
                rbd.RBD().create(self._ioctx, self.ref.image, size, order,
                                 old_format=False,
                                 features=default_features(self._conn))
            except rbd.ImageExists:
                raise  # not this object's to remove
            except Exception:
                # It may exist all the same (a reply lost to a timeout):
                # the removal, which tolerates its absence, must try.
                self._created = True
                raise
            self._created = True
            self._size = size
            self._image = rbd.Image(self._ioctx, self.ref.image)
        except (rados.Error, rbd.Error) as e:
            raise exception.RbdError(operation='create', target=str(self.ref),
                                     reason=str(e)) from e

    def write(self, offset, data):
        """Queue ``data`` at ``offset``; waits while the window is full.

        :raises RbdError: an earlier write failed, one took longer than
            ``stall_timeout``, or the range lies outside the image (never
            sent: librbd would refuse it too, this does not rely on it).
        """
        if offset < 0 or offset + len(data) > self._size:
            raise exception.RbdError(
                operation='write', target=str(self.ref),
                reason=f'{len(data)} bytes at {offset} are outside the '
                       f'image ({self._size} bytes)')
        self._acquire()
        self._raise_error()
        try:
            self._image.aio_write(data, offset, self._written)
        except BaseException:
            self._slots.release()
            raise
        self.bytes_written += len(data)

    def _written(self, completion):
        """librbd's callback (its own thread): free the slot, keep an
        error for the next ``write``/``finish``."""
        result = completion.get_return_value()
        if result < 0 and self._error is None:
            self._error = OSError(-result, f'aio_write: error {-result}')
        self._slots.release()

    def _acquire(self):
        if not self._slots.acquire(timeout=self._stall_timeout):
            raise exception.RbdError(
                operation='write', target=str(self.ref),
                reason=f'no write completed in {self._stall_timeout} s '
                       f'(pool full?)')

    def _raise_error(self):
        if self._error is not None:
            raise exception.RbdError(operation='write', target=str(self.ref),
                                     reason=str(self._error))

    def _drain(self):
        """Wait until no write is in flight (each slot taken back)."""
        taken = 0
        try:
            for _ in range(self._in_flight):
                self._acquire()
                taken += 1
        finally:
            for _ in range(taken):
                self._slots.release()

    def finish(self):
        """Wait for every write, flush, then ``snap`` and protect it.

        :raises RbdError:
        """
        self._drain()
        self._raise_error()
        try:
            self._image.flush()
            self._image.create_snap(ceph.GLANCE_SNAP)
            self._image.protect_snap(ceph.GLANCE_SNAP)
        except rbd.Error as e:
            raise exception.RbdError(operation='snapshot',
                                     target=str(self.ref),
                                     reason=str(e)) from e

    @property
    def url(self):
        """Glance's location of the image: ``rbd://fsid/pool/name/snap``."""
        return ceph.RbdRef(self.ref.pool, self.ref.image, ceph.GLANCE_SNAP,
                           self._fsid).url

    def remove(self):
        """Remove the image and its snapshot if this object created it.

        Writes still in flight are waited for first (closing an image
        with writes outstanding would free their buffers under librbd).
        """
        if self._image is not None:
            try:
                self._drain()
            except exception.RbdError:
                LOG.warning('%s: writes still in flight; closing anyway',
                            self.ref)
            self._close_image()
        if self._created:
            ceph.remove_image(self._ioctx, self.ref.image)
            self._created = False

    def _close_image(self):
        image, self._image = self._image, None
        if image is not None:
            image.close()

    def close(self):
        """Close image, pool and connection; the image stays in Ceph."""
        self._close_image()
        ioctx, self._ioctx = self._ioctx, None
        conn, self._conn = self._conn, None
        if ioctx is not None:
            ioctx.close()
        if conn is not None:
            conn.shutdown()
