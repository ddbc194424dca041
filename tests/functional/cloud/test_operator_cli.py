"""The operator CLI with real credentials: Keystone, clouds.yaml, a token.

Elsewhere the CLI runs in its noauth development mode against a
Keystone-less Glance. Here it authenticates as every OpenStack client
does (``--os-cloud`` from the cloud's clouds.yaml) against the cloud's
Keystone, creates the image in a Glance behind keystonemiddleware with
the user's token, and the worker acts with the context that token gives:
the member's project owns the image and the instance.
"""

import configparser
import json
import os
import subprocess

import fixtures

from tests.functional.cloud import base
from tests.services import openstack

CLI = os.path.join(openstack.BIN, "snapworker")


class OperatorCliCloudTest(base.CloudTestCase):

    def snapworker(self, *args, admin=False, timeout=300):
        """``snapworker --os-cloud ... ARGS -f json``; (status, JSON lines)."""
        env = dict(os.environ, OS_CLIENT_CONFIG_FILE=self.cloud["clouds_yaml"])
        env.pop("OS_CLOUD", None)
        cloud = openstack.PREFIX + ("-admin" if admin else "")
        proc = subprocess.run(
            [CLI, "--config-file", self.cloud["worker_conf"],
             "--os-cloud", cloud, *args, "-f", "json"],
            env=env, capture_output=True, text=True, timeout=timeout)
        lines = [json.loads(line) for line in proc.stdout.splitlines()
                 if line.startswith("{")]
        return proc.returncode, lines, proc.stderr

    def host(self):
        conf = configparser.ConfigParser(interpolation=None)
        conf.read(self.cloud["worker_conf"])
        return conf["DEFAULT"]["host"]

    def test_snapshot_with_keystone_credentials(self):
        server_id = self.boot("cli-keystone", stopped=True)
        host = self.host()

        code, lines, err = self.snapworker("plan", server_id, "--host", host)
        self.assertEqual(0, code, err)
        self.assertEqual("stream", lines[-1]["strategy"], lines)

        code, lines, err = self.snapworker(
            "snapshot", server_id, "--host", host, "--name", "cli-keystone")
        self.assertEqual(0, code, err)
        end = lines[-1]
        self.assertEqual("snapshot.create.end", end["event_type"], lines)
        image_id = end["payload"]["image_id"]
        self.addCleanup(self.cli, "image", "delete", image_id,
                        json_out=False, check=False)
        # The image is the member's, made with the member's token, and
        # holds the instance's disk.
        image = self.cli("image", "show", image_id)
        self.assertEqual(("active", "snapshot", server_id),
                         (image["status"], image["properties"]["image_type"],
                          image["properties"]["instance_uuid"]))
        project = self.cli("project", "show", openstack.MEMBER["project"],
                           admin=True)["id"]
        self.assertEqual(project, image["owner"])
        same, out = base.compare_images(self.download(image_id),
                                        self.disk_path(server_id))
        self.assertTrue(same, out)

    def test_admin_snapshot_is_shared_with_the_instances_project(self):
        """As Nova's API makes an admin's snapshot of another project's
        server: owned by the admin's project, shared with the server's,
        whose member sees it."""
        server_id = self.boot("cli-admin", stopped=True)
        code, lines, err = self.snapworker(
            "snapshot", server_id, "--host", self.host(), "--name",
            "cli-admin", admin=True)
        self.assertEqual(0, code, err)
        image_id = lines[-1]["payload"]["image_id"]
        self.addCleanup(self.cli, "image", "delete", image_id,
                        json_out=False, check=False, admin=True)
        admin_project, member_project = (
            self.cli("project", "show", name, admin=True)["id"]
            for name in ("admin", openstack.MEMBER["project"]))
        image = self.cli("image", "show", image_id, admin=True)
        self.assertEqual(("active", "shared", admin_project),
                         (image["status"], image["visibility"],
                          image["owner"]))
        self.assertNotIn("instance_owner", image["properties"])
        members = self.cli("image", "member", "list", image_id, admin=True)
        self.assertEqual([member_project],
                         [m["Member ID"] for m in members])
        # The server's owner sees the snapshot of their server.
        self.assertEqual(image_id, self.cli("image", "show", image_id)["id"])

    def test_wrong_password_is_a_credentials_error(self):
        with open(self.cloud["clouds_yaml"]) as f:
            clouds = json.load(f)
        member = clouds["clouds"][openstack.PREFIX]
        right = member["auth"]["password"]
        member["auth"]["password"] = "wrong"
        path = os.path.join(self.useFixture(
            fixtures.TempDir()).path, "clouds.yaml")
        with open(path, "w") as f:
            json.dump({"clouds": {"wrong": member}}, f)
        env = dict(os.environ, OS_CLIENT_CONFIG_FILE=path)
        env.pop("OS_CLOUD", None)
        proc = subprocess.run(
            [CLI, "--config-file", self.cloud["worker_conf"],
             "--os-cloud", "wrong", "plan",
             "00000000-0000-0000-0000-000000000000", "--host", self.host()],
            env=env, capture_output=True, text=True, timeout=120)
        # Exit status 4: credentials or Glance (see snapworker --help);
        # nothing was asked of the worker.
        self.assertEqual((4, ""), (proc.returncode, proc.stdout),
                         proc.stderr)
        self.assertIn("401", proc.stderr)
        # The right password on the command line wins over the file's:
        # authenticated, the worker answers (no such instance: refused,
        # exit 1, the plan's answer on stdout, JSON when piped).
        proc = subprocess.run(
            [CLI, "--config-file", self.cloud["worker_conf"],
             "--os-cloud", "wrong", "--os-password", right, "plan",
             "00000000-0000-0000-0000-000000000000", "--host", self.host()],
            env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(1, proc.returncode, proc.stderr)
        self.assertEqual("InstanceNotFound",
                         json.loads(proc.stdout)["error_code"])
