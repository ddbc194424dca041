"""The body of tools/run-cloud-demo (see there); prints one JSON line last.

A user's path through a real OpenStack whose nova-compute delegates cold
snapshots to snapworker: upload an image, boot a server, stop it, take a
snapshot with ``openstack server image create --wait``, download it and
compare it with the instance disk, boot a server from it. Then the same
kind of running server snapshotted by Nova's own libvirt driver (the
nova-compute restarted with it) and by snapworker, for the times a client
waits and a guest is held.
"""

import json
import os
import sys
import tempfile
import time

from tests.functional.cloud import base
from tests.services import openstack
from tests.services import rabbitmq


def log(message):
    print(message, file=sys.stderr, flush=True)


class Demo:

    def __init__(self, cloud, workdir):
        self.cloud, self.workdir = cloud, workdir
        self.servers, self.images = [], []

    def cli(self, *args, **kwargs):
        return base.cli(self.cloud, *args, **kwargs)

    def boot(self, name, image_id):
        server = self.cli("server", "create", "--flavor", openstack.FLAVOR,
                          "--image", image_id, "--nic", "none", "--wait",
                          name)
        self.servers.append(server["id"])
        log("server %s %s" % (name, server["status"]))
        return server

    def wait_for(self, server_id, status, timeout=120):
        deadline = time.monotonic() + timeout
        while self.cli("server", "show", server_id,
                       admin=True)["status"] != status:
            if time.monotonic() > deadline:
                raise RuntimeError("%s not %s" % (server_id, status))
            time.sleep(1)

    def snapshot(self, server_id, name):
        observer = base.Observer(self.cloud, server_id)
        observer.start()
        t0 = time.monotonic()
        try:
            image = self.cli("server", "image", "create", "--wait", "--name",
                             name, server_id)
        finally:
            waited = time.monotonic() - t0
            time.sleep(1)
            observer.close()
        self.images.append(image["id"])
        log("snapshot %s: %s after %.1f s; task states %s; guest %s" % (
            name, image["status"], waited, observer.task_states(),
            [s for _, s in observer.guest]))
        return image, waited, observer

    def disk(self, server_id):
        return os.path.join(self.cloud["instances_path"], server_id, "disk")

    def run(self, bus):
        path = os.path.join(self.workdir, "firmware-only.qcow2")
        base.make_firmware_image(path)
        image_id = base.upload_image(self.cloud, path, "demo-firmware-only")
        self.images.append(image_id)
        server = self.boot("demo", image_id)
        self.stop(server["id"])
        snap, api_wait, observer = self.snapshot(server["id"],
                                                 "demo-snapshot")
        downloaded = os.path.join(self.workdir, "snapshot")
        self.cli("image", "save", "--file", downloaded, snap["id"],
                 json_out=False)
        identical, _ = base.compare_images(downloaded,
                                           self.disk(server["id"]))
        copy = self.boot("demo-from-snapshot", snap["id"])
        copy_identical, _ = base.compare_images(self.disk(copy["id"]),
                                                self.disk(server["id"]))
        end = _end_payload(bus, snap["id"])
        result = {
            "server_id": server["id"], "image_id": snap["id"],
            "status": snap["status"], "identical": identical,
            "booted_from_snapshot": (copy["status"] == "ACTIVE"
                                     and copy_identical),
            "strategy": end.get("strategy"),
            "scratch_bytes": end.get("scratch_bytes"),
            "api_wait_seconds": round(api_wait, 2),
        }
        sequences = {"stopped": _sequences(observer)}
        # The same kinds of server through Nova's own driver (nova-compute
        # restarted with it), and a running one through snapworker.
        native = {kind: self.boot("demo-native-" + kind, image_id)
                  for kind in ("stopped", "running")}
        delegated_running = self.boot("demo-running", image_id)
        self.stop(native["stopped"]["id"])
        openstack.use_driver(self.cloud, "native")
        try:
            snap, waited, observer = self.snapshot(native["stopped"]["id"],
                                                   "demo-native-stopped")
            result["native_api_wait_seconds"] = round(waited, 2)
            # Nova extracts the whole image into snapshots_directory and
            # uploads that file: the image's size is what it wrote there.
            result["native_scratch_bytes"] = snap.get("size")
            sequences["native_stopped"] = _sequences(observer)
            _, waited, observer = self.snapshot(native["running"]["id"],
                                                "demo-native-running")
            result["native_running_api_wait_seconds"] = round(waited, 2)
            result["native_guest_held_seconds"] = _round(
                observer.held_seconds())
            sequences["native_running"] = _sequences(observer)
        finally:
            openstack.use_driver(self.cloud, "snapworker")
        snap, waited, observer = self.snapshot(delegated_running["id"],
                                               "demo-running")
        end = _end_payload(bus, snap["id"])
        result.update(
            running_api_wait_seconds=round(waited, 2),
            guest_held_seconds=_round(observer.held_seconds()),
            running_strategy=end.get("strategy"),
            running_scratch_bytes=end.get("scratch_bytes"),
            running_source_held_seconds=end.get("source_held_seconds"))
        sequences["running"] = _sequences(observer)
        result["sequences"] = sequences
        return result

    def stop(self, server_id):
        self.cli("server", "stop", server_id, json_out=False)
        self.wait_for(server_id, "SHUTOFF")

    def clean(self):
        for server_id in self.servers:
            self.cli("server", "delete", "--wait", server_id, admin=True,
                     json_out=False, check=False)
        for image_id in self.images:
            self.cli("image", "delete", image_id, admin=True,
                     json_out=False, check=False)


def _end_payload(bus, image_id, timeout=30):
    """The worker's snapshot.create.end payload for image_id ({} if none
    came within timeout: the bus may lag the API)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, event in bus.worker_events(image_id):
            if event.event_type == "snapshot.create.end":
                return event.payload
        time.sleep(0.2)
    return {}


def _sequences(observer):
    """Task states seen through the API and guest states through
    libvirt, each change once."""
    return {"task_states": observer.task_states(),
            "guest": [state for _, state in observer.guest]}


def _round(seconds):
    return None if seconds is None else round(seconds, 2)


def main():
    workdir = tempfile.mkdtemp(prefix="snapcloud-demo-")
    t0 = time.monotonic()
    svc = openstack.start(os.path.join(workdir, "cloud"),
                          rabbitmq.ensure_running())
    bring_up = time.monotonic() - t0
    log("cloud up in %.1f s" % bring_up)
    cloud = svc.to_dict()
    demo = Demo(cloud, workdir)
    bus = base.Bus(cloud["transport_url"])
    bus.start()
    try:
        result = demo.run(bus)
        result["bring_up_seconds"] = round(bring_up, 1)
    finally:
        bus.close()
        demo.clean()
        svc.stop()
    print(json.dumps(result))
    return 0 if result["identical"] and result["booted_from_snapshot"] else 1


if __name__ == "__main__":
    sys.exit(main())
