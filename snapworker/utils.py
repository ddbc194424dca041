"""Running the helpers that parse untrusted images (qemu-img, qemu-nbd).

A helper reads a disk the guest wrote, so it runs confined, as Nova runs
``qemu-img info``:

* under resource limits (address space, CPU time): oslo.concurrency's
  ``ProcessLimits``, applied by util-linux ``prlimit(1)`` rather than
  oslo's Python wrapper, whose own start-up reads (~1 MiB) would count as
  the helper's disk reads in ``bytes_read``;
* in a session (process group) of its own, so that a signal sent to the
  worker's process group (how init systems stop a service) does not kill
  it under a running job: the worker stops its helpers itself, and a
  worker that dies abruptly takes them along (``setpriv --pdeathsig``:
  the kernel kills a helper whose parent is gone);
* with a stall timeout: a helper whose I/O counters do not move for
  ``[worker] helper_stall_timeout`` seconds is killed and its job fails,
  freeing its slot.
"""

import os
import signal
import tempfile
import time

from oslo_concurrency import processutils
from oslo_log import log as logging

from snapworker import exception

LOG = logging.getLogger(__name__)

#: How often a running helper's I/O counters are looked at.
_POLL_SECONDS = 0.2


def limits(conf):
    """The ``ProcessLimits`` every image helper runs under."""
    return processutils.ProcessLimits(
        address_space=conf.worker.helper_address_space,
        cpu_time=conf.worker.helper_cpu_time)


def confined(argv, conf, new_session=True):
    """``argv`` wrapped to run under the helper limits.

    :param new_session: prefix ``setsid``, for helpers started by someone
        else (libnbd starts qemu-nbd). ``setsid`` does not fork when its
        caller is not a group leader, and ``setpriv`` and ``prlimit`` only
        exec, so the pid (systemd socket activation's ``LISTEN_PID``)
        stays the same through every exec.
    """
    wrapped = ['setpriv', '--pdeathsig', 'KILL', '--',
               'prlimit', *limits(conf).prlimit_args(), '--', *argv]
    return ['setsid', *wrapped] if new_session else wrapped


def run_counting_reads(argv, conf, what, check=None):
    """Run a confined helper to completion; return the bytes it read.

    The count is the child's ``rchar`` from /proc/<pid>/io, read after it
    exits but before it is reaped (``waitid`` with ``WNOWAIT``), so it
    covers its whole life: this is how the convert plan reports
    ``bytes_read`` honestly. The same counters, with ``wchar``, tell
    whether it still makes progress.

    :param check: called while waiting; what it raises (the job was
        cancelled) kills the helper and propagates.
    :raises HelperTimedOut: no I/O for ``helper_stall_timeout`` seconds.
    :raises CommandFailed: it exited non-zero (or was killed by a limit).
    """
    stall = conf.worker.helper_stall_timeout
    LOG.debug('Running %s', ' '.join(argv))
    with tempfile.TemporaryFile() as err:
        try:
            pid = _spawn(confined(argv, conf, new_session=False), err)
        except OSError as e:
            raise exception.CommandFailed(command=argv[0], code=None,
                                          stderr=str(e)) from e
        try:
            counters = _wait_with_progress(pid, stall, what, check)
            rchar = counters[0]
        finally:
            _, status = _reap(pid)
        err.seek(0)
        stderr = err.read().decode(errors='replace').strip()[-2000:]
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise exception.CommandFailed(command=' '.join(argv[:2]), code=code,
                                      stderr=stderr)
    return rchar


def _spawn(argv, err):
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        return os.posix_spawnp(
            argv[0], argv, os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0),
                          (os.POSIX_SPAWN_DUP2, devnull, 1),
                          (os.POSIX_SPAWN_DUP2, err.fileno(), 2)],
            setsid=True)
    finally:
        os.close(devnull)


def _wait_with_progress(pid, stall, what, check=None):
    """Wait for ``pid`` to exit (unreaped); kill it if its I/O stalls."""
    last, moved_at = None, time.monotonic()
    while True:
        if check is not None:
            try:
                check()
            except BaseException:
                kill_group(pid)
                raise
        if os.waitid(os.P_PID, pid,
                     os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return _io_counters(pid)
        counters = _io_counters(pid)
        now = time.monotonic()
        if counters != last:
            last, moved_at = counters, now
        elif now - moved_at > stall:
            LOG.warning('%s (pid %d) made no progress for %d s: killing it',
                        what, pid, stall)
            kill_group(pid)
            raise exception.HelperTimedOut(helper=what, seconds=stall)
        time.sleep(_POLL_SECONDS)


def _reap(pid):
    while True:
        try:
            return os.waitpid(pid, 0)
        except InterruptedError:
            continue


def kill_group(pgid):
    """SIGKILL a helper's whole session; gone already is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _io_counters(pid):
    """(rchar, wchar) of a process, (0, 0) without I/O accounting."""
    found = {}
    try:
        with open(f'/proc/{pid}/io') as f:
            for line in f:
                key, _, value = line.partition(':')
                found[key] = int(value)
    except OSError:
        LOG.warning('No I/O accounting for pid %d', pid)
    return found.get('rchar', 0), found.get('wchar', 0)
