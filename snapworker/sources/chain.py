"""An instance's disk files, checked and pinned before anything reads them.

The guest wrote every byte of its disk, so nothing the disk says is
trusted until it has been checked, and what is read is what was checked:

* **The format is given, never guessed.** The top file's format comes
  from the domain XML (Nova writes it); a raw disk is read as raw whatever
  its bytes are, so a guest that writes a qcow2 header into its raw disk
  gets exactly its raw bytes uploaded. Only a qcow2 file's header is read,
  by the worker itself (``qcow2_header.py``), and each backing file must
  be named there *with* its format.
* **Checked before opened.** Every name (the domain's, each header's
  backing file) must resolve inside the allowed directory
  (``instances_path``, which holds Nova's ``_base/``) and use no protocol
  or ``json:`` spec. The file is then opened one path component at a time
  below that directory, refusing symlinks, as ``O_PATH`` first: a FIFO,
  device or socket is refused by its ``fstat`` without ever being opened
  for reading.
* **Pinned.** Each file is reopened for reading through its ``O_PATH``
  descriptor and stays open for the whole job. Every reader uses those
  descriptors: the worker's own reads through ``/proc/<pid>/fd/<n>``, and
  QEMU through a ``json:`` spec that names each layer's descriptor and
  its format, with ``backing`` spelled out, so QEMU never resolves a
  backing file name itself. Renaming or swapping a file after the check
  changes nothing that is read.
* **Unchanged at the end.** ``verify_unchanged`` compares each file's
  identity (device, inode, size, change and modification times) with what
  was pinned; a disk truncated or rewritten during the read fails the
  snapshot.
"""

import dataclasses
import errno
import fcntl
import json
import os
import stat
import struct

from snapworker import exception
from snapworker import hostio
from snapworker.sources import base
from snapworker.sources import direct
from snapworker.sources import qcow2_header

#: Nova chains are one or two files deep (overlay, ``_base``); a guest
#: cannot make one deeper, only a corrupted or crafted host file can.
MAX_CHAIN_DEPTH = 16
#: The formats the worker reads (and writes: base.SUPPORTED_TARGET_FORMATS).
READABLE_FORMATS = base.SUPPORTED_TARGET_FORMATS
# <linux/fs.h>: _IOR(0x12, 114, size_t), the device size in bytes.
_BLKGETSIZE64 = 0x80081272


@dataclasses.dataclass(frozen=True)
class Layer:
    """One pinned file of a chain (or a block device)."""

    #: The real path the file was checked and opened at.
    path: str
    format: str
    fd: int
    virtual_size: int
    identity: tuple
    header: qcow2_header.Qcow2Header | None = None
    #: A block device: QEMU's ``host_device`` driver reads it, and its
    #: identity is the device and its size (a node's times say nothing).
    block: bool = False

    def current_identity(self):
        if self.block:
            return _device_identity(self.fd)
        return _identity(os.fstat(self.fd))

    @property
    def proc_path(self):
        """A name that reopens exactly this file, for any local reader.

        ``/proc/<pid>/fd/<n>`` is a "magic link": opening it opens the
        pinned inode itself, whatever happened to the name since, and it
        works from the worker's children too (same user).
        """
        return f'/proc/{os.getpid()}/fd/{self.fd}'


def _identity(st):
    return (st.st_dev, st.st_ino, st.st_rdev, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns)


def _device_identity(fd):
    st = os.fstat(fd)
    size = struct.unpack('=Q', fcntl.ioctl(fd, _BLKGETSIZE64, b'\0' * 8))[0]
    return (st.st_dev, st.st_ino, st.st_rdev, size, 0, 0)


class PinnedChain:
    """A disk and its backing files, top first, open for the whole job."""

    def __init__(self, layers):
        self.layers = tuple(layers)

    @property
    def top(self):
        return self.layers[0]

    @property
    def format(self):
        return self.top.format

    @property
    def virtual_size(self):
        return self.top.virtual_size

    @property
    def backing_paths(self):
        return tuple(layer.path for layer in self.layers[1:])

    @property
    def self_contained(self):
        """Whether the top file alone is the guest's whole disk, as is.

        Internal snapshots would publish old guest data with the file, and
        a dirty (lazy refcounts) image needs repair before it is valid:
        such files are read through QEMU, active layer only.
        """
        header = self.top.header
        return len(self.layers) == 1 and (
            header is None or (not header.snapshots and not header.dirty))

    def supports_direct_io(self):
        return all(hostio.supports_direct_io(layer.proc_path)
                   for layer in self.layers)

    def qemu_spec(self, direct=False):
        """The chain as a ``json:`` filename for qemu-img and qemu-nbd.

        Every node is given: driver (the checked format), the pinned file,
        and for qcow2 its ``backing`` (the next node, or null at the
        bottom), so QEMU opens nothing the worker did not check.

        :param direct: read with ``O_DIRECT`` (``cache.direct`` on every
            node), leaving the host's page cache as it was.
        """
        node = None
        for layer in reversed(self.layers):
            upper = {'driver': layer.format,
                     'file': {'driver': 'host_device' if layer.block
                              else 'file', 'filename': layer.proc_path}}
            if direct:
                upper['cache'] = upper['file']['cache'] = {'direct': True}
            if layer.format == 'qcow2':
                upper['backing'] = node
            node = upper
        return 'json:' + json.dumps(node, sort_keys=True)

    def verify_unchanged(self):
        """:raises SourceChanged: a file is not what was pinned any more."""
        for layer in self.layers:
            try:
                now = layer.current_identity()
            except OSError as e:
                raise exception.SourceChanged(
                    what=f'{layer.path}: {e}') from e
            if now != layer.identity:
                raise exception.SourceChanged(
                    what=f'{layer.path}: '
                         f'{_difference(layer.identity, now)}')

    def close(self):
        layers, self.layers = self.layers, ()
        for layer in layers:
            try:
                os.close(layer.fd)
            except OSError:
                pass


def _difference(before, after):
    names = ('device', 'inode', 'device number', 'size', 'modification '
             'time', 'change time')
    changed = [n for n, a, b in zip(names, before, after, strict=True)
               if a != b]
    return ', '.join(changed) + ' changed'


def open_file_chain(path, fmt, allowed_dir):
    """Check and pin a disk file and its whole backing chain.

    :param path: the disk as the domain XML names it.
    :param fmt: its format as the domain XML names it.
    :param allowed_dir: where every file of the chain must lie.
    :raises DiskOutsideInstancesPath, UnsupportedDisk, SourceChanged:
        before any file outside ``allowed_dir`` is opened.
    """
    allowed = os.path.realpath(allowed_dir)
    layers = []
    seen = set()
    try:
        name, layer_format, parent = path, fmt, None
        while True:
            if len(layers) >= MAX_CHAIN_DEPTH:
                raise exception.UnsupportedDisk(
                    path=path, reason=f'backing chain deeper than '
                                      f'{MAX_CHAIN_DEPTH} files')
            layer = _open_layer(path, name, layer_format, parent, allowed)
            layers.append(layer)
            key = layer.identity[:2]
            if key in seen:
                raise exception.UnsupportedDisk(
                    path=path, reason=f'backing chain loops at {layer.path}')
            seen.add(key)
            header = layer.header
            if header is None or not header.has_backing:
                return PinnedChain(layers)
            name, layer_format, parent = (header.backing_name,
                                          header.backing_format, layer)
    except BaseException:
        PinnedChain(layers).close()
        raise


def _open_layer(disk, name, fmt, parent, allowed):
    what = 'disk' if parent is None else f'backing file of {parent.path}'
    if fmt is None:
        reason = ('the domain XML does not name its format' if parent is None
                  else f'{parent.path} names backing file {name!r} without '
                       f'its format; refusing to guess')
        raise exception.UnsupportedDisk(path=disk, reason=reason)
    if fmt not in READABLE_FORMATS:
        raise exception.UnsupportedDisk(
            path=disk, reason=f'{what} {name!r} has format {fmt!r}')
    local = _local_name(disk, name, parent)
    real = os.path.realpath(local)
    if os.path.commonpath([real, allowed]) != allowed:
        raise exception.DiskOutsideInstancesPath(
            path=name, real_path=real, instances_path=allowed)
    fd = _open_beneath(disk, allowed, os.path.relpath(real, allowed))
    try:
        st = os.fstat(fd)
        header = None
        size = st.st_size
        if fmt == 'qcow2':
            try:
                header = qcow2_header.parse(
                    lambda offset, length: os.pread(fd, length, offset))
            except qcow2_header.InvalidHeader as e:
                raise exception.UnsupportedDisk(
                    path=disk, reason=f'{real}: {e}') from e
            size = header.virtual_size
        return Layer(path=real, format=fmt, fd=fd, virtual_size=size,
                     identity=_identity(st), header=header)
    except BaseException:
        os.close(fd)
        raise


def _local_name(disk, name, parent):
    """The local path a name stands for, or UnsupportedDisk.

    QEMU reads ``json:{...}`` and ``<protocol>:...`` names (``nbd:``,
    ``http:``, ``file:``) as something other than a plain file; such a
    name is refused, not interpreted. A relative backing name is relative
    to the directory of the file that names it, as in QEMU.
    """
    if not name or '\0' in name:
        raise exception.UnsupportedDisk(path=disk,
                                        reason=f'invalid file name {name!r}')
    if parent is None:
        if not name.startswith('/'):
            raise exception.UnsupportedDisk(
                path=disk, reason='the disk path is not absolute')
        return name
    first = name.split('/', 1)[0]
    if name.startswith('json:') or ':' in first:
        raise exception.UnsupportedDisk(
            path=disk, reason=f'backing file {name!r} is not a local file')
    if name.startswith('/'):
        return name
    return os.path.join(os.path.dirname(parent.path), name)


def _open_beneath(disk, root, relative):
    """Open ``root/relative`` for reading without following any symlink.

    Each directory is opened as ``O_PATH | O_NOFOLLOW`` relative to the
    previous one, and the file itself as ``O_PATH`` first, so that what is
    finally opened for reading is a regular file below ``root`` at the
    moment of opening: a symlink or a FIFO swapped in after the name was
    checked is refused here.
    """
    parts = [p for p in relative.split(os.sep) if p not in ('', '.')]
    if not parts or '..' in parts:
        raise exception.UnsupportedDisk(
            path=disk, reason=f'{relative!r} is not a file below {root}')
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    dir_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            next_fd = _open_at(disk, root, part, flags | os.O_DIRECTORY,
                               dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        path_fd = _open_at(disk, root, parts[-1], flags, dir_fd)
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(path_fd)
        if stat.S_ISLNK(st.st_mode):
            raise exception.SourceChanged(
                what=f'{os.path.join(root, relative)} became a symlink '
                     f'after it was checked')
        if not stat.S_ISREG(st.st_mode):
            raise exception.UnsupportedDisk(
                path=disk, reason=f'{os.path.join(root, relative)} is not '
                                  f'a regular file')
        fd = os.open(f'/proc/self/fd/{path_fd}', os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    return fd


def _open_at(disk, root, part, flags, dir_fd):
    try:
        return os.open(part, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise exception.SourceChanged(
                what=f'a symlink appeared at {os.path.join(root, part)} '
                     f'after it was checked') from e
        raise exception.UnsupportedDisk(path=disk, reason=str(e)) from e


def open_block_device(path, prefixes):
    """Check and pin a block device (Nova's LVM volumes).

    :param prefixes: the device path, as the domain XML names it, must
        start with one of these (``[worker] block_device_prefixes``, e.g.
        ``/dev/nova-vg/``): any other device on the host is refused.
    """
    norm = os.path.normpath(path) if path else ''
    if not norm.startswith('/') or norm != path.rstrip('/') or not any(
            norm.startswith(p) for p in prefixes if p):
        raise exception.UnsupportedDisk(
            path=path, reason=f'block devices must lie under one of '
                              f'[worker] block_device_prefixes '
                              f'({", ".join(prefixes) or "none set"})')
    try:
        # Device names under /dev are links udev and LVM make: followed.
        path_fd = os.open(norm, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise exception.UnsupportedDisk(path=path, reason=str(e)) from e
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISBLK(st.st_mode):
            raise exception.UnsupportedDisk(path=path,
                                            reason='not a block device')
        fd = os.open(f'/proc/self/fd/{path_fd}', os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    try:
        identity = _device_identity(fd)
        return PinnedChain([Layer(path=os.path.realpath(norm), format='raw',
                                  fd=fd, virtual_size=identity[3],
                                  identity=identity, block=True)])
    except BaseException:
        os.close(fd)
        raise


class PinnedSource(base.Source):
    """A local source (file chain or block device) read through pins.

    Subclasses say how to check and pin (``_open``) and which plans read
    the pins (``plan``); inspecting, verifying and closing are the same.
    """

    kind = None

    def __init__(self, conf):
        self._conf = conf
        self.pinned = None
        self.facts = None
        self._bypass = None

    def _open(self):
        """Check and pin the source; return a ``PinnedChain``."""
        raise NotImplementedError

    def inspect(self):
        self.pinned = pinned = self._open()
        self.facts = base.SourceFacts(
            kind=self.kind, format=pinned.format,
            virtual_size=pinned.virtual_size, location=pinned.top.path,
            backing_chain=pinned.backing_paths)
        return self.facts

    def verify_unchanged(self):
        if self.pinned is not None:
            self.pinned.verify_unchanged()

    @property
    def wants_glance_stores(self):
        """Only a worker allowed to write Glance's pool asks for them."""
        return self._conf.rbd.direct_write

    def direct_plan(self, target_format, stores, store_id, open_view):
        """The ``direct`` plan if it applies (raw target, an rbd store
        that ``[rbd] direct_write`` lets the worker write), else None."""
        target = direct.rbd_target(stores, store_id, self._conf)
        if target_format != 'raw' or target is None:
            return None
        where = target.store_id or "Glance's store"
        return direct.DirectPlan(
            f'{self.kind} disk to raw in {where} (rbd pool {target.pool}): '
            f'only data written into the pool, hashed while read, '
            f'location registered', open_view, self.facts.virtual_size,
            target, self._conf)

    @property
    def bypass_cache(self):
        """Whether reads leave the page cache alone (``[worker]
        read_cache``, where the filesystem allows ``O_DIRECT``)."""
        if self._bypass is None:
            self._bypass = (self._conf.worker.read_cache == 'bypass'
                            and self.pinned.supports_direct_io())
        return self._bypass

    def close(self):
        if self.pinned is not None:
            self.pinned.close()
            self.pinned = None
