"""A TCP relay to Glance that holds image uploads back until told.

Stands in for a slow network between the worker and Glance, so that an
upload can be made to reach Glance after the user's token expired, which
no image small enough for a test would otherwise do. Only requests whose
first line is ``PUT /v2/images/<id>/file`` wait, until ``release(headers)``
says they may go on (asked once a second); everything else (and the held
request, once released) is relayed byte for byte, both ways.
"""

import re
import socket
import threading
import time

_UPLOAD = re.compile(rb"^PUT /v2/images/[^/ ]+/file ")


class HoldingProxy:

    def __init__(self, target_port, release, timeout):
        """release(headers): true once a held upload may go on; headers
        is the request's {lower-case name: value}. An upload is let go
        after timeout seconds in any case, recorded in ``released`` as
        False (True when release() let it go)."""
        self.held = 0
        self.released = []
        self._release, self._timeout = release, timeout
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
            first = _read_head(client)
            if _UPLOAD.match(first):
                self.held += 1
                self.released.append(self._hold(_headers(first)))
            upstream.sendall(first)
            back = threading.Thread(target=_pump, args=(upstream, client),
                                    daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()

    def _hold(self, headers):
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._release(headers):
                return True
            time.sleep(1)
        return False


def _read_head(sock):
    """What the client sent up to the end of the request's headers (and
    any body bytes that came with them)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _headers(head):
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    return {name.strip().lower(): value.strip() for name, _, value in
            (line.partition(":") for line in lines[1:])}


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
