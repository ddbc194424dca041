"""Property test: random chains of random writes, zeroes and discards."""

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from oslo_utils import units

from tests.functional.streams import qemu

KiB = units.Ki
SECTOR = 512
MAX_SIZE = 2 * 1024 * KiB

sizes = st.integers(1, MAX_SIZE // SECTOR).map(lambda n: n * SECTOR)


@st.composite
def operations(draw, size):
    """qemu-io commands on 512-byte aligned ranges inside ``size``."""
    commands = []
    for _ in range(draw(st.integers(0, 6))):
        start = draw(st.integers(0, size // SECTOR - 1)) * SECTOR
        length = draw(st.integers(1, (size - start) // SECTOR)) * SECTOR
        kind = draw(st.sampled_from(['data', 'zero', 'discard']))
        if kind == 'data':
            commands.append('write -P %d %d %d'
                            % (draw(st.integers(1, 255)), start, length))
        elif kind == 'zero':
            commands.append('write -z %d %d' % (start, length))
        else:
            commands.append('discard %d %d' % (start, length))
    return commands


@st.composite
def layers(draw):
    """Base first: ``(fmt, size, qcow2 options, commands)`` per layer."""
    chain = []
    for depth in range(draw(st.integers(1, 4))):
        fmt = 'raw' if depth == 0 and draw(st.booleans()) else 'qcow2'
        size = draw(sizes)
        options = []
        if fmt == 'qcow2':
            options.append('cluster_size=%d' % draw(
                st.sampled_from([4 * KiB, 64 * KiB, 256 * KiB])))
            options.append('compat=%s' % draw(st.sampled_from(['0.10',
                                                                '1.1'])))
        chain.append((fmt, size, options, draw(operations(size))))
    return chain


class RandomChainTestCase(qemu.QemuTestCase):

    @settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(layers(), st.sampled_from([4 * KiB, 64 * KiB]))
    def test_random_chain(self, chain, out_cluster_size):
        backing = None
        for i, (fmt, size, options, commands) in enumerate(chain):
            name = 'layer%d.%s' % (i, fmt)
            path = self.create(name, fmt, size, backing=backing,
                               options=options)
            if commands:
                self.io(path, fmt, *commands)
            backing = (path, fmt)
        self.stream_and_verify(backing[0], backing[1], out_cluster_size)
