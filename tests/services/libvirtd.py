"""An unprivileged libvirtd serving libvirt's built-in test driver.

``test:///default`` keeps its domains inside one process; the worker under
test runs in another process than the test that defines the domains, so
both must reach the same test driver through a daemon. A root libvirtd or
``qemu:///...`` does not work here (no qemu-system, no libvirt-qemu user),
but libvirtd run as ``nobody`` with its own config and socket directory
serves ``test+unix:///default?socket=...`` fine.

libvirtd logs errors for drivers it cannot load here (qemu, network, dbus)
and may even exit 0 when one failed, so readiness is judged by opening the
test URI and listing domains, not by the process or its log.
"""

import dataclasses
import os
import pwd
import stat

import libvirt

from tests import services

USER = "nobody"


@dataclasses.dataclass
class LibvirtdService:
    """A running libvirtd; ``uri`` reaches its test driver."""

    uri: str
    state_dir: str
    log_path: str
    pid: int

    def to_dict(self):
        """Return a JSON-serialisable description, for stop_from_dict()."""
        return dataclasses.asdict(self)

    def stop(self, timeout=10):
        """Stop libvirtd; return when it is gone."""
        services.stop_group(self.pid, timeout)


def stop_from_dict(d, timeout=10):
    """Stop a libvirtd started by another process, from its to_dict()."""
    services.stop_group(d["pid"], timeout)


def start(state_dir, timeout=20):
    """Start libvirtd as nobody with everything under state_dir/libvirtd.

    state_dir is made traversable by others (o+x) because nobody must reach
    its own folder inside it; every folder above must already be.
    Returns a LibvirtdService once a client can list domains.
    """
    state_dir = os.path.abspath(state_dir)
    os.makedirs(state_dir, exist_ok=True)
    _make_traversable(state_dir)
    home = os.path.join(state_dir, "libvirtd")
    user = pwd.getpwnam(USER)
    dirs = _make_dirs(home, user)
    sock_path = os.path.join(dirs["run"], "libvirt-sock")
    conf_path = _write_config(home, dirs["run"], user)
    log_path = os.path.join(home, "libvirtd.log")
    uri = "test+unix:///default?socket=%s" % sock_path
    if os.path.exists(sock_path):  # left by a daemon that was killed
        os.unlink(sock_path)
    proc = services.spawn(
        ["libvirtd", "--config", conf_path], log_path,
        env=_environ(home, dirs), cwd=home,
        user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    svc = LibvirtdService(uri, state_dir, log_path, proc.pid)
    try:
        services.wait_until(
            lambda: os.path.exists(sock_path) and _connects(uri), timeout,
            "libvirtd test driver at %s" % sock_path, log_path, proc)
    except BaseException:
        svc.stop()
        raise
    return svc


def _make_traversable(path):
    """Let other users pass through path; refuse if an ancestor blocks."""
    mode = os.stat(path).st_mode
    if not mode & stat.S_IXOTH:
        os.chmod(path, stat.S_IMODE(mode) | stat.S_IXOTH)
    parent = os.path.dirname(path)
    while parent != os.path.dirname(parent):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            raise services.ServiceError(
                "%s is not traversable by %s; use a state dir whose parents "
                "are (e.g. under /tmp)" % (parent, USER))
        parent = os.path.dirname(parent)


def _make_dirs(home, user):
    """Create libvirtd's home, config, runtime and cache folders for user."""
    dirs = {name: os.path.join(home, name)
            for name in ("config", "run", "cache", "data")}
    for path in (home, *dirs.values()):
        os.makedirs(path, exist_ok=True)
        os.chown(path, user.pw_uid, user.pw_gid)
    return dirs


def _write_config(home, run_dir, user):
    """Write libvirtd.conf: a private socket any local client may use.

    The socket is world read-write because the tests and the worker run as
    root while the daemon runs as nobody; it only serves the test driver.
    """
    conf_path = os.path.join(home, "config", "libvirtd.conf")
    with open(conf_path, "w") as f:
        f.write('unix_sock_dir = "%s"\n'
                'unix_sock_rw_perms = "0777"\n'
                'auth_unix_rw = "none"\n'
                'log_outputs = "3:stderr"\n' % run_dir)
    os.chown(conf_path, user.pw_uid, user.pw_gid)
    return conf_path


def _environ(home, dirs):
    """Return the environment that keeps libvirtd's files under home."""
    return {
        "HOME": home,
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "XDG_CONFIG_HOME": dirs["config"],
        "XDG_RUNTIME_DIR": dirs["run"],
        "XDG_CACHE_HOME": dirs["cache"],
        "XDG_DATA_HOME": dirs["data"],
    }


def _connects(uri):
    """Tell whether uri opens and lists domains (the test driver is up)."""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        conn.listAllDomains()
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()
