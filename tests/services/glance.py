"""A real Glance API (from PyPI, in .venv-glance) for tests and the demo.

Glance 33 has no standalone ``glance-api`` server: the WSGI application is
served by uWSGI from the ``pyuwsgi`` wheel. There is no Keystone; two paste
pipelines stand in for it:

``trusted-headers`` (default)
    Glance's ``context`` middleware without ``authtoken``: it trusts the
    headers keystonemiddleware would have set, so callers send
    ``X-Identity-Status: Confirmed``, ``X-Project-Id``, ``X-User-Id`` and
    ``X-Roles`` (see IDENTITY_HEADERS) and the new policy defaults apply as
    in production.
``unauthenticated``
    Every request is an admin context. Nova's image API sends only
    X-Auth-Token, so code that runs Nova's own Glance calls needs this one,
    with the new policy defaults off (an admin without roles gets 403).

Usage::

    svc = glance.start(state_dir)
    ...  # talk to svc.url
    svc.stop()

A Glance that the whole test run shares keeps its data in MariaDB
(``database=``, see mariadb.py for why); a test's private Glance may use
sqlite in its state dir.
"""

import contextlib
import dataclasses
import os
import sqlite3
import textwrap
import time
import urllib.error
import urllib.request
import uuid

import glanceclient

from tests import services
from tests.services import mariadb

# tools/setup-env builds it; GLANCE_VENV points elsewhere, as there.
VENV = os.environ.get("GLANCE_VENV",
                      os.path.join(services.REPO_ROOT, ".venv-glance"))
PIPELINES = ("trusted-headers", "unauthenticated")

# The identity a trusted-headers Glance sees for callers sending these:
# a member and admin of one project (member owns images, admin may do the
# rest), plus the service role the v2.17 location API requires.
IDENTITY_HEADERS = {
    "X-Identity-Status": "Confirmed",
    "X-Project-Id": "6f1e9a3c0b7d4e2a9c5b8d1f0e3a7c24",
    "X-User-Id": "0c2b5f1d8e9a4c7b9e3d6a2f1b8c5e70",
    "X-Roles": "admin,member,reader,service",
}

# The middleware that turns a request into a RequestContext, per pipeline.
_CONTEXT_FILTER = {
    "trusted-headers": "context",
    "unauthenticated": "unauthenticated-context",
}

# uWSGI settings Glance needs (measured): without "Connection: close" the
# second request on a kept-alive connection is reset; chunked uploads need
# the chunked-input flags and a limit above the default 1 MiB per chunk;
# a long socket timeout lets a slow client stream a big image.
_UWSGI_FLAGS = (
    "--master", "--lazy-apps", "--enable-threads", "--need-app",
    "--die-on-term", "--strict", "--vacuum",
    "--module", "glance.wsgi.api:application",
    "--add-header", "Connection: close",
    "--http-chunked-input", "--http-auto-chunked", "--http-raw-body",
    "--chunked-input-limit", str(64 * 1024 * 1024),
    "--socket-timeout", "3600",
    "--buffer-size", "65535",
)


@dataclasses.dataclass
class GlanceService:
    """A running Glance API; ``url`` is its endpoint without a version."""

    url: str
    state_dir: str
    log_path: str
    pid: int
    pipeline: str
    #: The MariaDB database (and user) of its data; None: sqlite.
    database: str | None = None

    def to_dict(self):
        """Return a JSON-serialisable description, for stop_from_dict()."""
        return dataclasses.asdict(self)

    def stop(self, timeout=15):
        """Stop uWSGI and its workers; return when they are gone."""
        services.stop_group(self.pid, timeout)

    def client(self):
        """Return a glanceclient v2 client that this Glance accepts.

        The identity headers go on the session: glanceclient's
        ``identity_headers=`` percent-encodes values ("admin%2Cmember"),
        which Glance then rejects with 403. The unauthenticated pipeline
        ignores them but glanceclient still wants some token.
        """
        client = glanceclient.Client("2", endpoint=self.url, token="unused")
        if self.pipeline == "trusted-headers":
            client.http_client.session.headers.update(IDENTITY_HEADERS)
        return client


def stop_from_dict(d, timeout=15):
    """Stop a Glance started by another process, from its to_dict(),
    for good: its MariaDB database goes too."""
    services.stop_group(d["pid"], timeout)
    if d.get("database"):
        mariadb.drop_database(d["database"])


def start(state_dir, rbd=None, pipeline="trusted-headers", processes=1,
          timeout=60, port=None, database=None):
    """Start Glance with its config, database and stores under state_dir.

    rbd, if given, adds a ``ceph`` rbd store beside the default ``local``
    file store: a dict with ``ceph_conf``, ``user``, ``pool``, ``keyring``.
    One uWSGI process by default: with several, Glance's sqlite database
    answers concurrent writes with "database is locked" (HTTP 500) even in
    WAL mode, because a read transaction cannot upgrade to a write after
    another process committed. Requests queue instead. Returns a GlanceService
    once ``/versions`` answers; raises services.ServiceError otherwise.
    ``port``: a given port, to restart a stopped Glance where it was (its
    database and stores stay in state_dir).
    ``database``: keep the data in this new MariaDB database (dropped by
    stop_from_dict) instead of sqlite in state_dir.
    """
    if pipeline not in PIPELINES:
        raise ValueError("pipeline must be one of %s" % (PIPELINES,))
    if not os.path.exists(os.path.join(VENV, "bin", "uwsgi")):
        raise services.ServiceError("no Glance in %s: run tools/setup-env"
                                    % VENV)
    state_dir = os.path.abspath(state_dir)
    for sub in ("images", "staging", "tasks", "locks"):
        os.makedirs(os.path.join(state_dir, sub), exist_ok=True)
    port = port or services.free_port()
    if database:
        db_url = mariadb.create_database(database, uuid.uuid4().hex)
    else:
        db_url = "sqlite:///%s/glance.sqlite" % state_dir
    conf_path = _write_config(state_dir, port, pipeline, rbd, db_url)
    log_path = os.path.join(state_dir, "glance.log")
    _db_sync(state_dir, conf_path, log_path, sqlite=not database)
    url = "http://127.0.0.1:%d" % port
    log_start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    proc = services.spawn(
        [os.path.join(VENV, "bin", "uwsgi"), *_UWSGI_FLAGS,
         "--http-socket", "127.0.0.1:%d" % port,
         "--processes", str(processes)],
        log_path, env=_environ(state_dir), cwd=state_dir)
    svc = GlanceService(url, state_dir, log_path, proc.pid, pipeline,
                        database)
    try:
        services.wait_until(lambda: _answers(url), timeout,
                            "Glance at %s" % url, log_path, proc)
        _check_stores(log_path, log_start)
    except BaseException:
        svc.stop()
        raise
    return svc


def _environ(state_dir):
    """Return the environment for Glance's processes.

    OS_GLANCE_CONFIG_DIR is how the WSGI entry point finds glance-api.conf.
    """
    env = dict(os.environ)
    env["OS_GLANCE_CONFIG_DIR"] = state_dir
    env["PATH"] = os.path.join(VENV, "bin") + os.pathsep + env["PATH"]
    env.pop("CEPH_ARGS", None)
    return env


def _db_sync(state_dir, conf_path, log_path, sqlite=True):
    """Create the schema once; a failed sync leaves no sqlite database."""
    db_path = os.path.join(state_dir, "glance.sqlite")
    if sqlite and os.path.exists(db_path):
        return
    proc = services.spawn(
        [os.path.join(VENV, "bin", "glance-manage"),
         "--config-file", conf_path, "db_sync"],
        log_path, env=_environ(state_dir), cwd=state_dir)
    if proc.wait() != 0:
        if os.path.exists(db_path):
            os.unlink(db_path)
        raise services.ServiceError("glance-manage db_sync failed; log %s:\n%s"
                                    % (log_path, services.log_tail(log_path)))
    if not sqlite:
        return
    # Several uWSGI processes share the file: in the default rollback
    # journal a reader upgrading to a writer gets "database is locked" at
    # once (HTTP 500) under concurrent requests. WAL mode, which persists
    # in the file, lets readers and one writer proceed together.
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.execute("PRAGMA journal_mode=WAL")


def _check_stores(log_path, offset):
    """Raise ServiceError if a store failed to configure since offset.

    Glance does not refuse to start when a store of several cannot reach
    its backend (e.g. Ceph down): it only logs a warning and disables
    adding to that store. A test setup must fail loudly instead.
    """
    with open(log_path, errors="replace") as log:
        log.seek(offset)
        failures = [line for line in log
                    if "Failed to configure store correctly" in line]
    if failures:
        raise services.ServiceError("Glance store setup failed; log %s:\n%s"
                                    % (log_path, "".join(failures)))


def _answers(url):
    """Tell whether Glance answers GET /versions (200 or 300)."""
    try:
        with urllib.request.urlopen(url + "/versions", timeout=2) as resp:
            return resp.status in (200, 300)
    except urllib.error.HTTPError as exc:
        return exc.code == 300
    except OSError:
        return False


def _write_config(state_dir, port, pipeline, rbd, db_url):
    """Write glance-api.conf and its paste ini; return the conf path."""
    conf_path = os.path.join(state_dir, "glance-api.conf")
    paste_path = os.path.join(state_dir, "glance-api-paste.ini")
    new_defaults = pipeline == "trusted-headers"
    backends = "local:file" + (", ceph:rbd" if rbd else "")
    conf = textwrap.dedent(f"""\
        [DEFAULT]
        enabled_backends = {backends}
        show_multiple_locations = True
        worker_self_reference_url = http://127.0.0.1:{port}
        use_stderr = True

        [database]
        connection = {db_url}

        [glance_store]
        default_backend = local

        [local]
        filesystem_store_datadir = {state_dir}/images/

        [os_glance_staging_store]
        filesystem_store_datadir = {state_dir}/staging/

        [os_glance_tasks_store]
        filesystem_store_datadir = {state_dir}/tasks/

        [oslo_concurrency]
        lock_path = {state_dir}/locks

        [oslo_policy]
        enforce_new_defaults = {new_defaults}
        enforce_scope = {new_defaults}

        [paste_deploy]
        config_file = {paste_path}
        """)
    if rbd:
        conf += _rbd_section(state_dir, rbd)
    with open(conf_path, "w") as f:
        f.write(conf)
    with open(paste_path, "w") as f:
        f.write(_paste_ini(pipeline))
    return conf_path


def _paste_ini(pipeline):
    """Return Glance's paste pipeline without authtoken.

    Version negotiation, the context middleware of the pipeline, then the
    versions and v2 apps: the stock keystone pipeline minus authtoken (and
    minus cors/osprofiler, which tests do not use).
    """
    return textwrap.dedent(f"""\
        [pipeline:glance-api]
        pipeline = versionnegotiation {_CONTEXT_FILTER[pipeline]} rootapp

        [composite:rootapp]
        paste.composite_factory = glance.api:root_app_factory
        /: apiversions
        /v2: apiv2app

        [app:apiversions]
        paste.app_factory = glance.api.versions:create_resource

        [app:apiv2app]
        paste.app_factory = glance.api.v2.router:API.factory

        [filter:versionnegotiation]
        paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

        [filter:context]
        paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory

        [filter:unauthenticated-context]
        paste.filter_factory = glance.api.middleware.context:UnauthenticatedContextMiddleware.factory
        """)  # noqa: E501


def _rbd_section(state_dir, rbd):
    """Return the [ceph] store section for the rbd dict.

    glance_store has no keyring option: librados finds the keyring through
    the ceph.conf it is given. A copy of the cluster's ceph.conf with a
    ``[client.<user>] keyring`` section appended keeps that private to
    Glance (an exported CEPH_ARGS would leak into everything else).
    Without a connect timeout an unreachable cluster hangs Glance's start
    for minutes instead of failing it.
    """
    conf_path = os.path.join(state_dir, "ceph.conf")
    with open(rbd["ceph_conf"]) as src:
        text = src.read()
    with open(conf_path, "w") as dst:
        dst.write(text + "\n[client.%s]\nkeyring = %s\n" % (
            rbd["user"], rbd["keyring"]))
    return textwrap.dedent(f"""
        [ceph]
        rbd_store_pool = {rbd["pool"]}
        rbd_store_user = {rbd["user"]}
        rbd_store_ceph_conf = {conf_path}
        rbd_store_chunk_size = 8
        rados_connect_timeout = 20
        """)


def wait_for_tasks(client, image_id, timeout=60):
    """Poll until every task Glance ran on the image has ended; return it.

    The v2.17 location API starts a ``location_import`` task that hashes
    the image after activating it. Its ``os_hash_value`` appears before
    the task is over: the task then still drops its hashing bookkeeping
    (the ``running-task-*`` file of ``task_cancellation_tracker`` first,
    the image's hidden ``os_glance_hash_op_host`` property after). A
    DELETE in between makes Glance (33.0) try to cancel the hash by that
    file, which is gone: HTTP 500. Waiting for the task's own end closes
    the window.
    """
    deadline = time.monotonic() + timeout
    while True:
        tasks = client.images.get_associated_image_tasks(image_id)['tasks']
        running = [t['id'] for t in tasks
                   if t['status'] not in ('success', 'failure')]
        if not running:
            return client.images.get(image_id)
        if time.monotonic() > deadline:
            raise services.ServiceError(
                "tasks %s of image %s still running after %d s" % (
                    running, image_id, timeout))
        time.sleep(0.1)


def wait_for_status(client, image_id, status, timeout=30):
    """Poll a glanceclient image until it reaches status; return it."""
    deadline = time.monotonic() + timeout
    while True:
        image = client.images.get(image_id)
        if image.status == status:
            return image
        if time.monotonic() > deadline:
            raise services.ServiceError("image %s is %s, not %s after %d s" % (
                image_id, image.status, status, timeout))
        time.sleep(0.1)
