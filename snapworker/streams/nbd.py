"""A whole backing chain, flattened by qemu-nbd and read through libnbd.

qemu-img cannot write to a pipe, but qemu-nbd can export the guest view of
any chain (qcow2 or raw layers, any depth, compressed or zero clusters) and
its ``base:allocation`` context tells which ranges read as zeros.  libnbd
starts qemu-nbd itself with systemd socket activation over a private
socketpair: no socket path to secure or clean up, no pid file, and the
server is killed and reaped when the handle is closed.

If the worker dies without closing (SIGTERM with the default handler,
SIGKILL), the kernel closes the socket; qemu-nbd runs without
``--persistent``, so it exits when its only client goes away.
"""

import functools
import os
from collections.abc import Iterator

import nbd
from oslo_log import log as logging

from snapworker.streams.extents import DiskView
from snapworker.streams.extents import Extent
from snapworker.streams.extents import merge_extents

LOG = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
# libnbd refuses requests above 32 MiB; 4 MiB keeps replies in one chunk.
DEFAULT_REQUEST_SIZE = 4 * MiB
# NBD block status lengths are 32-bit; ask for 1 GiB at a time, aligned,
# so a multi-terabyte disk is mapped in bounded, cheap requests.
BLOCK_STATUS_SPAN = 1 * GiB
ALLOCATION = 'base:allocation'


class NbdChainView(DiskView):
    """Read-only view of ``path`` and all its backing files.

    :param path: the top image of the chain; made absolute so that neither
        a leading ``-`` nor a ``protocol:`` prefix can be misread by qemu.
    :param fmt: the top image format (``qcow2`` or ``raw``); the formats of
        backing files come from the image headers, as in Nova.
    :param request_size: the largest single NBD read.

    Raises ``nbd.Error`` if qemu-nbd cannot open the chain (for example a
    running QEMU holds the image lock), after reaping qemu-nbd.
    """

    def __init__(self, path: str, fmt: str,
                 request_size: int = DEFAULT_REQUEST_SIZE):
        super().__init__()
        self.path = os.path.abspath(path)
        self.fmt = fmt
        self.request_size = request_size
        self._handle = None
        handle = nbd.NBD()
        try:
            handle.add_meta_context(ALLOCATION)
            handle.connect_systemd_socket_activation(
                ['qemu-nbd', '--read-only', '--format=%s' % fmt,
                 '--shared=1', self.path])
            self._size = handle.get_size()
            self._has_allocation = bool(handle.can_meta_context(ALLOCATION))
        except BaseException:
            self._drop(handle, clean=False)
            raise
        self._handle = handle

    @property
    def virtual_size(self) -> int:
        return self._size

    def extents(self) -> Iterator[Extent]:
        if not self._has_allocation:
            LOG.warning('%s: server has no %s; reading every byte',
                        self.path, ALLOCATION)
            return iter([Extent(0, self._size, True)])
        return merge_extents(self._block_status())

    def _block_status(self) -> Iterator[Extent]:
        offset = 0
        while offset < self._size:
            span = min(BLOCK_STATUS_SPAN, self._size - offset)
            found = []
            self._handle.block_status(
                span, offset, functools.partial(self._collect, found, span))
            if not found:
                raise OSError('no block status from qemu-nbd at %d' % offset)
            yield from found
            offset = found[-1].end

    @staticmethod
    def _collect(found, span, context, offset, entries, error) -> int:
        """Turn one reply into extents, clipped to the requested span.

        Only ``NBD_STATE_ZERO`` promises zeros; ``NBD_STATE_HOLE`` alone
        means "unallocated" and may read as anything, so it stays data.
        (qemu-nbd sets both for the unallocated ranges of a chain.)
        """
        if context != ALLOCATION:
            return 0
        end = offset + span
        for i in range(0, len(entries), 2):
            length = min(entries[i], end - offset)
            if length <= 0:
                break
            data = not entries[i + 1] & nbd.STATE_ZERO
            found.append(Extent(offset, length, data))
            offset += length
        return 0

    def pread(self, offset: int, length: int) -> bytes:
        if length <= self.request_size:
            return self._count(self._handle.pread(length, offset), offset,
                               length)
        parts = []
        for pos in range(offset, offset + length, self.request_size):
            size = min(self.request_size, offset + length - pos)
            parts.append(self._handle.pread(size, pos))
        return self._count(b''.join(parts), offset, length)

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._drop(handle, clean=True)

    @staticmethod
    def _drop(handle, clean: bool) -> None:
        """Disconnect and close the handle now, which kills and reaps qemu-nbd.

        Closing must not wait for the garbage collector: a traceback of a
        failed call keeps the binding's frame, and with it the handle,
        alive for as long as the exception is kept.  libnbd 1.14's Python
        binding has no ``close()``; it closes in ``__del__`` only, so the
        module function is called directly and ``__del__`` disarmed.
        """
        try:
            if clean:
                handle.shutdown()
            else:
                handle.kill_subprocess(0)
        except nbd.Error as exc:
            LOG.debug('ignoring error while closing NBD handle: %s', exc)
        if hasattr(handle, 'close'):
            handle.close()
        elif hasattr(handle, '_o'):
            capsule = handle._o
            del handle._o
            nbd.libnbdmod.close(capsule)
