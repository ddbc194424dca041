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

    :param depth: chunks queued at most; ``update`` waits beyond that.
    """

    def __init__(self, algorithm='sha512', depth=4):
        self.algorithm = algorithm
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._hash = hashlib.new(algorithm)
        self._queue = queue.Queue(maxsize=depth)
        self._error = None
        self._result = None
        self._thread = threading.Thread(target=self._run, name='digest',
                                        daemon=True)
        self._thread.start()

    def update(self, data):
        # A copy: the caller may reuse its buffer once this returns.
        self._queue.put(bytes(data))

    def finish(self):
        """``(md5 hex, <algorithm> hex)`` of everything given so far."""
        if self._result is None:
            self._queue.put(_END)
            self._thread.join()
            if self._error is not None:
                raise self._error
            self._result = (self._md5.hexdigest(), self._hash.hexdigest())
        return self._result

    def close(self):
        """Stop the thread whatever happened (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(_END)
            self._thread.join()

    def _run(self):
        while True:
            data = self._queue.get()
            if data is _END:
                return
            try:
                self._md5.update(data)
                self._hash.update(data)
            except Exception as e:  # pragma: no cover - hashlib
                self._error = e
