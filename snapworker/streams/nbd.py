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

import collections
import functools
import os
import time
from collections.abc import Iterator

import nbd
from oslo_log import log as logging
from oslo_utils import units

from snapworker.streams.extents import DiskView
from snapworker.streams.extents import Extent
from snapworker.streams.extents import merge_extents

LOG = logging.getLogger(__name__)

MiB = units.Mi
GiB = units.Gi
# libnbd refuses requests above 32 MiB; 4 MiB keeps replies in one chunk.
DEFAULT_REQUEST_SIZE = 4 * MiB
# NBD block status lengths are 32-bit; ask for 1 GiB at a time, aligned,
# so a multi-terabyte disk is mapped in bounded, cheap requests.
BLOCK_STATUS_SPAN = 1 * GiB
ALLOCATION = 'base:allocation'
#: Seconds one NBD exchange may take by default (see NbdChainView).
DEFAULT_TIMEOUT = 120.0
#: Reads kept in flight by default (nbdcopy keeps 64 over 4
#: connections; benchmarks/beyond_ingest.py measures the curve).
DEFAULT_IN_FLIGHT = 8


def qemu_nbd_argv(filename, fmt=None):
    """The qemu-nbd command exporting ``filename`` read-only.

    :param filename: a ``json:`` spec naming every node of a chain (what
        the worker's sources pass: QEMU then opens only what they checked)
        or a plain path, made absolute so that neither a leading ``-`` nor
        a ``protocol:`` prefix can be misread.
    :param fmt: the format of a plain path; a spec carries its drivers.
    """
    if not filename.startswith('json:'):
        filename = os.path.abspath(filename)
    argv = ['qemu-nbd', '--read-only', '--shared=1']
    if fmt:
        argv.append('--format=%s' % fmt)
    return argv + [filename]


class NbdChainView(DiskView):
    """Read-only view of a whole chain, as one qemu-nbd exports it.

    :param command: the qemu-nbd command line (``qemu_nbd_argv``, possibly
        wrapped in resource limits); libnbd starts it with socket
        activation.
    :param request_size: the largest single NBD read.
    :param max_in_flight: reads ``pread_many`` keeps outstanding.
    :param timeout: seconds any one NBD exchange (connecting, a block
        status or a read) may take; then qemu-nbd is killed and
        ``TimeoutError`` raised, so a stuck export cannot hold a job (and
        its slot) forever.

    Raises ``nbd.Error`` if qemu-nbd cannot open the chain (for example a
    running QEMU holds the image lock), after reaping qemu-nbd.
    """

    def __init__(self, command, request_size: int = DEFAULT_REQUEST_SIZE,
                 timeout: float = DEFAULT_TIMEOUT,
                 max_in_flight: int = DEFAULT_IN_FLIGHT):
        super().__init__()
        self.command = list(command)
        self.request_size = request_size
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self._handle = None
        #: Buffers not in flight, by size (see ``_issue``).
        self._free = {}
        handle = nbd.NBD()
        try:
            handle.add_meta_context(ALLOCATION)
            handle.aio_connect_systemd_socket_activation(self.command)
            self._wait_for(handle, 'connecting',
                           lambda: not handle.aio_is_connecting())
            self._size = handle.get_size()
            self._has_allocation = bool(handle.can_meta_context(ALLOCATION))
        except BaseException:
            self._drop(handle, clean=False)
            raise
        self._handle = handle

    @property
    def path(self):
        return self.command[-1]

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
            self._complete(
                'block status',
                self._handle.aio_block_status(
                    span, offset,
                    functools.partial(self._collect, found, span)))
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
        return next(self.pread_many([(offset, length)]))

    def pread_many(self, requests):
        """Reads with up to ``max_in_flight`` NBD requests outstanding.

        qemu-nbd answers requests concurrently (out of order; libnbd
        matches replies to cookies), so while the caller sends one chunk
        the next ones are already being read. Memory is bounded by
        ``max_in_flight`` requests of at most ``request_size`` bytes.
        """
        window = collections.deque()
        requests = iter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and len(window) < self.max_in_flight:
                    try:
                        offset, length = next(requests)
                    except StopIteration:
                        exhausted = True
                        break
                    window.append(self._issue(offset, length))
                if not window:
                    return
                offset, length, parts = window.popleft()
                chunks = [self._collect_read(part) for part in parts]
                data = chunks[0] if len(chunks) == 1 else b''.join(chunks)
                yield self._count(bytes(data), offset, length)
        finally:
            # Outstanding replies are drained before the handle is reused
            # (or dropped by close()).
            for _offset, _length, parts in window:
                for buf, cookie, _skip, _size in parts:
                    try:
                        self._complete('read', cookie)
                    except (nbd.Error, TimeoutError):
                        break
                    self._free[len(buf)].append(buf)

    def _issue(self, offset, length):
        """Start the reads of one request, every piece in flight.

        libnbd 1.14's Python binding keeps a reference to every buffer
        given to ``aio_pread`` for good, with or without a completion
        callback (measured: reading 256 MiB with a new ``nbd.Buffer`` per
        read left the process 256 MiB bigger), so buffers are never
        dropped: they come from pools, one per power-of-two size up to
        ``request_size``, each bounded by the reads in flight. A piece
        shorter than ``request_size`` (the end of an extent) is read as
        the smallest pooled size that holds it, from a window of the disk
        that contains it (less than twice the piece, never past the end
        of the disk), so that it too is bounded by the stall timeout; a
        synchronous ``pread`` would wait for ever on a stuck qemu-nbd.
        """
        parts = []
        for pos in range(offset, offset + length, self.request_size):
            size = min(self.request_size, offset + length - pos)
            buf_size = self._pool_size(size)
            start = min(pos, self._size - buf_size)
            pool = self._free.setdefault(buf_size, [])
            buf = pool.pop() if pool else nbd.Buffer(buf_size)
            parts.append((buf, self._handle.aio_pread(buf, start),
                          pos - start, size))
        return offset, length, parts

    def _pool_size(self, size):
        """The pooled buffer size for a piece of ``size`` bytes."""
        if size == self.request_size:
            return size
        pooled = min(1 << (size - 1).bit_length(), self.request_size)
        # A disk smaller than the window: the exact size, not pooled
        # beyond the few such reads a tiny disk has.
        return pooled if pooled <= self._size else size

    def _collect_read(self, part):
        """The bytes of one piece ``_issue`` started; its buffer back to
        its pool."""
        buf, cookie, skip, size = part
        self._complete('read', cookie)
        data = buf.to_bytearray()
        self._free[len(buf)].append(buf)
        return data if skip == 0 and len(data) == size else (
            data[skip:skip + size])

    def _complete(self, what, cookie):
        """Wait for one command; ``nbd.Error`` if the server failed it."""
        handle = self._handle
        self._wait_for(handle, what,
                       lambda: handle.aio_command_completed(cookie))

    def _wait_for(self, handle, what, done):
        deadline = time.monotonic() + self.timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                LOG.warning('qemu-nbd for %s: %s took over %.0f s; '
                            'stopping it', self.path, what, self.timeout)
                raise TimeoutError(
                    f'qemu-nbd: {what} took over {self.timeout:.0f} s')
            handle.poll(max(1, int(min(remaining, 1.0) * 1000)))

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
