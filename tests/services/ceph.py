"""A real, throw-away, single-node Ceph cluster for functional tests and demo.

Why a real cluster: the RBD strategy (snapshot, copy-on-write clone into the
Glance pool, ``rbd://`` location) is only worth anything if librbd and Glance's
rbd store agree with it, and fakes cannot tell us that.

Shape (each choice measured on a 2-core Debian 12 machine with Ceph 16):

* 1 mon + 1 mgr + 1 OSD, loopback only, everything under ``state_dir``.
* The OSD uses ``memstore`` by default: no disk, every written byte lives in
  OSD RAM. Keep test data small. ``objectstore="bluestore"`` puts BlueStore
  on a sparse file in the state dir instead, for data that does not fit in
  RAM (benchmarks of multi-GiB images): it starts a few seconds slower and
  costs real disk space, up to ``store_bytes``, until :meth:`stop`
  removes the file.
* cephx on; every key is made up front with ``ceph-authtool`` and imported into
  the mon keyring before ``ceph-mon --mkfs``, so no ``ceph auth`` round trips.
* Mon commands go through one librados connection, not the ``ceph`` CLI (each
  CLI call costs 0.3-1 s of Python start-up).
* Daemons run in the foreground (``-f``) as our children in their own
  session, so their PIDs are known exactly and they outlive the starting
  process; another process can stop them with :func:`stop_from_dict`.

Usage::

    cluster = ceph.start("/tmp/x")          # about 4-8 s
    ceph.start("/tmp/y", objectstore="bluestore",
               store_bytes=32 * 1024**3)  # a sparse 32 GiB file
    cluster.client_user, cluster.client_keyring, cluster.conf_path
    json.dump(cluster.to_dict(), f)         # hand over to another process
    cluster.stop()                          # or ceph.stop_from_dict(d)

Also runnable: ``python -m tests.services.ceph start DIR`` prints the JSON
dict; ``python -m tests.services.ceph stop DIR`` stops what ``start`` left.
"""

import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid

import rados

MON_ID = "a"
MGR_ID = "x"
OSD_ID = 0
POOLS = ("vms", "images")
PG_NUM = 8
CLIENT_ID = "snapworker"
MEMSTORE_BYTES = 4 * 1024**3
OBJECTSTORES = ("memstore", "bluestore")
#: Logical size of BlueStore's sparse block file. Disk blocks are only used
#: as data is written, but BlueStore does not give freed space back to the
#: file (no discard on a regular file): what it ever allocated stays used
#: until stop() removes the file, so this is also the worst-case disk use.
BLUESTORE_BYTES = 16 * 1024**3
#: BlueStore's block file, inside the OSD's data dir.
BLOCK_FILE = "block"
#: Mgr modules Pacific insists on ("always on"); importing all of
#: /usr/share/ceph/mgr costs ~7 s of CPU, these ~1 s.
MGR_MODULES = (
    "balancer", "crash", "devicehealth", "orchestrator", "pg_autoscaler",
    "progress", "rbd_support", "status", "telemetry", "volumes",
    "mgr_module.py", "mgr_util.py",
)
MGR_MODULE_SOURCE = "/usr/share/ceph/mgr"
#: object-map and fast-diff make diff_iterate skip unallocated objects;
#: deep-flatten lets a flattened clone drop its parent with snapshots.
RBD_FEATURES = "layering,exclusive-lock,object-map,fast-diff,deep-flatten"
PORT_SPAN = 42  # 2 mon ports + 40 for mgr/OSD messengers (they need ~10)
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
STATE_FILE = "cluster.json"

#: name -> (keyring caps); the client gets only what the rbd profiles allow.
CAPS = {
    "client.admin": {"mon": "allow *", "osd": "allow *", "mds": "allow *",
                     "mgr": "allow *"},
    f"osd.{OSD_ID}": {"mon": "allow profile osd", "mgr": "allow profile osd",
                      "osd": "allow *"},
    f"mgr.{MGR_ID}": {"mon": "allow profile mgr", "osd": "allow *",
                      "mds": "allow *"},
    f"client.{CLIENT_ID}": {
        "mon": "profile rbd",
        "osd": ", ".join(f"profile rbd pool={p}" for p in POOLS),
        "mgr": ", ".join(f"profile rbd pool={p}" for p in POOLS),
    },
}


class CephError(Exception):
    """The cluster did not come up (or go down) as asked; carries log tails."""


@dataclasses.dataclass
class CephCluster:
    """A running cluster: what clients need to connect, and how to stop it.

    ``client_user`` is the cephx id without the ``client.`` prefix (what
    ``rados.Rados(rados_id=...)`` and Glance's ``rbd_store_user`` take).
    ``pids`` maps daemon name (``mon.a``) to PID.
    """

    state_dir: str
    conf_path: str
    admin_keyring: str
    fsid: str
    client_user: str
    client_keyring: str
    mon_host: str
    pools: tuple = POOLS
    objectstore: str = "memstore"
    pids: dict = dataclasses.field(default_factory=dict)
    _procs: dict = dataclasses.field(default_factory=dict, repr=False)

    def to_dict(self):
        """JSON-serialisable; enough for another process to use or stop it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if not f.name.startswith("_")}
        d["pools"] = list(self.pools)
        d["pids"] = dict(self.pids)
        return d

    @classmethod
    def from_dict(cls, d):
        """Re-attach to a cluster another process started (no Popen)."""
        d = dict(d)
        d["pools"] = tuple(d.get("pools", POOLS))
        return cls(**d)

    def glance_rbd(self, pool="images"):
        """The ``rbd`` dict that tests/services/glance.py ``start()`` takes."""
        return {"ceph_conf": self.conf_path, "user": self.client_user,
                "pool": pool, "keyring": self.client_keyring}

    def connect(self, admin=False):
        """A connected ``rados.Rados``; the caller shuts it down.

        ``client_mount_timeout`` bounds the mon handshake (the ``timeout``
        argument of ``connect()`` does not): a stopped cluster fails in
        10 s instead of hanging for the default 300 s.
        """
        user = "admin" if admin else self.client_user
        conn = rados.Rados(conffile=self.conf_path, rados_id=user,
                           conf={"client_mount_timeout": "10"})
        conn.connect()
        return conn

    def stop(self):
        """Stop OSD, then mgr, then mon (an OSD waits 5 s for a missing mon).

        Leaves no ceph process behind: SIGTERM, then SIGKILL after a grace.
        The state dir (logs) is kept for the caller to inspect or delete,
        except BlueStore's block file, removed once the OSD is gone: it can
        hold many GiB of real disk space and nothing can use it any more.
        The OSD shuts down fast without saving memstore, so the data is
        gone: a stopped cluster cannot be started again.
        """
        for name in _stop_order(self.pids):
            _stop_one(name, self.pids[name], self._procs.get(name),
                      self.conf_path)
        self.pids.clear()
        self._procs.clear()
        _remove_block_file(self.state_dir)


def stop_from_dict(d):
    """Stop a cluster described by :meth:`CephCluster.to_dict`."""
    CephCluster.from_dict(d).stop()


def start(state_dir, timeout=START_TIMEOUT, objectstore="memstore",
          store_bytes=None):
    """Create a cluster in ``state_dir``, start it, wait until it is healthy.

    ``state_dir`` is created if missing and must not hold a previous cluster;
    keep its path short (admin socket paths are limited to 107 characters).
    ``objectstore`` is ``"memstore"`` (data in OSD RAM) or ``"bluestore"``
    (a sparse file in ``state_dir``, for more data than RAM allows);
    ``store_bytes`` caps either (default ``MEMSTORE_BYTES`` or
    ``BLUESTORE_BYTES``).
    Raises :class:`CephError` (with log tails) if it is not HEALTH_OK with
    the pools active+clean within ``timeout`` seconds; nothing is left
    running then, and no block file either.
    """
    if objectstore not in OBJECTSTORES:
        raise ValueError(f"objectstore must be one of {OBJECTSTORES}, "
                         f"not {objectstore!r}")
    if store_bytes is None:
        store_bytes = (MEMSTORE_BYTES if objectstore == "memstore"
                       else BLUESTORE_BYTES)
    state_dir = os.path.abspath(state_dir)
    try:
        cluster = _prepare(state_dir, objectstore, store_bytes)
    except BaseException:
        _remove_block_file(state_dir)
        raise
    try:
        _boot(cluster, time.monotonic() + timeout)
        _write_state(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


# --- preparation: files only, no daemons ---------------------------------

def _prepare(state_dir, objectstore, store_bytes):
    """Write ceph.conf, keyrings, the slim mgr module dir; mkfs mon and OSD.

    With BlueStore, the OSD's mkfs creates the sparse block file itself
    (``bluestore block create``).
    """
    for sub in ("log", "run", "crash", "keys", f"mon-{MON_ID}",
                f"mgr-{MGR_ID}", f"osd-{OSD_ID}"):
        os.makedirs(os.path.join(state_dir, sub), exist_ok=True)
    fsid = str(uuid.uuid4())
    base = _free_port_block(PORT_SPAN)
    mon_host = f"[v2:127.0.0.1:{base},v1:127.0.0.1:{base + 1}]"
    conf_path = os.path.join(state_dir, "ceph.conf")
    _write_file(conf_path, _conf_text(
        state_dir, fsid, mon_host, base + 2, base + PORT_SPAN - 1,
        _osd_store_text(objectstore, store_bytes)))
    _make_keyrings(state_dir)
    _link_mgr_modules(os.path.join(state_dir, "mgr-modules"))
    # An explicit monmap: built from "mon host" alone, mkfs names the mon
    # "noname-a" and mon.a then binds the default ports 3300/6789.
    monmap = os.path.join(state_dir, "keys", "monmap")
    _run(["monmaptool", "--create", "--clobber", "--fsid", fsid,
          "--addv", MON_ID, mon_host, monmap])
    _run(["ceph-mon", "--conf", conf_path, "--mkfs", "-i", MON_ID,
          "--monmap", monmap, "--keyring", _keyring(state_dir, "mon.")])
    _run(["ceph-osd", "--conf", conf_path, "--mkfs", "--no-mon-config",
          "-i", str(OSD_ID), "--osd-uuid", _osd_uuid(state_dir)])
    return CephCluster(
        state_dir=state_dir, conf_path=conf_path,
        admin_keyring=_keyring(state_dir, "client.admin"), fsid=fsid,
        client_user=CLIENT_ID,
        client_keyring=_keyring(state_dir, f"client.{CLIENT_ID}"),
        mon_host=mon_host, objectstore=objectstore)


def _conf_text(state_dir, fsid, mon_host, port_min, port_max, osd_store):
    """ceph.conf: loopback, tiny, fast, one replica; keyrings per section.

    Keyrings are named per section (not via CEPH_ARGS, which leaks into the
    daemons and breaks OSD auth).
    """
    s = state_dir
    keyrings = "\n".join(
        f"[{name}]\nkeyring = {_keyring(s, name)}\n" for name in CAPS)
    return f"""\
[global]
fsid = {fsid}
mon host = {mon_host}
mon initial members = {MON_ID}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind ipv6 = false
ms bind port min = {port_min}
ms bind port max = {port_max}
auth allow insecure global id reclaim = false
run dir = {s}/run
crash dir = {s}/crash
log file = {s}/log/$name.log
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = {PG_NUM}
osd pool default pgp num = {PG_NUM}
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
mon osd initial require min compat client = mimic
rbd default clone format = 2
rbd default features = {RBD_FEATURES}
paxos propose interval = 0.1
mgr stats period = 1
mgr tick period = 1
mon mgr digest period = 1
osd mon report interval = 1

[mon]
mon data = {s}/mon-$id
keyring = {s}/mon-$id/keyring

[mgr]
mgr data = {s}/mgr-$id
mgr module path = {s}/mgr-modules

[osd]
osd data = {s}/osd-$id
{osd_store}

{keyrings}"""


def _osd_store_text(objectstore, store_bytes):
    """The ``[osd]`` lines that pick and size the object store.

    BlueStore gets one file for data, DB and WAL alike (no separate
    devices: one disk here anyway) and skips the fsck after mkfs, which
    only checks the empty store it just made and slows every start. The
    file is BlueStore's default, ``<osd data>/block`` (:func:`_block_path`);
    naming it as ``bluestore block path`` makes mkfs symlink it to itself.
    """
    if objectstore == "memstore":
        return ("osd objectstore = memstore\n"
                f"memstore device bytes = {int(store_bytes)}")
    return ("osd objectstore = bluestore\n"
            "bluestore block create = true\n"
            f"bluestore block size = {int(store_bytes)}\n"
            "bluestore fsck on mkfs = false")


def _block_path(state_dir):
    return os.path.join(state_dir, f"osd-{OSD_ID}", BLOCK_FILE)


def _remove_block_file(state_dir):
    """Free BlueStore's disk space; only called once no OSD uses it."""
    try:
        os.unlink(_block_path(state_dir))
    except FileNotFoundError:
        pass


def _make_keyrings(state_dir):
    """One keyring per entity plus the mon keyring that holds them all.

    The mon keyring is the concatenation of the per-entity keyrings (the format
    allows it); importing it at mkfs registers every key with its caps.
    """
    texts = []
    for name, caps in CAPS.items():
        path = _keyring(state_dir, name)
        cmd = ["ceph-authtool", "--create-keyring", path, "--gen-key",
               "-n", name]
        for kind, cap in caps.items():
            cmd += ["--cap", kind, cap]
        _run(cmd)
        with open(path) as f:
            texts.append(f.read())
    mon = _keyring(state_dir, "mon.")
    _run(["ceph-authtool", "--create-keyring", mon, "--gen-key", "-n", "mon.",
          "--cap", "mon", "allow *"])
    with open(mon, "a") as f:
        f.write("".join(texts))


def _link_mgr_modules(path):
    """A folder of symlinks to the always-on mgr modules only (fast start)."""
    os.makedirs(path, exist_ok=True)
    for name in MGR_MODULES:
        link = os.path.join(path, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(MGR_MODULE_SOURCE, name), link)


def _osd_uuid(state_dir):
    """A stable OSD uuid per state dir: mkfs and ``osd new`` must agree."""
    path = os.path.join(state_dir, "keys", "osd-uuid")
    if not os.path.exists(path):
        _write_file(path, str(uuid.uuid4()))
    with open(path) as f:
        return f.read().strip()


def _free_port_block(span):
    """A random block of ``span`` consecutive loopback TCP ports, all free now.

    Random so that parallel test workers rarely collide; ceph daemons then pick
    their own ports inside the block, only the two mon ports are fixed.
    """
    for _ in range(200):
        base = random.randrange(20000, 60000 - span)
        if all(_port_free(p) for p in range(base, base + span)):
            return base
    raise CephError(f"no block of {span} free ports on 127.0.0.1")


def _port_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- boot: daemons and mon commands --------------------------------------

def _boot(cluster, deadline):
    """Start mon, configure through librados, start mgr and OSD, make pools."""
    _spawn(cluster, f"mon.{MON_ID}", ["ceph-mon", "-i", MON_ID])
    conn = _connect_admin(cluster, deadline)
    try:
        # Before the mgr starts, or devicehealth creates a third pool.
        _mon(conn, {"prefix": "config set", "who": "mgr",
                    "name": "mgr/devicehealth/enable_monitoring",
                    "value": "false", "force": True})
        _spawn(cluster, f"mgr.{MGR_ID}", ["ceph-mgr", "-i", MGR_ID])
        _mon(conn, {"prefix": "osd new", "uuid": _osd_uuid(cluster.state_dir),
                    "id": OSD_ID})
        _spawn(cluster, f"osd.{OSD_ID}", ["ceph-osd", "-i", str(OSD_ID)])
        for pool in cluster.pools:
            _create_pool(conn, pool)
        _wait_healthy(cluster, conn, deadline)
    finally:
        conn.shutdown()


def _spawn(cluster, name, argv):
    """Start a daemon in the foreground as our child, in its own session.

    Its own session: a Ctrl-C in the test runner's terminal does not hit
    it, and it survives this process for :func:`stop_from_dict`.
    """
    out = open(os.path.join(cluster.state_dir, "log", f"{name}.out"), "ab")
    with out:
        proc = subprocess.Popen(
            argv + ["-f", "--conf", cluster.conf_path],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=_daemon_env())
    cluster._procs[name] = proc
    cluster.pids[name] = proc.pid


def _daemon_env():
    """The environment minus CEPH_* (an exported CEPH_ARGS breaks OSD auth)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}


def _connect_admin(cluster, deadline):
    """One librados connection as client.admin, retried until mon answers."""
    while True:
        _check_alive(cluster)
        # connect(timeout=) does not bound the mon handshake; this option does.
        conn = rados.Rados(conffile=cluster.conf_path, rados_id="admin",
                           conf={"client_mount_timeout": "3"})
        try:
            conn.connect()
            return conn
        except rados.Error as exc:
            conn.shutdown()
            if time.monotonic() > deadline:
                raise CephError(_report(
                    cluster, f"mon unreachable: {exc}")) from exc


def _mon(conn, cmd):
    """Run one mon command; return its decoded JSON output (or None)."""
    ret, out, err = conn.mon_command(json.dumps(cmd), b"", timeout=30)
    if ret != 0:
        raise CephError(f"mon command {cmd['prefix']!r} failed ({ret}): {err}")
    return json.loads(out) if out.strip() else None


def _create_pool(conn, pool):
    """A replicated pool with the rbd application enabled."""
    _mon(conn, {"prefix": "osd pool create", "pool": pool, "pg_num": PG_NUM,
                "pgp_num": PG_NUM, "pool_type": "replicated"})
    _mon(conn, {"prefix": "osd pool application enable", "pool": pool,
                "app": "rbd"})


def _wait_healthy(cluster, conn, deadline):
    """Poll ``status`` until HEALTH_OK, OSD up+in and every PG active+clean."""
    status = None
    while time.monotonic() < deadline:
        _check_alive(cluster)
        status = _mon(conn, {"prefix": "status", "format": "json"})
        if _healthy(status, len(cluster.pools) * PG_NUM):
            return
        time.sleep(0.2)
    summary = json.dumps(status and {k: status.get(k) for k in
                                     ("health", "osdmap", "pgmap")}, indent=1)
    raise CephError(_report(cluster, f"not healthy in time:\n{summary}"))


def _healthy(status, pgs):
    osdmap = status.get("osdmap", {})
    osdmap = osdmap.get("osdmap", osdmap)  # nested in older releases
    clean = sum(s["count"] for s in status.get("pgmap", {}).get(
        "pgs_by_state", []) if s["state_name"] == "active+clean")
    return (status.get("health", {}).get("status") == "HEALTH_OK"
            and osdmap.get("num_up_osds") == 1
            and osdmap.get("num_in_osds") == 1 and clean == pgs)


def _check_alive(cluster):
    """Fail fast (with its log) when a daemon we started has died."""
    for name, proc in cluster._procs.items():
        if proc.poll() is not None:
            raise CephError(_report(
                cluster, f"{name} exited with {proc.returncode}"))


def _report(cluster, headline, lines=25):
    """The headline plus the tail of every daemon log, for a useful failure."""
    parts = [headline]
    log_dir = os.path.join(cluster.state_dir, "log")
    for fname in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, fname), errors="replace") as f:
            tail = f.readlines()[-lines:]
        if tail:
            parts.append(f"--- {fname} (last {len(tail)} lines) ---")
            parts.append("".join(tail).rstrip())
    return "\n".join(parts)


# --- stop ----------------------------------------------------------------

def _stop_order(pids):
    """OSD first, then mgr, then mon."""
    rank = {"osd": 0, "mgr": 1, "mon": 2}
    return sorted(pids, key=lambda n: rank.get(n.split(".")[0], -1))


def _stop_one(name, pid, proc, conf_path):
    """SIGTERM, wait, SIGKILL: the process is gone (or a zombie) on return."""
    if proc is None and not _is_our_daemon(pid, conf_path):
        return  # already gone, or the PID was reused by something else
    _signal(pid, signal.SIGTERM)
    if _wait_gone(pid, proc, STOP_TIMEOUT):
        return
    _signal(pid, signal.SIGKILL)
    if not _wait_gone(pid, proc, 5):
        raise CephError(f"{name} (pid {pid}) survived SIGKILL")


def _is_our_daemon(pid, conf_path):
    """Guard against PID reuse: the process must run with our ceph.conf."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return conf_path.encode() in argv


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid, proc, timeout):
    """Wait for exit; a zombie counts as gone (PID 1 here does not reap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif not _running(pid):
            return True
        time.sleep(0.05)
    return False


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# --- small helpers -------------------------------------------------------

def _keyring(state_dir, name):
    if name == "mon.":
        return os.path.join(state_dir, "keys", "mon.keyring")
    return os.path.join(state_dir, "keys", f"{name}.keyring")


def _write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def _write_state(cluster):
    """Leave cluster.json in the state dir for ``stop DIR`` from a shell."""
    _write_file(os.path.join(cluster.state_dir, STATE_FILE),
                json.dumps(cluster.to_dict(), indent=1))


def _run(argv):
    """Run a short setup command; raise with its output if it fails."""
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                         env=_daemon_env(), stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise CephError(f"{argv[0]} failed ({res.returncode}): "
                        f"{res.stdout}{res.stderr}")


def main(argv=None):
    """``start DIR`` prints the cluster JSON; ``stop DIR`` stops it."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        sys.exit("usage: python -m tests.services.ceph start|stop STATE_DIR")
    action, state_dir = argv
    if action == "start":
        print(json.dumps(start(state_dir).to_dict(), indent=1))
        return
    with open(os.path.join(state_dir, STATE_FILE)) as f:
        stop_from_dict(json.load(f))


if __name__ == "__main__":
    main()

