"""Disk views and image streams: a snapshot's bytes without a scratch copy.

One vocabulary, used by every module here and by the plans:

*view* (``extents.DiskView``)
    The guest's content of one disk, whatever its format or backend, as a
    flat byte range ``[0, virtual_size)``: ``extents()`` says which ranges
    hold data and which read as zeros, ``pread()``/``pread_many()`` read
    data.  ``extents.RawFileView`` and ``BlockDeviceView`` (a raw file or
    device), ``nbd.NbdChainView`` (a qcow2 chain exported by qemu-nbd),
    ``rbd.RbdView`` (an RBD snapshot).
*image stream*
    The bytes of one image file of a given format, as a file-like object:
    ``size`` (exact, known before the first byte), ``read(n)`` (at most
    one chunk, ``b''`` at the end), ``bytes_read`` (what it took from the
    source: holes are never read) and ``close()``.  Generated from a view
    by an encoder (``raw.RawStream``, ``qcow2.Qcow2Stream``, both built on
    ``generated.GeneratedStream``; :func:`open_stream` picks one), or a
    file that already is the image (``passthrough.FileStream``).
*body*
    An image stream as the HTTP layer reads it (``body.CountingBody``):
    it counts what Glance took, hashes it (``digest``) and reports
    progress.

Nothing here talks to Glance or libvirt; the sources and the pipeline pick
the view and the encoder.  Every image stream holds at most one chunk
(``[worker] chunk_size``) of the disk in memory.
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
