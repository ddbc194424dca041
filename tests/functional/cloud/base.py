"""Driving the one-machine OpenStack as its users do, and watching it.

The client is python-openstackclient (the ``openstack`` CLI, one process
per command, as a user would type it), with the member user of project
``demo`` unless a test needs an admin. Beside it, observers record what
the API, libvirt and the notification bus show while a command runs:

* ``Observer``: polls the server through the compute API (0.1 s) and its
  domain through libvirt (0.02 s), keeping each change with its time: the task
  and power states a user sees, and how long the guest was not running.
* ``Bus``: a private copy of every notification on Nova's exchange
  (Nova's own and the worker's), via ``snapworker.events.Subscription``.

Servers are tiny (FLAVOR: 128 MiB, 1 GiB disk) and boot no OS: the image
is a small qcow2 with known data, and the guest stays in SeaBIOS, so its
disk never changes under the tests' comparisons.
"""

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

import libvirt
import oslo_messaging as messaging
import testtools
from oslo_config import cfg

from snapworker import events
from tests.functional import base
from tests.functional.nova import test_driver as nova_driver_tests
from tests.services import openstack

#: Task states of a cold snapshot as the API shows them with Nova's own
#: driver: the API's and the compute manager's, then the driver's (its
#: cold path goes through the upload states twice). What the API shows of
#: any snapshot is a part of this, polling missing some.
NOVA_SNAPSHOT_TASK_STATES = (
    ("image_snapshot_pending", "image_snapshot")
    + tuple(state for state, _ in nova_driver_tests.NOVA_COLD_TASK_STATES))
#: Bytes the tests' image carries: (offset, length, byte).
IMAGE_WRITES = ((0, 1 << 20, 0x5a), (20 << 20, 3 << 20, 0xa5),
                ((64 << 20) - 4096, 4096, 0x3c))


def is_subsequence(seen, sequence):
    """seen is sequence with some items left out, none added or moved."""
    rest = iter(sequence)
    return all(item in rest for item in seen)


def compare_images(first, second):
    """``qemu-img compare -U``: same guest-visible content; -U reads a
    disk that a running QEMU holds locked."""
    proc = subprocess.run(["qemu-img", "compare", "-U", first, second],
                          capture_output=True, text=True)
    return proc.returncode == 0, proc.stdout + proc.stderr


def cli(cloud, *args, admin=False, json_out=True, check=True, timeout=600):
    """Run ``openstack ARGS`` as the member (or admin); parsed JSON
    output, or the CompletedProcess when check is False."""
    env = dict(os.environ, OS_CLIENT_CONFIG_FILE=cloud["clouds_yaml"],
               OS_CLOUD=openstack.PREFIX + ("-admin" if admin else ""))
    argv = [os.path.join(openstack.BIN, "openstack"), *args]
    if json_out:
        argv += ["-f", "json"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if not check:
        return proc
    if proc.returncode != 0:
        raise AssertionError("openstack %s failed (%d):\n%s" % (
            " ".join(args), proc.returncode, proc.stderr[-3000:]))
    return json.loads(proc.stdout) if json_out else proc.stdout


def make_firmware_image(path):
    """A 64 MiB qcow2 with IMAGE_WRITES and no boot sector: a guest of it
    stays in the firmware, so its disk never changes."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"],
                   check=True)
    for offset, length, byte in IMAGE_WRITES:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d %d %d"
                        % (byte, offset, length), path],
                       check=True, capture_output=True)


def upload_image(cloud, path, name, admin=False):
    return cli(cloud, "image", "create", "--disk-format", "qcow2",
               "--container-format", "bare", "--file", path, name,
               admin=admin)["id"]


class Bus(threading.Thread):
    """Every notification on the cloud's ``nova`` exchange, from now on."""

    def __init__(self, transport_url):
        super().__init__(daemon=True)
        conf = cfg.ConfigOpts()
        conf([], project="snapcloud-tests", default_config_files=[])
        # Registers the messaging and rabbit options Subscription reads.
        messaging.get_notification_transport(conf, url=transport_url)
        conf.set_override("control_exchange", "nova")
        conf.set_override("transport_url", transport_url,
                          group="oslo_messaging_notifications")
        conf.set_override("topics", ["notifications",
                                     "versioned_notifications"],
                          group="oslo_messaging_notifications")
        self._sub = events.Subscription(conf, publisher_prefix="")
        self._done = threading.Event()
        self.events = []

    def run(self):
        while not self._done.is_set():
            event = self._sub.wait(0.3)
            if event is not None:
                self.events.append((time.monotonic(), event))

    def close(self):
        self._done.set()
        self.join(5)
        self._sub.close()

    def worker_events(self, image_id):
        return [(t, e) for t, e in self.events
                if e.publisher_id.startswith("snapworker:")
                and e.payload.get("image_id") == image_id]

    def nova_events(self, instance_uuid, prefix="instance.snapshot."):
        """Nova's versioned notifications about one instance."""
        found = []
        for t, e in self.events:
            data = e.raw_payload.get("nova_object.data", {})
            if (e.event_type.startswith(prefix)
                    and data.get("uuid") == instance_uuid):
                found.append((t, e))
        return found


class Observer:
    """Server (API) and domain (libvirt) states of one server, as they
    change, each with its monotonic time.

    Two pollers: the API every 0.1 s, the domain every 0.02 s on its own,
    so a slow API answer (a loaded machine: 0.5 s and more) does not blur
    the guest's states and the time it was held.
    """

    def __init__(self, cloud, server_id, api_interval=0.1,
                 guest_interval=0.02):
        self._cloud, self._id = cloud, server_id
        self._done = threading.Event()
        self.api = []      # (t, (status, task_state, power_state))
        self.guest = []    # (t, libvirt state name)
        self.errors = []
        self._threads = [
            threading.Thread(target=self._guarded, args=(poll, interval),
                             daemon=True)
            for poll, interval in ((self._poll_api, api_interval),
                                   (self._poll_guest, guest_interval))]

    def start(self):
        for thread in self._threads:
            thread.start()

    def _guarded(self, poll, interval):
        try:
            poll(interval)
        except Exception as exc:  # reported by the test, not swallowed
            self.errors.append(repr(exc))

    def _get_server(self, token):
        status, _, body = openstack.request(
            "GET", "%s/servers/%s" % (self._cloud["urls"]["compute"],
                                      self._id), token)
        return body["server"] if status == 200 else None

    def _poll_api(self, interval):
        token, token_time = None, 0
        while not self._done.is_set():
            if time.monotonic() - token_time > 60:
                token, token_time = (openstack.admin_token(self._cloud),
                                     time.monotonic())
            server = self._get_server(token)
            if server is not None:
                self._record(self.api, (
                    server["status"], server["OS-EXT-STS:task_state"],
                    server["OS-EXT-STS:power_state"]))
            time.sleep(interval)

    def _poll_guest(self, interval):
        name = self._get_server(openstack.admin_token(self._cloud))[
            "OS-EXT-SRV-ATTR:instance_name"]
        conn = libvirt.open(openstack.LIBVIRT_URI)
        try:
            domain = conn.lookupByName(name)
            while not self._done.is_set():
                self._record(self.guest, _domain_state(domain))
                time.sleep(interval)
        finally:
            conn.close()

    @staticmethod
    def _record(series, value):
        if not series or series[-1][1] != value:
            series.append((time.monotonic(), value))

    def settle(self, timeout=120):
        """Wait until the API shows no task state and the guest is back in
        the state it started in: what follows the image going active
        (Nova's compute manager clears the task state only after the
        driver returns) takes longer on a loaded or emulated host."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.errors:
            api, guest = list(self.api), list(self.guest)
            if (api and api[-1][1][1] is None and guest
                    and guest[-1][1] == guest[0][1]):
                return
            time.sleep(0.1)

    def close(self):
        self._done.set()
        for thread in self._threads:
            thread.join(10)

    def task_states(self):
        """Task states seen, each change once (None included)."""
        states = []
        for _, (_, task_state, _) in self.api:
            if not states or states[-1] != task_state:
                states.append(task_state)
        return states

    def held_seconds(self):
        """Seconds the guest, running at first, was not running."""
        if not self.guest or self.guest[0][1] != "running":
            return None
        held, since = 0.0, None
        for t, state in self.guest:
            if state != "running" and since is None:
                since = t
            elif state == "running" and since is not None:
                held, since = held + t - since, None
        return held if since is None else None


_DOMAIN_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
}


def _domain_state(domain):
    try:
        state, reason = domain.state()
    except libvirt.libvirtError:
        return "no domain"
    name = _DOMAIN_STATES.get(state, str(state))
    if (state == libvirt.VIR_DOMAIN_SHUTOFF
            and reason == libvirt.VIR_DOMAIN_SHUTOFF_SAVED):
        name = "shutoff (saved)"
    return name


class CloudTestCase(testtools.TestCase):
    """Skips unless the test run started the cloud (``--with-cloud``)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.cloud = base.shared_services().get("cloud")
        if cls.cloud is None:
            raise cls.skipException("no cloud in this test run: "
                                    "tests.services up --with-cloud")
        cls.workdir = tempfile.mkdtemp(prefix="snapcloud-test-")
        image_file = os.path.join(cls.workdir, "firmware-only.qcow2")
        make_firmware_image(image_file)
        cls.image_id = upload_image(cls.cloud, image_file,
                                    "snapcloud-firmware-only")

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "image_id", None):
            cls.cli("image", "delete", cls.image_id, json_out=False)
        shutil.rmtree(cls.workdir, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.bus = Bus(self.cloud["transport_url"])
        self.bus.start()
        self.addCleanup(self.bus.close)

    # -- the CLI

    @classmethod
    def cli(cls, *args, **kwargs):
        return cli(cls.cloud, *args, **kwargs)

    def timed_cli(self, *args, **kwargs):
        """cli(), and the seconds the client waited for it."""
        t0 = time.monotonic()
        result = self.cli(*args, **kwargs)
        return result, time.monotonic() - t0

    # -- servers and images

    def boot(self, name, image_id=None, stopped=False):
        """A server ACTIVE (or SHUTOFF), owned by the member."""
        server = self.cli(
            "server", "create", "--flavor", openstack.FLAVOR, "--image",
            image_id or self.image_id, "--nic", "none", "--wait",
            "%s-%s" % (name, self.id().split(".")[-1]))
        self.addCleanup(self.delete_server, server["id"])
        self.assertEqual("ACTIVE", server["status"])
        if stopped:
            self.cli("server", "stop", server["id"], json_out=False)
            self.wait_for_server(server["id"], "SHUTOFF")
        return server["id"]

    def delete_server(self, server_id):
        self.cli("server", "delete", "--wait", server_id, json_out=False,
                 admin=True, check=False)

    def server(self, server_id):
        """The server as an admin sees it (all OS-EXT-* fields)."""
        status, _, body = openstack.request(
            "GET", "%s/servers/%s" % (self.cloud["urls"]["compute"],
                                      server_id),
            openstack.admin_token(self.cloud))
        self.assertEqual(200, status, body)
        return body["server"]

    def wait_for_server(self, server_id, status, task_state=None,
                        timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            server = self.server(server_id)
            if (server["status"] == status
                    and server["OS-EXT-STS:task_state"] == task_state):
                return server
            if time.monotonic() > deadline:
                self.fail("server %s is %s/%s, not %s/%s after %d s" % (
                    server_id, server["status"],
                    server["OS-EXT-STS:task_state"], status, task_state,
                    timeout))
            time.sleep(0.5)

    def disk_path(self, server_id):
        return os.path.join(self.cloud["instances_path"], server_id, "disk")

    def image_status(self, image_id):
        """Glance's status of an image, ``deleted`` when it is gone."""
        status, _, body = openstack.request(
            "GET", "%s/v2/images/%s" % (self.cloud["urls"]["image"],
                                        image_id),
            openstack.admin_token(self.cloud))
        if status == 404:
            return "deleted"
        self.assertEqual(200, status, body)
        return body["status"]

    def image_by_name(self, name):
        images = self.cli("image", "list", "--name", name, admin=True)
        return images[0]["ID"] if images else None

    def download(self, image_id):
        path = os.path.join(self.workdir, image_id)
        self.cli("image", "save", "--file", path, image_id, json_out=False)
        self.addCleanup(os.unlink, path)
        return path

    def snapshot(self, server_id, name, check=True):
        """``openstack server image create --wait``, observed.

        Returns (image or CompletedProcess, seconds waited, Observer).
        """
        observer = Observer(self.cloud, server_id)
        observer.start()
        try:
            image, waited = self.timed_cli(
                "server", "image", "create", "--wait", "--name", name,
                server_id, check=check)
            # The last transitions after the image went active.
            observer.settle()
        finally:
            observer.close()
        self.assertEqual([], observer.errors)
        if check:
            self.addCleanup(self.cli, "image", "delete", image["id"],
                            admin=True, json_out=False, check=False)
        return image, waited, observer

    def final_worker_event(self, image_id, timeout=30):
        """The worker's last notification about image_id (waits a bit:
        the bus may lag the API)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.bus.worker_events(image_id)
            if found and found[-1][1].event_type in (
                    "snapshot.create.end", "snapshot.create.error",
                    "snapshot.create.refused"):
                return found[-1][1]
            time.sleep(0.2)
        self.fail("no final worker event for %s: %s" % (
            image_id, [e.event_type for _, e in self.bus.worker_events(
                image_id)]))
