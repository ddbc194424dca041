"""Disk views and upload bodies that never write a scratch copy.

A *view* (:mod:`snapworker.streams.extents`, :mod:`snapworker.streams.nbd`)
answers two questions about a disk's guest content: which ranges hold data
and which read as zeros (``extents()``), and what the bytes of a data range
are (``pread()``).  An *encoder* (:mod:`snapworker.streams.raw`,
:mod:`snapworker.streams.qcow2`) turns a view into a file-like object whose
exact length is known before the first byte, reads each data byte of the
source once, never reads a hole, and holds at most one chunk in memory.
:mod:`snapworker.streams.body` adapts such a stream for glanceclient.

Nothing here talks to Glance or libvirt; the sources and the pipeline pick
the view and the encoder.
"""
