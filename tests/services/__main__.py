"""Start or stop every service the functional tests and the demo need.

    python -m tests.services up --state-dir DIR [--with-ceph] [--with-cloud]
    python -m tests.services down --state-dir DIR

``up`` leaves the services running after it exits and writes
DIR/services.json: the URLs a client needs and, per service, the handle
dict its module's ``stop_from_dict()`` takes. ``down`` stops them from that
file, so starting and stopping can happen in different processes (a test
runner, a demo script, a developer's shell).

RabbitMQ is only ensured, never stopped: it is a shared machine service.
A private three-node RabbitMQ cluster (``rabbitmq_cluster``), for the tests
that stop a broker node, starts beside all the others. With
``--with-ceph`` a single-node Ceph cluster starts first and both Glances
also get a ``ceph`` rbd store on its ``images`` pool.
With ``--with-cloud`` a one-machine OpenStack with snapworker inside starts
beside them (tests/services/openstack.py; services.json key ``cloud``).
"""

import argparse
import concurrent.futures
import functools
import importlib
import json
import os
import sys
import time
import uuid

from tests import services
from tests.services import glance
from tests.services import libvirtd
from tests.services import rabbitmq
from tests.services import rabbitmq_cluster

STATE_FILE = "services.json"

# Stop order: the services that use Ceph go before Ceph.
_MODULES = {
    # The cloud first: it runs on the shared broker, nothing depends on it.
    "cloud": "tests.services.openstack",
    "glance": "tests.services.glance",
    "glance_noauth": "tests.services.glance",
    "libvirtd": "tests.services.libvirtd",
    "rabbit_cluster": "tests.services.rabbitmq_cluster",
    "ceph": "tests.services.ceph",
}


def up(state_dir, with_ceph, with_cloud=False, rbd_thin=False,
       rbd_default=False, ceph_objectstore="memstore", ceph_store_bytes=None):
    """Start everything, write services.json and return its content.

    :param rbd_thin: Glance's rbd stores skip zero chunks
        (``rbd_thin_provisioning``), for benchmarks of sparse disks.
    :param rbd_default: Glance's default store is ``ceph``, where Nova's
        own snapshots (which name no store) then go.
    :param ceph_objectstore: ``memstore`` (the tests: small data, in RAM)
        or ``bluestore`` (benchmarks of images larger than RAM allows).
    :param ceph_store_bytes: the OSD store's size (None: Ceph's module
        default for that store).
    """
    state_path = os.path.join(state_dir, STATE_FILE)
    if os.path.exists(state_path):
        raise services.ServiceError(
            "%s exists: services may be running; run 'down' first"
            % state_path)
    os.makedirs(state_dir, exist_ok=True)
    started = {}
    transport_url = _timed("rabbitmq", rabbitmq.ensure_running)
    # The slowest to start and needing nothing but the shared broker: from
    # the outset, beside Ceph and then the Glances and libvirtd. The
    # private RabbitMQ cluster takes ~30 s, the cloud ~1-2 min.
    early_jobs = {"rabbit_cluster": (
        rabbitmq_cluster.start, os.path.join(state_dir, "rabbit-cluster"))}
    if with_cloud:
        cloud = importlib.import_module(_MODULES["cloud"])
        early_jobs["cloud"] = (cloud.start, os.path.join(state_dir, "cloud"),
                               transport_url)
    early = concurrent.futures.ThreadPoolExecutor(len(early_jobs))
    futures = {name: early.submit(_timed, name, *job)
               for name, job in early_jobs.items()}
    try:
        rbd = None
        if with_ceph:
            # Imported only when asked for: it needs Debian's rados binding.
            ceph = importlib.import_module(_MODULES["ceph"])
            started["ceph"] = _timed(
                "ceph", functools.partial(ceph.start,
                                          objectstore=ceph_objectstore,
                                          store_bytes=ceph_store_bytes),
                os.path.join(state_dir, "ceph"))
            rbd = dict(started["ceph"].glance_rbd(), thin=rbd_thin,
                       default=rbd_default)
        _start_in_parallel(state_dir, rbd, started)
        concurrent.futures.wait(futures.values())
        _collect(futures, started)
    except BaseException:
        concurrent.futures.wait(futures.values())
        _collect(futures, started, raise_first=False)
        _stop_all({name: h.to_dict() for name, h in started.items()})
        raise
    finally:
        early.shutdown()
    state = {
        "transport_url": transport_url,
        "glance_url": started["glance"].url,
        "glance_noauth_url": started["glance_noauth"].url,
        "libvirt_uri": started["libvirtd"].uri,
    }
    state.update((name, started[name].to_dict()) for name in _MODULES
                 if name in started)
    with open(state_path, "w") as f:
        json.dump(state, f, indent=2)
    return state


def _start_in_parallel(state_dir, rbd, started):
    """Start both Glances and libvirtd at once, adding each to started.

    Every handle that did start is recorded before the first failure is
    re-raised, so the caller can stop it.
    """
    # Both Glances are shared by every test: their data goes to MariaDB.
    run = uuid.uuid4().hex[:8]
    jobs = {
        "glance": (functools.partial(glance.start,
                                     database="snapworker_glance_" + run),
                   os.path.join(state_dir, "glance"), rbd),
        "glance_noauth": (functools.partial(
                              glance.start,
                              database="snapworker_glance_noauth_" + run),
                          os.path.join(state_dir, "glance-noauth"), rbd,
                          "unauthenticated"),
        "libvirtd": (libvirtd.start, state_dir),
    }
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(_timed, name, *job)
                   for name, job in jobs.items()}
    _collect(futures, started)


def _collect(futures, started, raise_first=True):
    """Add the handle of each finished start to started, then re-raise the
    first failure (unless raise_first is false). Starts still running are
    left out: a failure path waits for them first."""
    errors = []
    for name, future in futures.items():
        if not future.done():
            continue
        if future.exception() is None:
            started[name] = future.result()
        else:
            errors.append(future.exception())
    if errors and raise_first:
        raise errors[0]


def _timed(name, func, *args):
    """Run a start function and report how long it took."""
    t0 = time.monotonic()
    result = func(*args)
    print("%-14s up in %.1f s" % (name, time.monotonic() - t0), flush=True)
    return result


def down(state_dir):
    """Stop every service recorded in services.json, then remove it.

    Nothing recorded is not an error, so a teardown may always call it.
    """
    state_path = os.path.join(state_dir, STATE_FILE)
    if not os.path.exists(state_path):
        print("%s not found: nothing to stop" % state_path)
        return
    with open(state_path) as f:
        state = json.load(f)
    failures = _stop_all(state)
    os.unlink(state_path)
    if failures:
        raise services.ServiceError("some services did not stop: %s"
                                    % failures)
    print("services down")


def _stop_all(handles):
    """Stop each handle dict in order; return {name: error} of failures.

    Keep going after a failure: one stuck service must not leave the rest
    running.
    """
    failures = {}
    for name, module_name in _MODULES.items():
        if name not in handles:
            continue
        try:
            module = importlib.import_module(module_name)
            module.stop_from_dict(handles[name])
        except Exception as exc:
            failures[name] = str(exc)
    return failures


def main(argv=None):
    """Parse the command line and run up or down."""
    parser = argparse.ArgumentParser(prog="python -m tests.services",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--with-ceph", action="store_true",
                        help="also start a single-node Ceph (up only)")
    parser.add_argument("--with-cloud", action="store_true",
                        help="also start a one-machine OpenStack (up only)")
    parser.add_argument("--glance-rbd-thin", action="store_true",
                        help="Glance's rbd stores skip zero chunks "
                             "(rbd_thin_provisioning; up --with-ceph only)")
    parser.add_argument("--glance-rbd-default", action="store_true",
                        help="Glance's default store is the rbd one "
                             "(up --with-ceph only)")
    parser.add_argument("--ceph-objectstore", default="memstore",
                        choices=("memstore", "bluestore"),
                        help="the OSD's store (up --with-ceph only)")
    parser.add_argument("--ceph-store-bytes", type=int,
                        help="the OSD store's size in bytes (up --with-ceph "
                             "only; default: the store's own default)")
    args = parser.parse_args(argv)
    state_dir = os.path.abspath(args.state_dir)
    try:
        if args.command == "up":
            state = up(state_dir, args.with_ceph, args.with_cloud,
                       args.glance_rbd_thin, args.glance_rbd_default,
                       args.ceph_objectstore, args.ceph_store_bytes)
            print("services up; state in %s"
                  % os.path.join(state_dir, STATE_FILE))
            for key in ("transport_url", "glance_url", "glance_noauth_url",
                        "libvirt_uri"):
                print("  %-18s %s" % (key, state[key]))
        else:
            down(state_dir)
    except services.ServiceError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
