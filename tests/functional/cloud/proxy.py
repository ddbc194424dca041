"""A TCP relay to Glance that holds image uploads back until a given time.

Stands in for a slow network between the worker and Glance, so that an
upload can be made to reach Glance after the user's token expired, which
no image small enough for a test would otherwise do. Only requests whose
first line is ``PUT /v2/images/<id>/file`` wait; everything else (and the
held request, once released) is relayed byte for byte, both ways.
"""

import re
import socket
import threading
import time

_UPLOAD = re.compile(rb"^PUT /v2/images/[^/ ]+/file ")


class HoldingProxy:

    def __init__(self, target_port, release_at):
        """release_at: time.monotonic() before which uploads wait."""
        self.release_at = release_at
        self.held = 0
        self._target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self._server.close()

    def _accept(self):
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,),
                             daemon=True).start()

    def _relay(self, client):
        with client, socket.create_connection(self._target) as upstream:
            first = client.recv(65536)
            if _UPLOAD.match(first):
                self.held += 1
                time.sleep(max(0.0, self.release_at - time.monotonic()))
            upstream.sendall(first)
            back = threading.Thread(target=_pump, args=(upstream, client),
                                    daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()


def _pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
