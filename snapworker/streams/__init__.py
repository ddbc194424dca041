"""Disk views and upload bodies that never write a scratch copy.

A *view* (:mod:`snapworker.streams.extents`, :mod:`snapworker.streams.nbd`,
:mod:`snapworker.streams.rbd`) answers two questions about a disk's guest
content: which ranges hold data and which read as zeros (``extents()``),
and what the bytes of a data range are (``pread()``).  An *encoder*
(:mod:`snapworker.streams.raw`, :mod:`snapworker.streams.qcow2`) turns a
view into a file-like object whose exact length is known before the first
byte, reads each data byte of the source once, never reads a hole, and
holds at most one chunk in memory.
:mod:`snapworker.streams.body` adapts such a stream for glanceclient.

Nothing here talks to Glance or libvirt; the sources and the pipeline pick
the view and the encoder.
"""

from snapworker.streams import qcow2
from snapworker.streams import raw

_ENCODERS = {'raw': raw.RawStream, 'qcow2': qcow2.Qcow2Stream}


def open_stream(view, target_format, chunk_size):
    """The encoder of ``target_format`` over ``view``.

    The view is closed if the encoder cannot be built (for example its
    layout planning fails), so a qemu-nbd started for it never lingers.
    """
    try:
        return _ENCODERS[target_format](view, chunk_size=chunk_size)
    except BaseException:
        view.close()
        raise
