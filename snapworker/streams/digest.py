"""Hashing what is uploaded, off the read path's thread.

Glance computes ``checksum`` (md5) and ``os_hash_value`` (its
``hashing_algorithm``, sha512 by default) of what it received. The worker
computes the same over what it sent, and a snapshot whose image does not
match fails: a byte changed between the disk and the store is caught, not
published.

Hashing a GiB costs seconds of CPU (md5 and sha512 together, measured in
benchmarks/), as much as reading it: it runs on a thread of its own fed by
a bounded queue, so the reader keeps reading while the previous chunks
are hashed (hashlib releases the GIL on large buffers), and memory stays
``depth`` chunks.
"""

import hashlib
import queue
import threading

_END = None


class BackgroundDigest:
    """md5 and ``algorithm`` of every byte given to ``update``, in order.

    Each hash runs on a thread of its own, fed by its own bounded queue
    (the same bytes objects, not copies): hashlib releases the GIL, so on
    two cores md5 and sha512 take the time of the slower one, not of both
    (hashing every zero of a big sparse disk is what bounds the direct
    plan; benchmarks/beyond_ingest.py measures it).

    :param depth: chunks queued at most per hash; ``update`` waits beyond
        that.
    """

    def __init__(self, algorithm='sha512', depth=4):
        self.algorithm = algorithm
        self._hashers = (_Hasher(hashlib.md5(usedforsecurity=False), depth),
                         _Hasher(hashlib.new(algorithm), depth))
        self._result = None

    def update(self, data):
        # A copy: the caller may reuse its buffer once this returns
        # (``bytes`` of a ``bytes`` object is that object, no copy).
        data = bytes(data)
        for hasher in self._hashers:
            hasher.queue.put(data)

    def finish(self):
        """``(md5 hex, <algorithm> hex)`` of everything given so far."""
        if self._result is None:
            self._result = tuple(hasher.finish() for hasher in self._hashers)
        return self._result

    def close(self):
        """Stop the threads whatever happened (idempotent)."""
        for hasher in self._hashers:
            hasher.close()


class _Hasher:
    """One hash on a thread of its own."""

    def __init__(self, hash_object, depth):
        self._hash = hash_object
        self.queue = queue.Queue(maxsize=depth)
        self._error = None
        self._thread = threading.Thread(target=self._run, name='digest',
                                        daemon=True)
        self._thread.start()

    def finish(self):
        self.close()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def close(self):
        if self._thread.is_alive():
            self.queue.put(_END)
            self._thread.join()

    def _run(self):
        while True:
            data = self.queue.get()
            if data is _END:
                return
            try:
                self._hash.update(data)
            except Exception as e:  # pragma: no cover - hashlib
                self._error = e
