"""What ``snapworker-status upgrade check`` checks, one method per check.

Each check asks one dependency of the worker the question the worker
would ask it (through the module that owns that dependency: journal.py,
hypervisor.py, glance.py, sources/ceph.py, rpcapi.py) and answers
Success, Warning or Failure, with details that name the option or the
resource to fix. The command itself is snapworker/cmd/status.py; the
checks live outside ``snapworker.cmd`` so that tests can import them
without choosing oslo.service's backend.

They read and probe; they change nothing, except that the journal check
writes, fsyncs and removes one scratch file in ``[worker] journal_dir``.
"""

import os

from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from oslo_context import context as o_context
from oslo_upgradecheck import upgradecheck
from oslo_utils import versionutils

from snapworker import exception
from snapworker import glance
from snapworker import hypervisor
from snapworker import identity
from snapworker import journal
from snapworker import rpcapi
from snapworker.conf import CONF

Code = upgradecheck.Code
Result = upgradecheck.Result

#: The identity a noauth Glance is shown (it trusts the headers).
_NOAUTH_IDENTITY = 'snapworker-status'


def _success(details):
    return Result(Code.SUCCESS, details)


def _warning(details):
    return Result(Code.WARNING, details)


def _failure(details):
    return Result(Code.FAILURE, details)


def _nearest_existing(path):
    """``path`` or the closest of its ancestors that exists."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _glance_context(conf):
    """The request context this check talks to Glance with.

    The worker has no Glance identity of its own: it acts with each
    requester's token. ``[service_user]`` is the only credential in its
    configuration, so that is what the check authenticates with; a
    noauth Glance is shown a reader's identity headers.

    :returns: (context, None), or (None, Result) when there is nothing
        to authenticate with or the credentials are refused.
    """
    if conf.glance.auth_strategy == 'noauth':
        if not conf.glance.endpoint_override:
            return None, _failure(
                '[glance] auth_strategy = noauth has no service catalog to '
                'find Glance in: set [glance] endpoint_override to the '
                'Image API URL.')
        return o_context.RequestContext(
            user_id=_NOAUTH_IDENTITY, project_id=_NOAUTH_IDENTITY,
            roles=['reader']), None
    if not conf.service_user.send_service_user_token:
        return None, _warning(
            '[service_user] send_service_user_token is off, so the worker '
            'has no credentials of its own and Glance was not asked: it '
            'acts with each requester\'s token only. Configure '
            '[service_user] (a user with the service role): this check '
            'can then reach Glance, and a long upload or a recovery after '
            'a crash survives the requester\'s token expiring.')
    try:
        auth = ks_loading.load_auth_from_conf_options(conf, 'service_user')
        session = ks_loading.load_session_from_conf_options(
            conf, 'service_user', auth=auth)
        access = auth.get_access(session)
    except ks_exc.ClientException as e:
        return None, _failure(
            f'[service_user] could not authenticate to Keystone ({e}): '
            f'check its auth_type, auth_url, username, password and '
            f'project options.')
    # The worker finds Glance in the catalog its requests carry; the
    # service user's own catalog stands in for it here.
    return identity.context_from_access(access), None


def _named_stores(conf):
    """The Glance store ids snapworker.conf names, with their options."""
    named = {}
    if conf.glance.snapshot_store not in ('default', 'base'):
        named['[glance] snapshot_store'] = conf.glance.snapshot_store
    if conf.rbd.glance_store:
        named['[rbd] glance_store'] = conf.rbd.glance_store
    return named


class Checks(upgradecheck.UpgradeCommands):
    """What the worker needs from this host, one check per dependency.

    :param conf: the configuration to check.
    """

    display_title = 'snapworker upgrade check'

    def __init__(self, conf=CONF):
        super().__init__()
        self._conf = conf

    def _check_journal_dir(self):
        """[worker] journal_dir: persistent, writable, durable writes."""
        path = self._conf.worker.journal_dir
        fstype = journal.filesystem_type(path)
        if fstype in journal.VOLATILE_FILESYSTEMS:
            return _failure(
                f'[worker] journal_dir {path} is on a {fstype} filesystem, '
                f'which is emptied at reboot: after a host crash the '
                f'worker could not find what to clean up. Point it at '
                f'persistent storage (default /var/lib/snapworker/journal).')
        if not os.path.lexists(path):
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                return _failure(
                    f'Neither [worker] journal_dir {path} nor its parent '
                    f'{parent} exist: a typo, or the persistent '
                    f'filesystem meant to hold it is not mounted (the '
                    f'worker would create it on '
                    f'{_nearest_existing(parent)}). Create {parent} or '
                    f'fix the option.')
            if not os.access(parent, os.W_OK | os.X_OK):
                return _failure(
                    f'[worker] journal_dir {path} does not exist and this '
                    f'user cannot create it in {parent}: create it, owned '
                    f'by the worker\'s user, mode 0700.')
            return _success(
                f'{path} does not exist yet; the worker creates it (mode '
                f'0700) when it starts, on {fstype}.')
        if not os.path.isdir(path):
            return _failure(f'[worker] journal_dir {path} is not a '
                            f'directory: remove it or fix the option.')
        try:
            journal.Journal(path).probe()
        except OSError as e:
            return _failure(
                f'[worker] journal_dir {path} cannot take a record '
                f'({e}): it must be writable by the worker\'s user (run '
                f'this check as that user), and the worker will not '
                f'start without it.')
        return _success(f'{path} took a durable (fsynced) write, on '
                        f'{fstype}.')

    def _check_instances_path(self):
        """[DEFAULT] instances_path: the disks the worker reads."""
        path = self._conf.instances_path
        if not os.path.isdir(path):
            return _failure(
                f'[DEFAULT] instances_path {path} is not a directory: set '
                f'it to nova-compute\'s instances_path on this host.')
        try:
            count = len(os.listdir(path))
        except OSError as e:
            return _failure(
                f'[DEFAULT] instances_path {path} cannot be read ({e}): '
                f'the worker reads the instances\' disks there; run it '
                f'(and this check) as a user that may.')
        return _success(f'{path} is readable ({count} entries).')

    def _check_libvirt(self):
        """[DEFAULT] libvirt_uri: where domains and their disks are found."""
        uri = self._conf.libvirt_uri
        hyp = hypervisor.Hypervisor(uri)
        try:
            what = hyp.describe()
        except ConnectionError as e:
            return _failure(
                f'[DEFAULT] libvirt_uri {uri} cannot be opened read-only '
                f'({e}): it must be the URI nova-compute uses, with '
                f'libvirtd running and its read-only socket open to this '
                f'user.')
        finally:
            hyp.close()
        return _success(f'{uri}: {what}.')

    def _check_glance(self):
        """[glance] and [service_user]: the Image API answers."""
        context, result = _glance_context(self._conf)
        if result is not None:
            return result
        where = (self._conf.glance.endpoint_override
                 or 'the service catalog')
        # One attempt: a check should say "unreachable" in seconds, not
        # after the worker's backoff.
        self._conf.set_override('num_retries', 0, group='glance')
        try:
            stores = glance.ImageService(self._conf, context).stores()
        except exception.GlanceError as e:
            reason = e.kwargs.get('reason', e)
            return _failure(
                f'Glance at {where} did not answer as expected ({reason}): '
                f'check [glance] endpoint_override (or the catalog\'s '
                f'image endpoint, [glance] valid_interfaces and '
                f'region_name), cafile, and the credentials.')
        finally:
            self._conf.clear_override('num_retries', group='glance')
        ids = [store['id'] for store in stores]
        for option, store in _named_stores(self._conf).items():
            if ids and store not in ids:
                return _failure(
                    f'{option} = {store}, but Glance at {where} has only '
                    f'the stores {", ".join(ids)}: name one of them.')
        offered = (f'stores {", ".join(ids)}' if ids
                   else 'a single store')
        return _success(f'Glance at {where} answered; it offers '
                        f'{offered}.')

    def _check_rbd(self):
        """[rbd]: the Ceph cluster and the pools snapworker.conf names."""
        opts = self._conf.rbd
        pools = [opts.glance_pool] if opts.glance_pool else []
        if not os.path.exists(opts.ceph_conf):
            if pools:
                return _failure(
                    f'[rbd] glance_pool is set but [rbd] ceph_conf '
                    f'{opts.ceph_conf} does not exist: set ceph_conf to '
                    f'the cluster\'s ceph.conf.')
            return _success(f'Not configured ([rbd] ceph_conf '
                            f'{opts.ceph_conf} does not exist): no RBD '
                            f'disks on this host.')
        try:
            # Loaded only here: a host without RBD disks needs no librados.
            from snapworker.sources import ceph
        except ImportError as e:
            return _failure(
                f'[rbd] ceph_conf {opts.ceph_conf} exists but Ceph\'s '
                f'Python bindings cannot be loaded ({e}): install '
                f'python3-rados and python3-rbd.')
        try:
            fsid = ceph.check_pools(self._conf, pools)
        except exception.RbdError as e:
            return _failure(
                f'{e}. Check [rbd] ceph_conf, user and keyring, and that '
                f'[rbd] glance_pool is the pool of Glance\'s rbd store.')
        named = (f'pool {pools[0]} readable' if pools
                 else 'no pool named in [rbd]')
        return _success(f'Ceph cluster {fsid} answered client.{opts.user}; '
                        f'{named}.')

    def _check_rpc_version_cap(self):
        """[upgrade_levels] snapworker: a version this code speaks."""
        known = rpcapi.RPC_API_VERSION
        try:
            cap = self._conf.upgrade_levels.snapworker
        except ValueError as e:
            return _failure(f'[upgrade_levels] snapworker is not a '
                            f'version ({e}): use MAJOR.MINOR, e.g. 1.0.')
        if cap is None:
            return _success(f'Not capped: clients here send up to {known}, '
                            f'the newest version this code speaks.')
        cap_t = versionutils.convert_version_to_tuple(cap)
        known_t = versionutils.convert_version_to_tuple(known)
        if cap_t[0] != known_t[0] or cap_t > known_t:
            return _failure(
                f'[upgrade_levels] snapworker = {cap}, but this code '
                f'speaks {known_t[0]}.0 to {known}: set it to the version '
                f'of the oldest snapworker-worker still running, or '
                f'remove it.')
        if cap_t < known_t:
            return _warning(
                f'[upgrade_levels] snapworker = {cap} caps clients below '
                f'{known}: what came later is not sent (see '
                f'SnapworkerAPI\'s version history). Remove it here and '
                f'in nova.conf once every snapworker-worker runs {known}.')
        return _success(f'Capped at {cap}, the newest version this code '
                        f'speaks.')

    _upgrade_checks = (
        ('Journal directory', _check_journal_dir),
        ('Instances path', _check_instances_path),
        ('libvirt', _check_libvirt),
        ('Glance', _check_glance),
        ('Ceph RBD', _check_rbd),
        ('RPC version cap', _check_rpc_version_cap),
    )

