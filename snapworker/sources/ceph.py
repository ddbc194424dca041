"""Ceph plumbing of the RBD modules: connections, references, removal.

With sources/rbd.py (the source and its plans) and sources/rbd_write.py
(the direct plan's writes into Glance's pool) the only modules that
import rados/rbd; the disk view (streams/rbd.py) and the background
flattener (sources/flattener.py) are handed what they need from here, so
that a worker without RBD disks never loads librados.

What lives here is what does not belong to one plan: connecting with the
``[rbd]`` options, naming RBD objects (``RbdRef``), removing the worker's
own snapshots and clones (after a plan, after a crash: ``remove_leftover``)
and the Ceph half of a background flatten (``flatten_clone``).
"""

import dataclasses
import time
import urllib.parse

import rados
import rbd
from oslo_log import log as logging
from oslo_utils import uuidutils

from snapworker import exception
from snapworker.sources import base

LOG = logging.getLogger(__name__)

#: Every snapshot this worker makes on an instance disk starts with this.
SNAP_PREFIX = 'snapworker-'
#: The snapshot Glance's rbd store expects on its images.
GLANCE_SNAP = 'snap'
_URL_SCHEME = 'rbd://'
#: The object librbd lists a pool's images in.
_RBD_DIRECTORY = 'rbd_directory'


def snap_name(image_id):
    """The worker's snapshot of an instance disk for one Glance image."""
    return SNAP_PREFIX + image_id


@dataclasses.dataclass(frozen=True)
class RbdRef:
    """An RBD image, or a snapshot of one, in a named pool.

    Two notations, both parsed by ``parse`` and formatted here::

        vms/<uuid>_disk@snapworker-<image id>     (str(ref): journal, logs)
        rbd://<fsid>/images/<image id>/snap       (ref.url: Glance location)

    The first is what the journal records and what ``rbd`` commands take;
    the second is glance_store's rbd location (its ``StoreLocation``),
    which always names a snapshot and the cluster. Refs come from journal
    files, domain XML and Glance, so every part is checked: non-empty,
    not ``.`` or ``..``, no ``/`` or ``@`` (which the first notation
    would split at), no control characters, and a fsid that is a UUID
    (and the expected one when the caller knows it).
    """

    pool: str
    image: str
    snapshot: str | None = None
    fsid: str | None = None

    def __post_init__(self):
        _check_part('pool', self.pool)
        _check_part('image', self.image)
        if self.snapshot is not None:
            _check_part('snapshot', self.snapshot)
        if self.fsid is not None and not uuidutils.is_uuid_like(self.fsid):
            raise ValueError(f'fsid {self.fsid!r} is not a UUID')

    @classmethod
    def parse(cls, text, fsid=None):
        """A ref from ``pool/image[@snapshot]`` or an ``rbd://`` URL.

        :param fsid: the cluster an ``rbd://`` URL must name (a URL of
            another cluster is refused); ``pool/image`` names none.
        :raises ValueError: anything else, including the one-part
            ``rbd://image`` form of glance_store's oldest locations,
            which does not say which pool it is in.
        """
        if not isinstance(text, str):
            raise ValueError(f'{text!r} is not an RBD reference')
        if text.startswith(_URL_SCHEME):
            pieces = text[len(_URL_SCHEME):].split('/')
            if len(pieces) != 4:
                raise ValueError(f'{text!r} is not rbd://fsid/pool/image/'
                                 f'snapshot')
            url_fsid, pool, image, snapshot = (
                urllib.parse.unquote(p) for p in pieces)
            if fsid is not None and url_fsid != fsid:
                raise ValueError(f'{text!r} is not in cluster {fsid}')
            return cls(pool, image, snapshot, url_fsid)
        spec, at, snapshot = text.partition('@')
        pool, slash, image = spec.partition('/')
        if not slash:
            raise ValueError(f'{text!r} is not pool/image[@snapshot]')
        return cls(pool, image, snapshot if at else None)

    def at(self, snapshot):
        """The ref of ``snapshot`` of this image."""
        return dataclasses.replace(self, snapshot=snapshot)

    @property
    def url(self):
        """The ``rbd://`` location Glance takes; needs fsid and snapshot."""
        if self.fsid is None or self.snapshot is None:
            raise ValueError(f'{self} has no rbd:// URL without a fsid and '
                             f'a snapshot')
        parts = (self.fsid, self.pool, self.image, self.snapshot)
        return _URL_SCHEME + '/'.join(urllib.parse.quote(p, safe='')
                                      for p in parts)

    def __str__(self):
        spec = f'{self.pool}/{self.image}'
        return f'{spec}@{self.snapshot}' if self.snapshot else spec


def _check_part(what, part):
    if not isinstance(part, str) or not part:
        raise ValueError(f'empty {what} name')
    if part in ('.', '..'):
        raise ValueError(f'{what} name {part!r} is not a name')
    bad = [c for c in part if c in '/@' or not c.isprintable()]
    if bad:
        raise ValueError(f'{what} name {part!r} contains {bad[0]!r}')


def connect(conf, op_timeout=None):
    """A connected ``rados.Rados`` for ``[rbd]``; the caller shuts it down.

    ``client_mount_timeout`` is what bounds the wait for the monitors (the
    ``timeout`` argument of ``connect()`` does not): an unreachable
    cluster fails the snapshot in ``connect_timeout`` seconds.

    :param op_timeout: seconds after which an OSD operation fails
        (``rados_osd_op_timeout``) instead of waiting; a full pool makes
        writes wait for space forever otherwise. None: wait.
    """
    opts = conf.rbd
    settings = {'client_mount_timeout': str(opts.connect_timeout)}
    if op_timeout:
        settings['rados_osd_op_timeout'] = str(op_timeout)
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


def remove_snapshot(ioctx, name, snap):
    """Remove ``name@snap`` (unprotecting it first); gone already is fine."""
    try:
        with rbd.Image(ioctx, name) as image:
            if image.is_protected_snap(snap):
                image.unprotect_snap(snap)
            image.remove_snap(snap)
    except rbd.ImageNotFound:
        pass


def remove_image(ioctx, name):
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


def worker_snapshot(text):
    """The ref of a snapshot this worker made on an instance disk.

    :raises ValueError: a ref that is malformed or names any other
        snapshot (one of Nova's, or an image itself).
    """
    ref = RbdRef.parse(text)
    if not (ref.snapshot or '').startswith(SNAP_PREFIX) or ref.fsid:
        raise ValueError(f'{text!r} is not a snapworker snapshot')
    return ref


def worker_clone(text):
    """The ref of a clone or image this worker made in Glance's pool:
    ``<glance pool>/<image id>``.

    :raises ValueError: anything else.
    """
    ref = RbdRef.parse(text)
    if ref.snapshot or ref.fsid or not uuidutils.is_uuid_like(ref.image):
        raise ValueError(f'{text!r} is not a snapworker clone')
    return ref


def remove_leftover(conf, kind, ref):
    """Remove an RBD snapshot, clone or image a crashed worker's job left.

    :param kind: ``base.RBD_SNAPSHOT`` (ref ``pool/image@snapworker-*``),
        ``base.RBD_CLONE`` or ``base.RBD_IMAGE`` (ref ``pool/<image id>``,
        its ``snap`` snapshot unprotected and removed with it).

    The ref comes from a journal file, so only what this worker creates
    is touched: snapshots named with SNAP_PREFIX, clones named by an
    image id. Gone already (image, snapshot or pool) is success.
    """
    if kind == base.RBD_SNAPSHOT:
        target = worker_snapshot(ref)
    elif kind in (base.RBD_CLONE, base.RBD_IMAGE):
        target = worker_clone(ref)
    else:
        raise ValueError(f'{ref!r} is not a snapworker {kind}')
    conn = connect(conf)
    try:
        with conn.open_ioctx(target.pool) as ioctx:
            if target.snapshot:
                remove_snapshot(ioctx, target.image, target.snapshot)
            else:
                break_stale_lock(ioctx, target.image)
                _remove_when_unwatched(ioctx, target.image)
    except rados.ObjectNotFound:
        LOG.info('Pool %s is gone, and %s with it', target.pool, ref)
    except (rados.Error, rbd.Error) as e:
        raise exception.RbdError(operation='cleanup', target=ref,
                                 reason=str(e)) from e
    finally:
        conn.shutdown()


def break_stale_lock(ioctx, name):
    """Break the exclusive lock a killed worker still holds on ``name``.

    The direct plan writes with the lock held; after a SIGKILL the dead
    client's lock and watch stay (until the OSDs time the watch out) and
    keep the image from being removed. Breaking the lock blocklists that
    client (librbd's ``rbd_blocklist_on_break_lock``), which ends its
    watch too. Only called by recovery, for an image named by a journal
    record of this worker.
    """
    try:
        with rbd.Image(ioctx, name) as image:
            for owner in list(image.lock_get_owners()):
                LOG.info('Breaking the stale lock of %s held by %s', name,
                         owner['owner'])
                image.lock_break(owner['mode'], owner['owner'])
    except rbd.ImageNotFound:
        pass


def _remove_when_unwatched(ioctx, name, timeout=60):
    """``remove_image``, retried while a (dead) client still watches it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return remove_image(ioctx, name)
        except (rbd.ImageBusy, rbd.ImageHasSnapshots):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def flatten_clone(conf, clone, snapshot):
    """Flatten ``clone``, then remove the ``snapshot`` it was made from.

    The Ceph half of a background flatten (sources/flattener.py), on a
    connection of its own. The clone has deep-flatten, so its own
    snapshots stop referencing the parent too. A clone Glance already
    deleted is not an error: the snapshot is removed anyway.
    """
    conn = connect(conf)
    try:
        with conn.open_ioctx(clone.pool) as ioctx:
            try:
                with rbd.Image(ioctx, clone.image) as image:
                    image.flatten()
            except rbd.ImageNotFound:
                LOG.info('Clone %s is gone (image deleted)', clone)
        with conn.open_ioctx(snapshot.pool) as ioctx:
            remove_snapshot(ioctx, snapshot.image, snapshot.snapshot)
    finally:
        conn.shutdown()


def check_pools(conf, pools):
    """Connect with ``[rbd]`` and open each pool; touch nothing.

    For ``snapworker-status upgrade check``. Returns the cluster's fsid.

    :raises RbdError: the cluster does not answer, or a pool is missing
        or not readable by ``[rbd] user`` (the first such pool is named).
    """
    conn = connect(conf)
    try:
        fsid = conn.get_fsid()
        for pool in pools:
            try:
                with conn.open_ioctx(pool) as ioctx:
                    # One small read the user's caps must allow: the
                    # pool's RBD directory (absent in a pool without
                    # images yet, which is fine).
                    try:
                        ioctx.stat(_RBD_DIRECTORY)
                    except rados.ObjectNotFound:
                        pass
            except rados.Error as e:
                raise exception.RbdError(operation='open',
                                         target=f'pool {pool}',
                                         reason=str(e)) from e
        return fsid
    finally:
        conn.shutdown()
