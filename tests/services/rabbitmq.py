"""Make sure a RabbitMQ broker answers on loopback for the messaging tests.

The broker is a machine service (Debian's rabbitmq-server), usually already
running; it is shared, slow to start (~11 s) and cheap to keep, so it is
started when missing and never stopped here.
"""

import glob
import os
import subprocess
import tempfile

from tests import services


def ensure_running(host="127.0.0.1", port=5672, timeout=60):
    """Return the transport URL of a broker on host:port, starting one if
    nothing listens there.

    A broker started here binds to loopback only (node and epmd), so tests
    never expose a guest/guest broker to the network.
    """
    url = "rabbit://guest:guest@%s:%d/" % (host, port)
    if services.port_open(host, port):
        return url
    log_path = os.path.join(tempfile.gettempdir(),
                            "snapworker-rabbitmq-start.log")
    env = dict(os.environ,
               RABBITMQ_NODE_IP_ADDRESS=host,
               RABBITMQ_NODE_PORT=str(port),
               ERL_EPMD_ADDRESS=host)
    with open(log_path, "wb") as log:
        rc = subprocess.call(["rabbitmq-server", "-detached"], env=env,
                             stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT)
    if rc != 0:
        raise services.ServiceError(
            "rabbitmq-server -detached exited %d:\n%s" % (
                rc, services.log_tail(log_path)))
    try:
        services.wait_until(lambda: services.port_open(host, port), timeout,
                            "RabbitMQ on %s:%d" % (host, port), log_path,
                            interval=0.5)
    except services.ServiceError as exc:
        # -detached returns at once; why the node died is in its own log.
        node_log = _newest_broker_log()
        raise services.ServiceError("%s\nnewest broker log %s:\n%s" % (
            exc, node_log, services.log_tail(node_log))) from exc
    return url


def _newest_broker_log():
    """Return the most recently written node log of Debian's broker.

    Its name depends on the node name (rabbitmq-env.conf), so pick by time.
    A listener address pinned in /etc/rabbitmq/rabbitmq.conf wins over
    RABBITMQ_NODE_PORT; this log is where such a clash shows (eaddrinuse).
    """
    logs = glob.glob("/var/log/rabbitmq/*@*.log")
    return max(logs, key=os.path.getmtime, default="/var/log/rabbitmq")
