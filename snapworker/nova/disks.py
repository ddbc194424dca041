"""Which root disks nova-compute hands to the worker, and in what format.

Kept apart from ``driver.py`` so that it imports nothing from Nova: the
names and the format rule are what must match Nova exactly, and they can
be checked without a nova-compute around them.

Nova names a root disk by its image backend when the path tells it
(``libvirt_utils.get_disk_type_from_path``), else by the libvirt driver
format of the ``<disk>``:

========================================  ======  ======  ================
root ``<disk>`` in the domain XML          Nova    target  worker plan
========================================  ======  ======  ================
``type='file'``, driver type qcow2        qcow2   qcow2   stream
``type='file'``, driver type raw          raw     raw     stream
``type='network' protocol='rbd'``         rbd     raw     clone when Glance
  (``images_type = rbd``; path                            has an rbd store
  ``rbd:<pool>/<image>``)                                 in the same
                                                          cluster, else
                                                          stream
``type='block'`` under ``/dev``           lvm     raw     stream (read in
  (``images_type = lvm``)                                 full)
========================================  ======  ======  ================

ploop is Virtuozzo's and the worker has no source for it, so it stays on
Nova's path.
"""

#: ``[snapworker] disk_types`` default: every type the worker has a source
#: for, under the name Nova 34 gives it.
DELEGATED_TYPES = ('qcow2', 'raw', 'rbd', 'lvm')

#: Backends whose disks are raw block data, not an image file format:
#: Nova saves their snapshots as raw (its "save lvm and rbd as raw").
_RAW_BACKENDS = ('lvm', 'rbd')


def image_format(source_type, snapshot_image_format=None):
    """The Glance disk format of the snapshot, chosen as Nova chooses it.

    ``[libvirt] snapshot_image_format`` wins; otherwise the disk's own
    type, with the block backends mapped to ``raw``. The result is both
    the image's ``disk_format`` and the worker's ``target_format``, so a
    raw target is what lets the worker clone an RBD disk instead of
    converting it.
    """
    fmt = snapshot_image_format or source_type
    if fmt in _RAW_BACKENDS:
        return 'raw'
    return fmt
