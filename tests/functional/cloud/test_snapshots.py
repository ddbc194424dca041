"""Snapshots taken through a real OpenStack, as its users take them.

One class: the tests restart the cloud's worker and change its
configuration, so they must not run in parallel with each other.
tools/run-tests gives them one stestr worker of their own
(tools/stestr-workers.yaml) while the rest of the suite runs in the other.
"""

import configparser
import json
import os
import shutil
import subprocess
import urllib.parse

from testtools import content

from tests.functional import base as functional_base
from tests.functional.cloud import base
from tests.functional.cloud import proxy
from tests.services import openstack


class CloudSnapshotTest(base.CloudTestCase):

    def restart_worker(self, conf_path=None):
        openstack.stop_process(self.cloud, "worker")
        openstack.start_worker(self.cloud, conf_path)

    def worker_conf_variant(self, name, changes, drop_sections=()):
        """A copy of the plugin's snapworker.conf with changes
        ``{(section, key): value}``, used until the test ends."""
        cp = configparser.RawConfigParser(strict=False)
        cp.optionxform = str
        cp.read(self.cloud["worker_conf"])
        for section in drop_sections:
            cp.remove_section(section)
        for (section, key), value in changes.items():
            if section != "DEFAULT" and not cp.has_section(section):
                cp.add_section(section)
            cp.set(section, key, str(value))
        path = os.path.join(self.workdir, name + ".conf")
        with open(path, "w") as f:
            cp.write(f)
        self.restart_worker(path)
        self.addCleanup(self.restart_worker)
        return path

    def record(self, name, value):
        """Keep a measurement: in the test's details, and in the cloud's
        logs/measurements.jsonl, which outlives a passing run."""
        self.addDetail(name, content.json_content(value))
        path = os.path.join(self.cloud["state_dir"], "logs",
                            "measurements.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"test": self.id(), name: value}) + "\n")

    def assertSnapshotTaskStates(self, observer):
        """What the API showed: Nova's snapshot states, in Nova's order
        (polling may miss short ones), then none."""
        seen = observer.task_states()
        self.assertIsNone(seen[-1], seen)
        during = [s for s in seen if s is not None]
        self.assertTrue(during, seen)
        self.assertTrue(base.is_subsequence(
            during, base.NOVA_SNAPSHOT_TASK_STATES), seen)
        return seen

    # -- (1) stopped server: a stream, no scratch

    def test_stopped_server_snapshot_boots(self):
        server_id = self.boot("stopped", stopped=True)
        image, waited, observer = self.snapshot(server_id, "snap-stopped")
        self.assertEqual("active", image["status"])
        self.record("api", {"api_wait_seconds": waited,
                            "task_states": observer.task_states()})
        self.assertSnapshotTaskStates(observer)

        disk = self.disk_path(server_id)
        same, out = base.compare_images(self.download(image["id"]), disk)
        self.assertTrue(same, out)

        end = self.final_worker_event(image["id"])
        self.assertEqual("snapshot.create.end", end.event_type)
        self.assertEqual("stream", end.payload["strategy"])
        self.assertEqual(0, end.payload["scratch_bytes"])

        copy_id = self.boot("from-snap", image_id=image["id"])
        self.assertEqual("ACTIVE", self.server(copy_id)["status"])
        same, out = base.compare_images(self.disk_path(copy_id), disk)
        self.assertTrue(same, out)

    # -- (2) running server, cold path

    def test_running_server_is_resumed(self):
        server_id = self.boot("running")
        image, waited, observer = self.snapshot(server_id, "snap-running")
        self.assertEqual("active", image["status"])
        seen = self.assertSnapshotTaskStates(observer)
        guest = [state for _, state in observer.guest]
        self.record("observed", {"task_states": seen, "guest": guest,
                                 "api_wait_seconds": waited,
                                 "guest_held_seconds":
                                     observer.held_seconds()})

        server = self.wait_for_server(server_id, "ACTIVE")
        self.assertEqual(1, server["OS-EXT-STS:power_state"])  # Running
        # Nova suspended it (managed save) and it runs again.
        self.assertEqual("running", guest[0])
        self.assertIn("shutoff (saved)", guest)
        self.assertEqual("running", guest[-1])

        worker = [e.event_type for _, e in
                  self.bus.worker_events(image["id"])]
        self.assertEqual("snapshot.create.start", worker[0])
        self.assertIn("snapshot.source_released", worker)
        self.assertEqual("snapshot.create.end", worker[-1])
        nova = [e.event_type for _, e in self.bus.nova_events(server_id)]
        self.assertEqual(["instance.snapshot.start", "instance.snapshot.end"],
                         nova)
        # The guest runs again only after the worker released its disk.
        released = [t for t, e in self.bus.worker_events(image["id"])
                    if e.event_type == "snapshot.source_released"][0]
        resumed = [t for t, state in observer.guest if state == "running"][-1]
        self.assertGreater(resumed, released)

        same, out = base.compare_images(self.download(image["id"]),
                                        self.disk_path(server_id))
        self.assertTrue(same, out)

    # -- (3) tokens that expire during the upload

    def _snapshot_outliving_token(self, name):
        """A stopped server, and a relay to Glance that holds each upload
        until the user's token it carries has expired."""
        server_id = self.boot(name, stopped=True)
        glance_port = urllib.parse.urlsplit(self.cloud["urls"]["image"]).port
        relay = proxy.HoldingProxy(
            glance_port,
            lambda headers: not openstack.token_valid(
                self.cloud, headers.get("x-auth-token", "")),
            timeout=openstack.TOKEN_LIFETIME + 120)
        self.addCleanup(relay.close)
        return server_id, relay

    def test_upload_outlives_user_token(self):
        # With the worker's [service_user], as the plugin configures it.
        server_id, relay = self._snapshot_outliving_token("token-ok")
        self.worker_conf_variant("slow-glance", {
            ("glance", "endpoint_override"): relay.url,
            ("glance", "timeout"): 600})
        image, waited, _ = self.snapshot(server_id, "snap-token-ok")
        self.record("with_service_token", {"seconds": waited})
        # The upload reached Glance only once the user's token had expired.
        self.assertEqual([True], relay.released)
        self.assertEqual("active", image["status"])
        same, out = base.compare_images(self.download(image["id"]),
                                        self.disk_path(server_id))
        self.assertTrue(same, out)

    def test_upload_outlives_user_token_without_service_token(self):
        server_id, relay = self._snapshot_outliving_token("token-expired")
        self.worker_conf_variant("slow-glance-no-service-user", {
            ("glance", "endpoint_override"): relay.url,
            ("glance", "timeout"): 600}, drop_sections=["service_user"])
        proc, waited, observer = self.snapshot(
            server_id, "snap-token-expired", check=False)
        self.record("without_service_token", {
            "seconds": waited, "cli": proc.stderr[-2000:],
            "task_states": observer.task_states()})
        self.assertNotEqual(0, proc.returncode)
        self.assertEqual([True], relay.released)
        end = self.bus.worker_events(
            self.worker_image_id(server_id))[-1][1]
        self.assertEqual("snapshot.create.error", end.event_type)
        self.assertIn("401", str(end.payload))
        # Nova cleaned up: image deleted, task state cleared.
        self.assertEqual("deleted", self.image_status(end.image_id))
        self.wait_for_server(server_id, "SHUTOFF", timeout=30)

    def worker_image_id(self, server_id):
        """The image of the worker's only request for server_id."""
        ids = {e.image_id for _, e in self.bus.events
               if e.publisher_id.startswith("snapworker:")
               and e.payload.get("instance_uuid") == server_id}
        self.assertEqual(1, len(ids), ids)
        return ids.pop()

    # -- (4) failures

    def test_worker_stopped_fails_in_bounded_time(self):
        server_id = self.boot("no-worker", stopped=True)
        openstack.stop_process(self.cloud, "worker")
        self.addCleanup(openstack.start_worker, self.cloud)
        proc, waited, observer = self.snapshot(
            server_id, "snap-no-worker", check=False)
        self.record("no_worker", {"seconds": waited,
                                  "task_states": observer.task_states(),
                                  "cli": proc.stderr[-2000:]})
        self.assertNotEqual(0, proc.returncode)
        # accept_timeout, plus the CLI's start-up (~2 s, far more on a
        # loaded machine: 51 s in all was seen), Nova's cleanup and the
        # CLI's 5 s polls.
        self.assertLess(waited, openstack.ACCEPT_TIMEOUT + 60)
        self.assertIsNone(self.image_by_name("snap-no-worker"))
        self.wait_for_server(server_id, "SHUTOFF", timeout=30)
        # Usable again: it starts.
        self.cli("server", "start", server_id, json_out=False)
        self.wait_for_server(server_id, "ACTIVE")

    def test_worker_error_is_an_instance_fault(self):
        server_id = self.boot("outside", stopped=True)
        # A backing file outside the instances path: the worker refuses.
        disk = self.disk_path(server_id)
        backing = json.loads(functional_base.qemu_img(
            "info", "-U", "--output=json", disk))["backing-filename"]
        outside = os.path.join(self.workdir, "outside-base")
        shutil.copy(backing, outside)
        self._rebase(disk, outside)
        self.addCleanup(self._rebase, disk, backing)
        proc, _, _ = self.snapshot(server_id, "snap-outside", check=False)
        self.assertNotEqual(0, proc.returncode)
        self.assertIsNone(self.image_by_name("snap-outside"))
        # Nova's record: the message (cut at 255 characters) and the
        # details, whose traceback ends with the whole exception text.
        message, details = subprocess.run(
            ["mysql", "-N", "-r", "-u", "root", "-e",
             "SELECT message, details FROM %s_nova.instance_faults WHERE "
             "instance_uuid = '%s'" % (openstack.PREFIX, server_id)],
            check=True, capture_output=True, text=True,
        ).stdout.split("\t", 1)
        self.record("fault", {"message": message, "details": details[-800:]})
        self.assertIn("snapworker failed to snapshot", message)
        self.assertIn("outside the instances path", details)
        self.wait_for_server(server_id, "SHUTOFF", timeout=30)

    @staticmethod
    def _rebase(disk, backing):
        subprocess.run(["qemu-img", "rebase", "-u", "-F", "raw", "-b",
                        backing, disk], check=True, capture_output=True)

    # -- (5) Nova's own driver beside snapworker

    def test_native_and_delegated_side_by_side(self):
        """Two like servers: one snapshotted by Nova's own driver (the
        same nova-compute restarted with it), one by snapworker."""
        servers = {driver: self.boot(driver) for driver in
                   ("native", "snapworker")}
        results = {}
        openstack.use_driver(self.cloud, "native")
        try:
            results["native"] = self._observed_snapshot(servers["native"],
                                                        "snap-native")
        finally:
            openstack.use_driver(self.cloud, "snapworker")
        results["snapworker"] = self._observed_snapshot(
            servers["snapworker"], "snap-snapworker")
        self.record("side_by_side", results)
        # Nova's cold path writes the whole image to local disk first.
        self.assertEqual([], self.bus.worker_events(results["native"]["id"]))
        self.assertEqual("snapshot.create.end",
                         results["snapworker"]["worker_event"])
        for result in results.values():
            self.assertIsNotNone(result["guest_held_seconds"], result)

    def _observed_snapshot(self, server_id, name):
        image, waited, observer = self.snapshot(server_id, name)
        self.assertEqual("active", image["status"])
        self.assertSnapshotTaskStates(observer)
        server = self.wait_for_server(server_id, "ACTIVE")
        self.assertEqual(1, server["OS-EXT-STS:power_state"])
        same, out = base.compare_images(self.download(image["id"]),
                                        self.disk_path(server_id))
        self.assertTrue(same, out)
        result = {
            "id": image["id"],
            "api_wait_seconds": round(waited, 2),
            "guest_held_seconds": observer.held_seconds(),
            "task_states": observer.task_states(),
            "guest_states": [s for _, s in observer.guest],
            "image_size": image.get("size"),
        }
        found = self.bus.worker_events(image["id"])
        if found:
            end = self.final_worker_event(image["id"])
            result["worker_event"] = end.event_type
            result.update((key, end.payload.get(key)) for key in (
                "strategy", "scratch_bytes", "source_held_seconds",
                "duration_seconds"))
        return result
