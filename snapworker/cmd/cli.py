"""snapworker: the operator's command line.

    snapworker snapshot --host H INSTANCE_UUID IMAGE_ID [--format raw|qcow2]
        cast a snapshot to host H's worker and follow it to the end
    snapworker watch [--image-id ID]
        print snapworker notifications as they arrive (JSON, one a line)
    snapworker status --host H
        is H's worker alive: its version, how many snapshots it runs and
        queues (one JSON object; exit 3 when no worker answers)
    snapworker jobs --host H
        the running and queued snapshots of H's worker, with progress
        (an admin's context)
    snapworker cancel --host H IMAGE_ID
        stop the queued or running snapshot into IMAGE_ID cleanly (an
        admin's context); exit 1 when nothing was cancelled
    snapworker stream DISK --source-format raw|qcow2 [--format raw|qcow2]
            [-o FILE|-]
        write exactly the bytes the worker would upload for DISK; the plan
        goes to stderr as one JSON object. The disk's format is given, as
        the domain XML gives it to the worker: never guessed

Every command reads the same configuration files as the worker
(``--config-file``), so it finds the same RabbitMQ. Exit status: 0 when the
snapshot ended active, 1 on an error or refused notification, 2 on a
timeout.

``snapshot`` and ``watch`` outlive a broker restart or the failure of one
node of a cluster: the subscription reconnects (a note goes to stderr), but
what was published meanwhile is not seen.
"""

import argparse
import json
import os
import sys

import oslo_messaging as messaging
from oslo_context import context as o_context

from snapworker import events
from snapworker import exception
from snapworker import notifications
from snapworker import rpc
from snapworker import rpcapi
from snapworker.conf import CONF
from snapworker.sources import file as file_source
from snapworker.sources import writer


def _print_event(event, out):
    out.write(json.dumps({'event_type': event.event_type,
                          'publisher_id': event.publisher_id,
                          'payload': event.payload}, sort_keys=True) + '\n')
    out.flush()


def _context(args):
    return o_context.RequestContext(
        auth_token=os.environ.get('OS_AUTH_TOKEN'),
        user_id=args.user_id, project_id=args.project_id,
        roles=args.roles.split(',') if args.roles else [])


def _api():
    return rpcapi.SnapworkerAPI(
        rpc.get_transport(CONF), topic=CONF.worker.topic,
        version_cap=CONF.upgrade_levels.snapworker)


class _GapNotes:
    """Tells stderr once per gap that the broker connection was lost."""

    def __init__(self, sub):
        self._sub = sub
        self._seen = sub.disconnections

    def __call__(self):
        if self._sub.disconnections != self._seen:
            self._seen = self._sub.disconnections
            where = self._sub.address or 'no broker yet'
            sys.stderr.write(f'Lost the notification connection; now on '
                             f'{where}; events published meanwhile are '
                             f'missed\n')
            sys.stderr.flush()


def cmd_snapshot(args, out):
    with events.Subscription(CONF, image_id=args.image_id) as sub:
        notes = _GapNotes(sub)
        _api().create_snapshot(
            _context(args), args.host, args.instance_uuid, args.image_id,
            target_format=args.format)
        last = None
        for last in sub.until_finished(args.timeout):
            notes()
            _print_event(last, out)
        notes()
        gaps = sub.disconnections
    if last is None or last.event_type not in notifications.FINAL:
        lost = (f' ({gaps} broker connection loss(es): the outcome may '
                f'have been published meanwhile; the image status in '
                f'Glance tells)' if gaps else '')
        sys.stderr.write(f'No outcome for image {args.image_id} within '
                         f'{args.timeout} s{lost}\n')
        return 2
    return 0 if last.event_type == notifications.END else 1


def cmd_watch(args, out):
    with events.Subscription(CONF, image_id=args.image_id) as sub:
        notes = _GapNotes(sub)
        while True:
            event = sub.wait(args.timeout)
            notes()
            if event is None:
                return 0
            _print_event(event, out)


def _ask(args, out, method, **kwargs):
    """One RPC call to a host's worker; its answer as JSON on ``out``."""
    try:
        answer = getattr(_api(), method)(_context(args), args.host,
                                         timeout=args.timeout, **kwargs)
    except messaging.MessagingTimeout:
        sys.stderr.write(f'No snapworker worker answered for host '
                         f'{args.host} within {args.timeout} s\n')
        return None
    except rpcapi.VersionCapError as e:
        sys.stderr.write(f'{e}\n')
        return None
    out.write(json.dumps(answer, sort_keys=True) + '\n')
    out.flush()
    return answer


def cmd_status(args, out):
    return 0 if _ask(args, out, 'get_status') is not None else 3


def cmd_jobs(args, out):
    status = _ask(args, out, 'get_status')
    if status is None:
        return 3
    if 'jobs' not in status:
        sys.stderr.write('The worker lists jobs to admins only\n')
        return 1
    return 0


def cmd_cancel(args, out):
    answer = _ask(args, out, 'cancel_snapshot', image_id=args.image_id)
    if answer is None:
        return 3
    return 0 if answer.get('cancelled') else 1


def cmd_stream(args, out):
    disk = os.path.abspath(args.disk)
    source = file_source.FileSource(disk, args.source_format, CONF,
                                    allowed_dir=os.path.dirname(disk))
    try:
        facts = source.inspect()
        plan = source.plan(args.format or facts.format)
    except exception.SnapshotError as e:
        source.close()
        sys.stderr.write(f'{e}\n')
        return 1
    sink = (out.buffer if args.output == '-'
            else open(args.output, 'xb'))
    job = writer.WriteContext(sink)
    try:
        plan.run(job)
        source.verify_unchanged()
    except BaseException as e:
        if sink is not out.buffer:
            sink.close()
            os.unlink(args.output)
        if not isinstance(e, exception.SnapshotError):
            raise
        sys.stderr.write(f'{e}\n')
        return 1
    finally:
        plan.cleanup()
        source.close()
        if sink is not out.buffer:
            sink.close()
    sys.stderr.write(json.dumps({
        'strategy': plan.strategy, 'reason': plan.reason,
        'source_format': facts.format, 'target_format': plan.target_format,
        'virtual_size': facts.virtual_size, 'bytes_read': job.bytes_read,
        'bytes_out': job.bytes_out, 'scratch_bytes': job.scratch_bytes,
    }, sort_keys=True) + '\n')
    return 0


def _identity_args(parser):
    """Who the request is from (the token comes from OS_AUTH_TOKEN)."""
    parser.add_argument('--user-id', default=os.environ.get('OS_USER_ID'))
    parser.add_argument('--project-id',
                        default=os.environ.get('OS_PROJECT_ID'))
    parser.add_argument('--roles', default=os.environ.get('OS_ROLES',
                                                          'admin,member'))


def _parser():
    parser = argparse.ArgumentParser(prog='snapworker',
                                     description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)

    snap = sub.add_parser('snapshot', help='snapshot an instance now')
    snap.add_argument('instance_uuid')
    snap.add_argument('image_id', help='a queued Glance image to fill')
    snap.add_argument('--host', required=True,
                      help='compute host of the instance')
    snap.add_argument('--format', choices=('raw', 'qcow2'),
                      help='target format (default: as the source)')
    snap.add_argument('--timeout', type=float, default=3600)
    _identity_args(snap)
    snap.set_defaults(func=cmd_snapshot)

    watch = sub.add_parser('watch', help='print snapshot notifications')
    watch.add_argument('--image-id')
    watch.add_argument('--timeout', type=float, default=float('inf'),
                       help='stop after this many seconds of silence')
    watch.set_defaults(func=cmd_watch)

    for name, func, what in (('status', cmd_status, 'is the worker of a '
                              'host alive'),
                             ('jobs', cmd_jobs, 'running and queued '
                              'snapshots of a host'),
                             ('cancel', cmd_cancel, 'stop one snapshot')):
        command = sub.add_parser(name, help=what)
        command.add_argument('--host', required=True)
        if name == 'cancel':
            command.add_argument('image_id')
        command.add_argument('--timeout', type=float, default=10,
                             help='seconds to wait for the worker')
        _identity_args(command)
        command.set_defaults(func=func)

    stream = sub.add_parser(
        'stream', help='write the bytes the worker would upload for a '
                       'disk file (reads it only)')
    stream.add_argument('disk')
    stream.add_argument('--source-format', required=True,
                        choices=('raw', 'qcow2'),
                        help='the disk\'s format (as its domain XML says); '
                             'never guessed from its bytes')
    stream.add_argument('--format', choices=('raw', 'qcow2'),
                        help='target format (default: as the source)')
    stream.add_argument('-o', '--output', default='-',
                        help='new file to write, or - for stdout')
    stream.set_defaults(func=cmd_stream)
    return parser


def main(argv=None, out=sys.stdout):
    argv = sys.argv[1:] if argv is None else argv
    # oslo.config takes --config-file/--config-dir; argparse the rest.
    conf_args, rest = [], []
    it = iter(argv)
    for arg in it:
        if arg in ('--config-file', '--config-dir'):
            conf_args += [arg, next(it)]
        elif arg.startswith(('--config-file=', '--config-dir=')):
            conf_args.append(arg)
        else:
            rest.append(arg)
    CONF(conf_args, project='snapworker')
    args = _parser().parse_args(rest)
    return args.func(args, out)


if __name__ == '__main__':
    sys.exit(main())
