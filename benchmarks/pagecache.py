"""Cold-cache measurements, shared by the benchmarks in this folder."""

import os


def drop_cache(paths):
    """Write back dirty pages, then empty the page cache; return how.

    The sync matters as much as the drop: a previous run can leave a GiB
    of writes dirty (Glance's store, a scratch copy), and their writeback
    must not land in the next measurement. Without root, only ``paths``
    are evicted (``posix_fadvise``), which the report says.
    """
    os.sync()
    try:
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('1\n')
        return 'drop_caches'
    except OSError:
        for path in paths:
            if os.path.exists(path):
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        return 'fadvise'
