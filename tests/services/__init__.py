"""Real services (Glance, libvirtd, RabbitMQ, Ceph) for tests and the demo.

Each service module offers ``start(...)`` returning a handle with ``stop()``
and ``to_dict()``, and a module-level ``stop_from_dict(d)``: the functional
test runner and ``python -m tests.services`` start services in one process
and stop them from another, so a handle must survive as plain JSON.

The helpers below are the process plumbing the modules share: every service
runs in its own session (process group) so that stopping it also stops its
workers, and logs to a file whose tail explains a failed start.
"""

import os
import signal
import socket
import subprocess
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


class ServiceError(RuntimeError):
    """A service failed to start or to stop; the message carries its log."""


def free_port():
    """Return a TCP port on 127.0.0.1 that nothing listens on right now.

    Binding port 0 lets the kernel pick; the small window before the service
    binds it is acceptable for tests and avoids fixed, colliding ports.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host, port, timeout=0.5):
    """Tell whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path, lines=40):
    """Return the last lines of a log file, for error messages."""
    try:
        with open(path, errors="replace") as log:
            return "".join(log.readlines()[-lines:])
    except OSError as exc:
        return "(no log: %s)" % exc


def spawn(argv, log_path, env=None, cwd=None, **popen_kwargs):
    """Start argv in a new session with stdout and stderr going to log_path.

    A new session makes the child the leader of its own process group (its
    pgid is its pid), so stop_group() can reach every process it forks, and
    keeps it alive when the starting process exits (``tests.services up``).
    stdin is /dev/null so a daemon never holds the caller's terminal.
    """
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, env=env, cwd=cwd,
            start_new_session=True, **popen_kwargs)


def wait_until(predicate, timeout, what, log_path, proc=None, interval=0.05):
    """Poll predicate() until it is true; raise ServiceError on timeout.

    If proc is given and exits first, fail at once instead of waiting out
    the timeout: a crashed service will never become ready.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise ServiceError("%s: process exited with %s; log %s:\n%s" % (
                what, proc.returncode, log_path, log_tail(log_path)))
        if time.monotonic() > deadline:
            raise ServiceError("%s: not ready after %.0f s; log %s:\n%s" % (
                what, timeout, log_path, log_tail(log_path)))
        time.sleep(interval)


def _group_members(pgid):
    """Return the pids of live (non-zombie) processes in process group pgid.

    Read from /proc because a process started by another process cannot be
    waited for here, and a zombie still "exists" for kill(pid, 0).
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _reap(pid):
    """Collect the exit status of pid if it is our child, else do nothing."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_group(pgid, timeout=15, sig=signal.SIGTERM):
    """Stop every process in group pgid: sig, then SIGKILL after timeout.

    Returns once no live process is left in the group, so a caller may
    reuse the service's ports and files at once.
    """
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while True:
        _reap(pgid)
        if not _group_members(pgid):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while _group_members(pgid):
        _reap(pgid)
        if time.monotonic() > deadline:
            raise ServiceError("process group %d survived SIGKILL: %s" % (
                pgid, _group_members(pgid)))
        time.sleep(0.05)
