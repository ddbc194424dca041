"""What a qcow2 header says, parsed by the worker itself.

The chain of a disk is decided from its headers before any helper opens a
file (``chain.py``): ``qemu-img info --backing-chain`` would open every
backing file the headers name (``/etc/shadow``, ``nbd://elsewhere``, a FIFO)
to tell what they are. Only the fields that decide the chain and the plan
are read, from the first cluster, in bounded reads; anything this parser
does not understand is refused, never guessed.

Layout (docs/interop/qcow2.txt of QEMU; all integers big-endian)::

     0 magic 'QFI\\xfb'           4 version (2 or 3)
     8 backing_file_offset      16 backing_file_size
    20 cluster_bits             24 size (virtual)
    32 crypt_method             36 l1_size
    40 l1_table_offset          48 refcount_table_offset
    56 refcount_table_clusters  60 nb_snapshots
    64 snapshots_offset
    version 3 only:
    72 incompatible_features    80 compatible_features
    88 autoclear_features       96 refcount_order
   100 header_length

followed by header extensions (type, length, data padded to 8 bytes) up to
an end marker, all inside the first cluster.
"""

import dataclasses
import struct

MAGIC = b'QFI\xfb'
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
#: QEMU refuses longer backing file names too.
MAX_BACKING_NAME = 1023
#: QEMU's own bounds on the cluster size (512 B to 2 MiB).
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xe2792aca
EXT_FEATURE_TABLE = 0x6803f857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537be77
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION_TYPE = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
#: Incompatible features the worker's readers (QEMU 7.2) understand and
#: that keep the image self-contained; any other bit is refused.
_KNOWN_INCOMPAT = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                   | INCOMPAT_COMPRESSION_TYPE | INCOMPAT_EXTENDED_L2)

_V2 = struct.Struct('>4sIQIIQIIQQIIQ')
_V3_EXTRA = struct.Struct('>QQQII')
_EXT = struct.Struct('>II')


class InvalidHeader(ValueError):
    """The bytes are not a qcow2 header the worker will read."""


@dataclasses.dataclass(frozen=True)
class Qcow2Header:
    version: int
    cluster_size: int
    virtual_size: int
    #: The backing file name exactly as the header has it, or None.
    backing_name: str | None
    #: The backing file's format, from its header extension, or None.
    backing_format: str | None
    snapshots: int
    dirty: bool

    @property
    def has_backing(self):
        return self.backing_name is not None


def parse(read_at):
    """Parse the header of a qcow2 file.

    :param read_at: ``read_at(offset, length) -> bytes``, reading the file
        (a short read means end of file).
    :raises InvalidHeader: not qcow2, or a qcow2 the worker refuses
        (encrypted, corrupt, external data file, unknown features, names
        and extensions out of bounds).
    """
    fixed = read_at(0, V3_HEADER_LENGTH)
    if len(fixed) < V2_HEADER_LENGTH or fixed[:4] != MAGIC:
        raise InvalidHeader('not a qcow2 image (no qcow2 magic)')
    (_magic, version, backing_offset, backing_size, cluster_bits, size,
     crypt_method, _l1_size, _l1_offset, _rt_offset, _rt_clusters,
     nb_snapshots, _snapshots_offset) = _V2.unpack_from(fixed)
    if version not in (2, 3):
        raise InvalidHeader(f'qcow2 version {version} is not supported')
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise InvalidHeader(f'cluster_bits {cluster_bits} out of range')
    cluster_size = 1 << cluster_bits
    if crypt_method != 0:
        raise InvalidHeader('the image is encrypted')
    incompatible, header_length = 0, V2_HEADER_LENGTH
    if version == 3:
        if len(fixed) < V3_HEADER_LENGTH:
            raise InvalidHeader('truncated version 3 header')
        incompatible, _compat, _autoclear, _refcount_order, header_length = (
            _V3_EXTRA.unpack_from(fixed, V2_HEADER_LENGTH))
        if not V3_HEADER_LENGTH <= header_length <= cluster_size:
            raise InvalidHeader(f'header_length {header_length} out of '
                                f'range')
        if header_length % 8:
            raise InvalidHeader('header_length is not a multiple of 8')
    _check_features(incompatible)

    extensions_end = cluster_size
    backing_name = None
    if backing_offset:
        if not 0 < backing_size <= MAX_BACKING_NAME:
            raise InvalidHeader(f'backing file name of {backing_size} '
                                f'bytes')
        if backing_offset < header_length or (
                backing_offset + backing_size > cluster_size):
            raise InvalidHeader('backing file name outside the first '
                                'cluster')
        raw_name = read_at(backing_offset, backing_size)
        if len(raw_name) != backing_size:
            raise InvalidHeader('truncated backing file name')
        backing_name = _decode(raw_name, 'backing file name')
        extensions_end = backing_offset
    extensions = _extensions(read_at, header_length, extensions_end)
    if EXT_ENCRYPTION in extensions:
        raise InvalidHeader('the image has an encryption header')
    if EXT_DATA_FILE in extensions:
        raise InvalidHeader('the image names an external data file')
    backing_format = None
    if EXT_BACKING_FORMAT in extensions:
        backing_format = _decode(extensions[EXT_BACKING_FORMAT],
                                 'backing format')
    return Qcow2Header(
        version=version, cluster_size=cluster_size, virtual_size=size,
        backing_name=backing_name, backing_format=backing_format,
        snapshots=nb_snapshots, dirty=bool(incompatible & INCOMPAT_DIRTY))


def _check_features(incompatible):
    unknown = incompatible & ~_KNOWN_INCOMPAT
    if unknown:
        raise InvalidHeader(f'unknown incompatible features {unknown:#x}')
    if incompatible & INCOMPAT_CORRUPT:
        raise InvalidHeader('the image is marked corrupt')
    if incompatible & INCOMPAT_DATA_FILE:
        raise InvalidHeader('the image has an external data file')


def _extensions(read_at, start, end):
    """Header extensions between ``start`` and ``end``: {type: data}.

    Each type may appear once; the walk stops at the end marker and never
    leaves ``[start, end)``, so a header cannot make it read further.
    """
    found = {}
    offset = start
    # Like QEMU: the area may end without an end marker, and fewer than
    # 8 bytes left cannot hold another extension.
    while offset + _EXT.size <= end:
        ext_type, length = _EXT.unpack(read_at(offset, _EXT.size).ljust(
            _EXT.size, b'\0'))
        if ext_type == EXT_END:
            break
        offset += _EXT.size
        if length > end - offset:
            raise InvalidHeader(f'header extension {ext_type:#x} of '
                                f'{length} bytes overruns the header')
        if ext_type in found:
            raise InvalidHeader(f'header extension {ext_type:#x} twice')
        data = read_at(offset, length)
        if len(data) != length:
            raise InvalidHeader('truncated header extension')
        found[ext_type] = data
        offset += (length + 7) & ~7
    return found


def _decode(raw, what):
    if b'\0' in raw:
        raise InvalidHeader(f'{what} contains a NUL byte')
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError as e:
        raise InvalidHeader(f'{what} is not UTF-8') from e
