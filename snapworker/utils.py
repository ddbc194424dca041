"""Running the external tools a snapshot needs (qemu-img)."""

import os
import subprocess

from oslo_log import log as logging

from snapworker import exception

LOG = logging.getLogger(__name__)


def execute(*cmd, timeout=None):
    """Run a command, return its stdout; raise CommandFailed otherwise."""
    LOG.debug('Running %s', ' '.join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise exception.CommandFailed(command=cmd[0], code=None,
                                      stderr=str(e)) from e
    if proc.returncode != 0:
        raise exception.CommandFailed(command=' '.join(cmd[:2]),
                                      code=proc.returncode,
                                      stderr=proc.stderr.strip()[-2000:])
    return proc.stdout


def execute_counting_reads(*cmd):
    """Run a command and return how many bytes it read (its ``rchar``).

    The child's /proc/<pid>/io is read after it exits but before it is
    reaped (waitid with WNOWAIT), so the count covers its whole life: this
    is how the convert plan reports ``bytes_read`` honestly rather than
    estimating it.
    """
    LOG.debug('Running %s', ' '.join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        stderr = proc.stderr.read()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        rchar = _read_rchar(proc.pid)
    finally:
        returncode = proc.wait()
        proc.stderr.close()
    if returncode != 0:
        raise exception.CommandFailed(command=' '.join(cmd[:2]),
                                      code=returncode,
                                      stderr=stderr.strip()[-2000:])
    return rchar


def _read_rchar(pid):
    try:
        with open(f'/proc/{pid}/io') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key == 'rchar':
                    return int(value)
    except OSError:
        LOG.warning('No I/O accounting for pid %d', pid)
    return 0
