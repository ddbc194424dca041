"""snapworker: the operator's command line.

    snapworker [CREDENTIALS] snapshot INSTANCE --host H [--name N]
            [--disk-format raw|qcow2] [--image-id ID]
        create a Glance image with the metadata Nova gives a snapshot
        (unless --image-id names a queued one), have host H's worker fill
        it, and follow it to the end: a live progress bar on a terminal
        (bytes, rate, ETA, phase: start, uploading, released, active),
        then one result line
    snapworker [CREDENTIALS] plan INSTANCE --host H [--disk-format F]
        which plan the worker would use for a snapshot, and why; the same
        checks and refusals as a snapshot, but nothing is read, created
        or sent (RPC 1.2)
    snapworker watch [--host H] [--instance UUID] [--image-id ID]
        follow every snapshot as it happens, rendered as ``snapshot``
        renders one
    snapworker [CREDENTIALS] status --host H
        is H's worker alive: its version, how many snapshots it runs and
        queues
    snapworker [CREDENTIALS] jobs --host H
        the running and queued snapshots of H's worker, with progress
        (admins only)
    snapworker [CREDENTIALS] cancel IMAGE_ID --host H
        stop the queued or running snapshot into IMAGE_ID cleanly: its
        resources released, its image deleted, ``snapshot.create.error``
        ``Cancelled`` (admins only)
    snapworker stream DISK --source-format raw|qcow2 [--format raw|qcow2]
            [-o FILE|-]
        write exactly the bytes the worker would upload for DISK; the plan
        goes to stderr as one JSON object. The disk's format is given, as
        the domain XML gives it to the worker: never guessed

Credentials are taken as every OpenStack CLI takes them: ``--os-cloud``
(clouds.yaml), the ``OS_*`` variables or the ``--os-*`` options, given
before the command. The worker acts with that session's token, user,
project and roles, and finds Glance in its catalog. ``--os-auth-type
none`` with ``--noauth-user-id/--noauth-project-id/--noauth-roles`` is a
demo mode for a Glance without Keystone (``[glance] auth_strategy =
noauth``); see snapworker/cmd/credentials.py.

Every command reads the same configuration files as the worker
(``--config-file``), so it finds the same RabbitMQ.

Output (``-f/--format``): ``human`` (progress bars, tables), ``json`` (one
JSON object a line: each notification for ``snapshot`` and ``watch``, the
answer otherwise), or ``auto`` (default): human on a terminal, JSON when
stdout is not one.

Exit status, stable across releases:
    0  done: the snapshot ended active; the plan, status, jobs or cancel
       request was answered and granted
    1  failed or refused: the snapshot ended with an error or a refusal
       (the error code is in the result line), the plan would be refused,
       nothing was cancelled, jobs are for admins only
    2  timeout: no outcome within --timeout (the snapshot may go on)
    3  no worker answered for the host within --worker-timeout
    4  credentials or Glance: cannot authenticate, or create the image
    5  the RPC version cap ([upgrade_levels] snapworker) forbids the
       request: the workers are too old for it
    64 usage error
    130 interrupted (Ctrl-C); a snapshot already sent goes on

``snapshot`` and ``watch`` outlive a broker restart or the failure of one
node of a cluster: the subscription reconnects (a note goes to stderr), but
what was published meanwhile is not seen.
"""

import argparse
import datetime
import json
import os
import sys
import time

import oslo_messaging as messaging

from snapworker import events
from snapworker import exception
from snapworker import notifications
from snapworker import rpc
from snapworker import rpcapi
from snapworker.cmd import credentials
from snapworker.cmd import progress
from snapworker.conf import CONF
from snapworker.sources import file as file_source
from snapworker.sources import writer

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 2
EXIT_NO_WORKER = 3
EXIT_CREDENTIALS = 4
EXIT_VERSION_CAP = 5
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130

#: Glance's own image fields: what a base image has that is not one of
#: its properties (Nova's snapshots inherit the properties only).
_GLANCE_CORE_FIELDS = frozenset((
    'id', 'name', 'status', 'visibility', 'protected', 'checksum',
    'os_hash_algo', 'os_hash_value', 'owner', 'size', 'virtual_size',
    'created_at', 'updated_at', 'file', 'schema', 'self', 'tags',
    'disk_format', 'container_format', 'direct_url', 'locations',
    'stores', 'os_hidden'))
#: Properties Nova never copies into a snapshot (compute/utils.py
#: NON_INHERITABLE_IMAGE_PROPERTIES, namespaces), nor the ones it sets.
_NOT_INHERITED = frozenset((
    'cinder_encryption_key_id', 'cinder_encryption_key_deletion_policy',
    'img_signature', 'img_signature_hash_method', 'img_signature_key_type',
    'img_signature_certificate_uuid', 'image_type', 'instance_uuid',
    'user_id', 'base_image_ref', 'owner_id', 'instance_owner',
    'image_location', 'image_state'))
_NOT_INHERITED_PREFIXES = ('os_glance', 'img_signature')


class _Failure(Exception):
    """Ends a command with a message on stderr and an exit status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


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


def _identity(args):
    """The ``credentials.Identity`` of the command line.

    :raises _Failure: (exit 4) it cannot be established.
    """
    try:
        return credentials.load(args.cloud_config, args, CONF)
    except credentials.CredentialsError as e:
        raise _Failure(str(e), EXIT_CREDENTIALS) from e


def _call(args, method, *call_args, **kwargs):
    """One RPC call to ``args.host``'s worker.

    :raises _Failure: no worker answered (exit 3), or the version cap
        forbids the call (exit 5).
    """
    try:
        return getattr(_api(), method)(
            args.identity.context, args.host, *call_args,
            timeout=args.worker_timeout, **kwargs)
    except messaging.MessagingTimeout as e:
        raise _Failure(f'No snapworker worker answered for host '
                       f'{args.host} within {args.worker_timeout} s',
                       EXIT_NO_WORKER) from e
    except rpcapi.VersionCapError as e:
        raise _Failure(str(e), EXIT_VERSION_CAP) from e


def _human(args, out):
    return args.format == 'human' or (args.format == 'auto'
                                      and progress._isatty(out))


def _print_json(answer, out):
    out.write(json.dumps(answer, sort_keys=True) + '\n')
    out.flush()


# -- snapshot -----------------------------------------------------------------

def _default_name(instance_uuid):
    now = datetime.datetime.now(datetime.UTC)
    return f'snapshot of {instance_uuid} {now:%Y-%m-%dT%H:%M:%SZ}'


def _inherited_properties(images, base_image_ref):
    """The base image's properties a Nova snapshot would carry on.

    Nova copies them from the instance's system metadata, which the
    worker cannot see; the base image in Glance is where they came from.
    An image no longer visible gives none.
    """
    if not base_image_ref:
        return {}
    try:
        base = images.get(base_image_ref)
    except exception.SnapshotError:
        return {}
    return {key: value for key, value in base.items()
            if key not in _GLANCE_CORE_FIELDS | _NOT_INHERITED
            and not key.startswith(_NOT_INHERITED_PREFIXES)}


def snapshot_image_fields(name, instance_uuid, context, plan, inherited):
    """The new image's fields, as Nova's API creates a snapshot image.

    ``compute.utils.create_image`` and ``initialize_instance_snapshot_
    metadata``, plus what the libvirt driver's
    ``_create_snapshot_metadata`` adds, as far as the worker knows the
    instance: its owner and base image come from the plan (the domain's
    Nova metadata). Formats are left out, as Nova leaves them: the worker
    sets them when it uploads.

    :param plan: the worker's ``plan_snapshot`` answer, or {} when the
        worker is too old to answer one.
    """
    owner = plan.get('instance_owner') or context.project_id
    properties = dict(inherited)
    properties.update({
        'image_type': 'snapshot',
        'instance_uuid': instance_uuid,
        'user_id': str(context.user_id),
        'owner_id': owner,
        'image_location': 'snapshot',
        'image_state': 'available',
    })
    if plan.get('base_image_ref'):
        properties['base_image_ref'] = plan['base_image_ref']
    # An admin's snapshot of another project's instance is shared (with
    # that project: ``instance_member``), as Nova makes it.
    visibility = ('private' if instance_member(context, plan) is None
                  else 'shared')
    return dict(properties, name=name, visibility=visibility)


def instance_member(context, plan):
    """The project to share the new image with, or None.

    Nova's API, for a snapshot of another project's instance (an admin's):
    the instance's project becomes a member of the image (the
    ``instance_owner`` Nova passes to its Glance client, which adds the
    member and does not store the property), so that the instance's owner
    sees the snapshot of their instance.
    """
    owner = plan.get('instance_owner')
    return owner if owner and owner != context.project_id else None


def _plan_first(args):
    """The worker's plan, or {} when its version cannot answer one.

    Asked before the image is created, so that a refused snapshot leaves
    no image behind and says why at once.

    :raises _Failure: refused (exit 1), no worker (exit 3).
    """
    try:
        plan = _call(args, 'plan_snapshot', args.instance_uuid,
                     target_format=args.disk_format)
    except _Failure as e:
        if e.status != EXIT_VERSION_CAP:
            raise
        # An older worker: check it is there at all, then go on blind.
        _call(args, 'get_status')
        return {}
    if plan.get('error_code'):
        raise _Failure(f"Refused: {plan['error_code']}: "
                       f"{plan['error_message']}", EXIT_FAILED)
    return plan


def _create_image(args, plan):
    images = args.identity.images
    fields = snapshot_image_fields(
        args.name or _default_name(args.instance_uuid), args.instance_uuid,
        args.identity.context, plan,
        _inherited_properties(images, plan.get('base_image_ref')))
    try:
        image_id = images.create(**fields)['id']
    except exception.SnapshotError as e:
        raise _Failure(f'Cannot create the image: {e}',
                       EXIT_CREDENTIALS) from e
    member = instance_member(args.identity.context, plan)
    if member is not None:
        try:
            images.add_member(image_id, member)
        except Exception as e:
            # Not the instance owner's to see: it must not stay.
            gone = images.delete(image_id)
            raise _Failure(
                f'Cannot share image {image_id} with the instance\'s '
                f'project {member}: {e}. ' + (
                    'The image is deleted.' if gone else
                    'Glance did not confirm its deletion: delete it.'),
                EXIT_CREDENTIALS) from e
    return image_id


def _follow(sub, render, timeout):
    """Render events until the final one; return it (None: timed out)."""
    notes = _GapNotes(sub)
    last = None
    for last in sub.until_finished(timeout):
        notes()
        render.show(last)
    notes()
    render.close()
    return last if last and last.event_type in notifications.FINAL else None


def cmd_snapshot(args, out):
    args.identity = _identity(args)
    plan = _plan_first(args)
    created = args.image_id is None
    image_id = args.image_id or _create_image(args, plan)
    render = progress.renderer(out, args.format)
    if created and _human(args, out):
        out.write(f'Image {image_id} created ({plan.get("strategy") or "?"}'
                  f' plan: {plan.get("reason") or "worker too old to say"})'
                  f'\n')
    with events.Subscription(CONF, image_id=image_id) as sub:
        try:
            _api().create_snapshot(
                args.identity.context, args.host, args.instance_uuid,
                image_id, target_format=args.disk_format)
        except Exception:
            if created:
                args.identity.images.delete(image_id)
            raise
        try:
            final = _follow(sub, render, args.wait)
        except KeyboardInterrupt:
            sys.stderr.write(f'\nInterrupted: the snapshot into image '
                             f'{image_id} goes on; `snapworker cancel '
                             f'{image_id} --host {args.host}` stops it\n')
            return EXIT_INTERRUPTED
        gaps = sub.disconnections
    if final is None:
        lost = (f' ({gaps} broker connection loss(es): the outcome may '
                f'have been published meanwhile; the image status in '
                f'Glance tells)' if gaps else '')
        sys.stderr.write(f'No outcome for image {image_id} within '
                         f'{args.wait} s{lost}\n')
        return EXIT_TIMEOUT
    return EXIT_OK if final.event_type == notifications.END else EXIT_FAILED


# -- watch --------------------------------------------------------------------

def _matches(event, args):
    payload = event.payload
    if args.host and payload.get('host') != args.host and (
            event.publisher_id != f'snapworker:{args.host}'):
        return False
    if args.instance and payload.get('instance_uuid') != args.instance:
        return False
    return True


def cmd_watch(args, out):
    render = progress.renderer(out, args.format)
    with events.Subscription(CONF, image_id=args.image_id) as sub:
        notes = _GapNotes(sub)
        # Silence is counted in events shown: on a busy bus, other
        # hosts' events must not keep a filtered watch alive.
        deadline = time.monotonic() + args.wait
        try:
            while True:
                event = sub.wait(max(0.0, deadline - time.monotonic()))
                notes()
                if event is None:
                    return EXIT_OK
                if _matches(event, args):
                    render.show(event)
                    deadline = time.monotonic() + args.wait
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        finally:
            render.close()


# -- plan, status, jobs, cancel --------------------------------------------

def _print_plan(plan, out):
    if plan.get('error_code'):
        out.write(f"Instance {plan['instance_uuid']} on {plan['host']}: "
                  f"refused: {plan['error_code']}: {plan['error_message']}"
                  f"\n")
        return
    out.write(
        f"Instance {plan['instance_uuid']} on {plan['host']}: "
        f"{plan['strategy']} plan\n"
        f"  why:    {plan['reason']}\n"
        f"  source: {plan['source_kind']} {plan['source_format']}, "
        f"{progress.human_bytes(plan['virtual_size'])} virtual"
        f"{', guest suspended' if plan.get('managed_save') else ''}\n"
        f"  target: {plan['target_format']} image in "
        f"{plan.get('store') or 'the default store'}\n")


def cmd_plan(args, out):
    args.identity = _identity(args)
    plan = _call(args, 'plan_snapshot', args.instance_uuid,
                 target_format=args.disk_format)
    if _human(args, out):
        _print_plan(plan, out)
    else:
        _print_json(plan, out)
    return EXIT_FAILED if plan.get('error_code') else EXIT_OK


def cmd_status(args, out):
    args.identity = _identity(args)
    _print_json(_call(args, 'get_status'), out)
    return EXIT_OK


def _print_jobs(status, out):
    jobs = status['jobs']
    out.write(f"{status['host']}: {status['running']} running, "
              f"{status['queued']} queued (worker RPC {status['version']})"
              f"\n")
    for job in jobs:
        done, total = job.get('bytes_uploaded'), job.get('bytes_total')
        moved = progress.human_bytes(done) + (
            f'/{progress.human_bytes(total)}' if total else '')
        out.write(f"  {job['image_id']}  {job['state']:<7}  "
                  f"{job.get('strategy') or '-':<7}  {moved:<22}  "
                  f"{job.get('seconds') or 0:.0f} s  instance "
                  f"{job.get('instance_uuid')}\n")


def cmd_jobs(args, out):
    args.identity = _identity(args)
    status = _call(args, 'get_status')
    if 'jobs' not in status:
        sys.stderr.write('The worker lists jobs to admins only\n')
        return EXIT_FAILED
    if _human(args, out):
        _print_jobs(status, out)
    else:
        _print_json(status, out)
    return EXIT_OK


def cmd_cancel(args, out):
    args.identity = _identity(args)
    answer = _call(args, 'cancel_snapshot', image_id=args.image_id)
    if _human(args, out):
        out.write(f"Snapshot into {args.image_id}: "
                  + (f"cancelled ({answer['state']})" if answer['cancelled']
                     else f"not cancelled: {answer['reason']}") + '\n')
    else:
        _print_json(answer, out)
    return EXIT_OK if answer.get('cancelled') else EXIT_FAILED


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
        for kind, ref in plan.cleanup():
            sys.stderr.write(f'Could not remove {kind} {ref}: remove it by '
                             f'hand.\n')
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


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on exit status 64 (EX_USAGE): 2
    already means a timeout here."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f'{self.prog}: error: {message}\n')


def _output_arg(parser):
    parser.add_argument('-f', '--format', default='auto',
                        choices=('auto', 'human', 'json'),
                        help='output: human on a terminal, JSON lines '
                             'otherwise (auto, the default)')


def _worker_args(parser):
    parser.add_argument('--host', required=True,
                        help='compute host whose worker is asked')
    parser.add_argument('--worker-timeout', type=float, default=10,
                        help='seconds to wait for the worker to answer '
                             '(default 10)')
    _output_arg(parser)


def _add_commands(sub):
    snap = sub.add_parser(
        'snapshot', help='snapshot an instance now and follow it',
        description='Create the image as Nova\'s API does (unless '
                    '--image-id), have the worker of --host fill it, '
                    'follow it to its end.')
    snap.add_argument('instance_uuid', metavar='INSTANCE')
    snap.add_argument('--name', help='image name (default: "snapshot of '
                                     'INSTANCE <UTC time>")')
    snap.add_argument('--image-id',
                      help='fill this queued image instead of creating one')
    snap.add_argument('--disk-format', choices=('raw', 'qcow2'),
                      help='image disk format (default: as the source)')
    snap.add_argument('--timeout', dest='wait', type=float, default=3600,
                      help='seconds to follow the snapshot (default 3600)')
    _worker_args(snap)
    snap.set_defaults(func=cmd_snapshot)

    plan = sub.add_parser(
        'plan', help='which plan a snapshot would use, and why',
        description='Ask the worker of --host which plan it would use for '
                    'a snapshot of INSTANCE, and why. The same checks and '
                    'refusals as a snapshot; nothing is read, created or '
                    'notified.')
    plan.add_argument('instance_uuid', metavar='INSTANCE')
    plan.add_argument('--disk-format', choices=('raw', 'qcow2'),
                      help='image disk format (default: as the source)')
    _worker_args(plan)
    plan.set_defaults(func=cmd_plan)

    watch = sub.add_parser('watch', help='follow snapshots as they happen')
    watch.add_argument('--host', help='only this compute host\'s')
    watch.add_argument('--instance', help='only this instance\'s')
    watch.add_argument('--image-id', help='only this image\'s')
    watch.add_argument('--timeout', dest='wait', type=float,
                       default=float('inf'),
                       help='stop after this many seconds without an event '
                            'to show')
    _output_arg(watch)
    watch.set_defaults(func=cmd_watch)

    for name, func, what in (
            ('status', cmd_status, 'is the worker of a host alive'),
            ('jobs', cmd_jobs, 'running and queued snapshots of a host '
                               '(admins)'),
            ('cancel', cmd_cancel, 'stop one snapshot (admins)')):
        command = sub.add_parser(name, help=what)
        if name == 'cancel':
            command.add_argument('image_id', metavar='IMAGE_ID')
        _worker_args(command)
        # The former spelling of --worker-timeout.
        command.add_argument('--timeout', dest='worker_timeout', type=float,
                             default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)
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


def _parser(argv):
    title, _, rest = __doc__.partition('\n')
    parser = _Parser(prog='snapworker', description=title, epilog=rest,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # Registered for every command, so that the same credentials (an
    # exported OS_CLOUD, a shell alias with --os-cloud) work before any.
    parser.set_defaults(cloud_config=credentials.register_arguments(
        parser, argv))
    _add_commands(parser.add_subparsers(dest='command', required=True,
                                        metavar='COMMAND'))
    return parser


def _split_config_args(argv):
    """oslo.config takes --config-file/--config-dir; argparse the rest."""
    conf_args, rest = [], []
    it = iter(argv)
    for arg in it:
        if arg in ('--config-file', '--config-dir'):
            conf_args += [arg, next(it)]
        elif arg.startswith(('--config-file=', '--config-dir=')):
            conf_args.append(arg)
        else:
            rest.append(arg)
    return conf_args, rest


def main(argv=None, out=sys.stdout):
    argv = sys.argv[1:] if argv is None else argv
    conf_args, rest = _split_config_args(argv)
    CONF(conf_args, project='snapworker')
    try:
        parser = _parser(rest)
    except Exception as e:  # an unknown auth type, a broken clouds.yaml
        sys.stderr.write(f'snapworker: {e}\n')
        return EXIT_CREDENTIALS
    args = parser.parse_args(rest)
    try:
        return args.func(args, out)
    except _Failure as e:
        sys.stderr.write(f'{e}\n')
        return e.status


if __name__ == '__main__':
    sys.exit(main())
