"""The only module that talks to Glance (python-glanceclient, keystoneauth1).

The worker acts for the user who asked for the snapshot: every request
carries that user's token from the RPC request context, plus a service
token when ``[service_user] send_service_user_token`` is set, exactly as
nova-compute talks to Glance. With ``[glance] auth_strategy = noauth`` it
sends the identity headers keystonemiddleware would have set instead, for a
Glance deployed without Keystone.

Its configuration is handed to it (``ImageService(conf, context)``), as to
every other worker module: the ``[glance]``, ``[service_user]`` and
``[worker]`` groups of that object are read, never the global CONF. The
operator CLI hands it a keystoneauth session of its own instead of the
request context's token (``session=``).
"""

import time

import glanceclient
from glanceclient import exc as glance_exc
from glanceclient.common import utils as glance_utils
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from keystoneauth1 import plugin as ks_plugin
from oslo_log import log as logging

from snapworker import exception

LOG = logging.getLogger(__name__)

_FINAL_FAILURE_STATES = ('killed', 'deleted', 'pending_delete')

# glanceclient has two unrelated roots: HTTP errors derive from
# ClientException, transport errors (CommunicationError, InvalidEndpoint)
# from its own BaseException.
_GLANCE_ERRORS = (glance_exc.ClientException, glance_exc.BaseException,
                  ks_exc.ClientException)


class ContextAuth(ks_plugin.BaseAuthPlugin):
    """Authenticates Glance requests as the user of a request context."""

    def __init__(self, context, strategy, service_auth=None,
                 service_roles=False):
        """:param strategy: ``[glance] auth_strategy``.
        :param service_auth: the ``[service_user]`` auth plugin whose token
            goes along with the user's (keystone strategy), or None.
        :param service_roles: claim the ``service`` role too (noauth
            strategy; ``[service_user] send_service_user_token``).
        """
        super().__init__()
        self._context = context
        self._strategy = strategy
        self._service_auth = service_auth
        self._service_roles = service_roles

    def get_headers(self, session, **kwargs):
        ctx = self._context
        headers = {}
        if ctx.auth_token:
            headers['X-Auth-Token'] = ctx.auth_token
        if self._strategy == 'noauth':
            headers.update({
                'X-Identity-Status': 'Confirmed',
                'X-User-Id': ctx.user_id or '',
                'X-Project-Id': ctx.project_id or '',
                'X-Roles': ','.join(ctx.roles or ()),
            })
            if self._service_roles:
                headers['X-Service-Roles'] = 'service'
        elif self._service_auth is not None:
            headers['X-Service-Token'] = self._service_auth.get_token(session)
        return headers

    def get_endpoint(self, session, service_type=None, interface=None,
                     region_name=None, **kwargs):
        """Find Glance in the catalog the caller's context carries.

        Only used when ``[glance] endpoint_override`` is unset.
        """
        interfaces = interface if isinstance(interface, list) else [interface]
        for service in getattr(self._context, 'service_catalog', None) or []:
            if service.get('type') != service_type:
                continue
            for endpoint in service.get('endpoints', []):
                if region_name and endpoint.get('region') != region_name:
                    continue
                if endpoint.get('interface') in interfaces or not interface:
                    return endpoint.get('url')
        return None


#: The service user's auth plugin of each configuration: (conf, plugin).
_SERVICE_AUTH = {}


def _service_auth(conf):
    """The service user's auth plugin, one per process, as Nova keeps its
    own (``nova/service_auth.py``); None unless ``[service_user]
    send_service_user_token``.

    keystoneauth reuses the plugin's token until it nears expiry, so a job
    neither waits for a new service token nor for Glance to validate one
    it has not seen: with a plugin per job that was ~1 s under load, spent
    before the read while a suspended guest waits.
    """
    if not conf.service_user.send_service_user_token:
        return None
    cached = _SERVICE_AUTH.get(id(conf))
    if cached is None or cached[0] is not conf:
        cached = _SERVICE_AUTH[id(conf)] = (
            conf, ks_loading.load_auth_from_conf_options(conf,
                                                         'service_user'))
    return cached[1]


def context_auth(conf, context):
    """The ``ContextAuth`` ``conf`` asks for, acting as ``context``."""
    strategy = conf.glance.auth_strategy
    send_service = conf.service_user.send_service_user_token
    service_auth = _service_auth(conf) if strategy == 'keystone' else None
    return ContextAuth(context, strategy, service_auth,
                       service_roles=strategy == 'noauth' and send_service)


def _client(conf, context, session=None, adapter=None):
    """A glanceclient for ``context``, configured by ``conf [glance]``.

    :param session: a keystoneauth session to send with (the operator
        CLI's, authenticated by the user's own credentials); None builds
        one from ``[glance]``'s session options that authenticates with
        the context's token (``context_auth``).
    :param adapter: ``interface``, ``region_name``, ``endpoint_override``
        to use instead of ``[glance]``'s (None values are ignored): the
        CLI's cloud configuration.
    """
    if session is None:
        session = ks_loading.load_session_from_conf_options(
            conf, 'glance', auth=context_auth(conf, context))
    options = {'service_type': conf.glance.service_type,
               'interface': conf.glance.valid_interfaces,
               'region_name': conf.glance.region_name,
               'endpoint_override': conf.glance.endpoint_override}
    options.update((k, v) for k, v in (adapter or {}).items()
                   if v is not None)
    return glanceclient.Client('2', session=session,
                               global_request_id=context.global_id,
                               **options)


def _retrying(attempts, func, *args, **kwargs):
    """Retry an idempotent metadata request on connection failures.

    :param attempts: how many times to try (``[glance] num_retries`` + 1).
    """
    for attempt in range(1, attempts + 1):
        try:
            return func(*args, **kwargs)
        except (glance_exc.CommunicationError, glance_exc.InvalidEndpoint,
                ks_exc.ConnectFailure, glance_exc.HTTPServiceUnavailable):
            if attempt == attempts:
                raise
            LOG.warning('Glance unreachable, retry %d of %d', attempt,
                        attempts - 1)
            time.sleep(min(2 ** attempt, 10))


#: What says Glance did not answer at all (down, hung, overloaded).
_UNAVAILABLE = (glance_exc.CommunicationError, glance_exc.InvalidEndpoint,
                glance_exc.HTTPServiceUnavailable, glance_exc.HTTPBadGateway,
                ks_exc.ConnectFailure, ks_exc.ConnectTimeout,
                ks_exc.RequestTimeout)


def _glance_error(image_id, error):
    """The snapworker exception for a glanceclient/keystoneauth error."""
    cls = (exception.GlanceUnavailable if isinstance(error, _UNAVAILABLE)
           else exception.GlanceError)
    return cls(image_id=image_id, reason=str(error))


def _http_status(error):
    """The HTTP status of a glanceclient error, or None.

    glanceclient has classes for the common codes only; any other code
    (415 among them) is a plain HTTPException whose text starts with it.
    """
    code = getattr(error, 'code', None)
    if isinstance(code, int):
        return code
    words = str(error).split(None, 2)
    if len(words) > 1 and words[0] == 'HTTP' and words[1].isdigit():
        return int(words[1])
    return None


def check_claim(image, project_id):
    """Return ``image`` if it is a snapshot request's to fill.

    The one rule for "this image is the request's to fill, and to delete
    if the snapshot fails": it belongs to the requesting project and is
    ``queued`` (nothing was uploaded yet). An image that is active,
    saving (filled by someone else) or another project's is left
    untouched.

    :raises ImageNotOwned, ImageNotQueued:
    """
    image_id, status = image.get('id'), image.get('status')
    owner = image.get('owner')
    if owner != project_id:
        raise exception.ImageNotOwned(image_id=image_id, owner=owner,
                                      project_id=project_id, status=status)
    if status != 'queued':
        raise exception.ImageNotQueued(image_id=image_id, status=status)
    return image


class ImageService:
    """The Glance operations a snapshot needs, with snapworker's errors."""

    def __init__(self, conf, context, session=None, adapter=None):
        """:param conf: the configuration to read ``[glance]``,
            ``[service_user]`` and ``[worker] active_timeout`` from.
        :param context: the request context acted for.
        :param session, adapter: see ``_client``.
        """
        self._conf = conf
        self._context = context
        self._client = _client(conf, context, session, adapter)

    def _retrying(self, func, *args, **kwargs):
        return _retrying(self._conf.glance.num_retries + 1, func, *args,
                         **kwargs)

    def get(self, image_id):
        """The image's metadata as a dict.

        :raises ImageNotFound: no such image (or not visible to the user).
        """
        try:
            return dict(self._retrying(self._client.images.get, image_id))
        except glance_exc.HTTPNotFound as e:
            raise exception.ImageNotFound(image_id=image_id) from e
        except _GLANCE_ERRORS as e:
            raise _glance_error(image_id, e) from e

    def create(self, **fields):
        """Create a queued image with ``fields`` (name, visibility,
        properties...); return its metadata as a dict.

        Not retried: a create whose answer was lost may have created an
        image, and a retry would make a second one.
        """
        try:
            return dict(self._client.images.create(**fields))
        except _GLANCE_ERRORS as e:
            raise _glance_error('-', e) from e

    def claim(self, image_id, project_id):
        """The image, if a snapshot for ``project_id`` may fill it.

        :raises ImageNotFound, ImageNotOwned, ImageNotQueued: see
            ``check_claim``.
        """
        return check_claim(self.get(image_id), project_id)

    def upload(self, image_id, body, size, disk_format,
               container_format='bare', store=None):
        """Set the formats, then stream ``body`` as the image data.

        ``body`` is read to its end by glanceclient in bounded chunks
        (chunked transfer), so memory does not depend on the image size.
        ``store`` names the Glance store (``enabled_backends`` id) to
        upload into; None leaves the choice to Glance (its default store).
        """
        try:
            self._retrying(self._client.images.update, image_id,
                           disk_format=disk_format,
                           container_format=container_format)
            self._client.images.upload(image_id, body, image_size=size,
                                       backend=store)
        except glance_exc.HTTPNotFound as e:
            raise exception.ImageNotFound(image_id=image_id) from e
        except _GLANCE_ERRORS as e:
            if _http_status(e) == 415:
                # Glance's format inspection: the data does not look like
                # ``disk_format`` (say raw bytes that start like a qcow2).
                raise exception.ImageDataRejected(
                    image_id=image_id, disk_format=disk_format,
                    reason=str(e)) from e
            raise _glance_error(image_id, e) from e

    def wait_active(self, image_id, timeout, interval=0.5):
        """Block until the image is active; return its metadata."""
        deadline = time.monotonic() + timeout
        while True:
            image = self.get(image_id)
            status = image.get('status')
            if status == 'active':
                return image
            if status in _FINAL_FAILURE_STATES:
                raise exception.ImageNotActive(image_id=image_id,
                                               status=status)
            if time.monotonic() >= deadline:
                raise exception.ImageNotActive(
                    image_id=image_id,
                    status=f'{status} after {timeout} s')
            time.sleep(interval)

    def add_member(self, image_id, member_id):
        """Share the image with project ``member_id``, as Nova shares an
        admin's snapshot of another project's instance with that project.

        Retried on connection failures; a member that exists already (a
        retry of a create whose answer was lost) is success.
        """
        try:
            self._retrying(self._client.image_members.create, image_id,
                           member_id)
        except glance_exc.HTTPConflict:
            pass
        except glance_exc.HTTPNotFound as e:
            raise exception.ImageNotFound(image_id=image_id) from e
        except _GLANCE_ERRORS as e:
            raise _glance_error(image_id, e) from e

    def delete(self, image_id, retries=True):
        """Delete the image, as Nova does for a failed snapshot.

        Never raises: the snapshot has already failed, and a cleanup error
        must not hide its cause. Returns whether Glance confirmed the
        image is gone; when it did not, the caller hands the image to the
        reaper (``reaper.py``).

        :param retries: retry on connection failures first (``[glance]
            num_retries``); the reaper, which retries on its own
            schedule, makes single attempts.
        """
        try:
            if retries:
                self._retrying(self._client.images.delete, image_id)
            else:
                self._client.images.delete(image_id)
        except glance_exc.HTTPNotFound:
            return True
        except Exception as e:
            LOG.warning('Could not delete image %s: %s', image_id, e)
            return False
        return True

    def image_stores(self, image_id):
        """The stores that hold an image's data (Glance's ``stores``).

        Empty when the image is not visible, or Glance has one store.
        """
        try:
            stores = self.get(image_id).get('stores') or ''
        except exception.ImageNotFound:
            return []
        return [store for store in stores.split(',') if store]

    def status(self, image_id):
        """The image's status; ``deleted`` when Glance has no such image.

        :raises GlanceError: Glance did not answer.
        """
        try:
            return self.get(image_id).get('status')
        except exception.ImageNotFound:
            return 'deleted'

    # -- data already in a store (RBD clones) --------------------------------

    def stores(self):
        """The stores Glance offers, with their details when it tells them.

        Example (details need the admin role; without it only ``id`` and
        ``default`` are known, ``type`` and ``properties`` are missing)::

            [{'id': 'local', 'default': True, 'type': 'file',
              'properties': {'data_dir': '/var/lib/glance/images/'}},
             {'id': 'ceph', 'default': False, 'type': 'rbd',
              'properties': {'pool': 'images', 'fsid': '<ceph fsid>'}}]

        An empty list means Glance runs without multiple stores (the
        discovery API answers 404): nothing can be learnt from it.
        """
        images = self._client.images
        try:
            body = self._retrying(images.get_stores_info_detail)
        except (glance_exc.HTTPForbidden, glance_exc.HTTPUnauthorized):
            LOG.debug('Glance store details need the admin role; using the '
                      'store ids only')
            try:
                body = self._retrying(images.get_stores_info)
            except glance_exc.HTTPNotFound:
                return []
            except _GLANCE_ERRORS as e:
                raise exception.GlanceError(image_id='-',
                                            reason=str(e)) from e
        except glance_exc.HTTPNotFound:
            return []
        except _GLANCE_ERRORS as e:
            raise exception.GlanceError(image_id='-', reason=str(e)) from e
        stores = []
        for store in (body or {}).get('stores', []):
            store = dict(store)
            store['default'] = str(store.get('default', '')).lower() == 'true'
            stores.append(store)
        return stores

    def location_api(self):
        """Which API ``add_location`` will use: 'v2.17' or 'patch'.

        The v2.17 API (``POST /v2/images/{id}/locations``) is the supported
        one, but Glance lets only callers with the ``service`` role (as a
        user role or through a service token) add a non-http location;
        the old JSON-patch API needs ``show_multiple_locations`` on the
        Glance side and a project member. The worker cannot see Glance's
        configuration, so it prefers v2.17 whenever both it and the
        service role are there.
        """
        roles = set(getattr(self._context, 'roles', None) or ())
        has_service = ('service' in roles
                       or self._conf.service_user.send_service_user_token)
        if has_service and self._retrying(
                glance_utils.has_version, self._client.http_client, 'v2.17'):
            return 'v2.17'
        return 'patch'

    def add_location(self, image_id, url, validation_data=None,
                     disk_format='raw', container_format='bare',
                     timeout=None):
        """Make existing store data (``rbd://...``) the data of a queued image.

        Returns the API used ('v2.17' or 'patch'), once Glance references
        the location and the image is active: the v2.17 API does the work
        in an asynchronous task, so this waits for it (a failed task
        leaves the image queued, which is reported as ``ImageNotActive``
        after ``timeout`` seconds, ``[worker] active_timeout`` by default).
        From then on Glance owns the data: deleting the image deletes it.

        ``validation_data`` (``checksum``, ``os_hash_algo``,
        ``os_hash_value``) is stored as given by the old API and checked
        by the v2.17 task; None sends none.
        """
        api = self.location_api()
        images = self._client.images
        try:
            self._retrying(images.update, image_id, disk_format=disk_format,
                           container_format=container_format)
            if api == 'v2.17':
                images.add_image_location(image_id, url,
                                          validation_data or {})
            else:
                images.add_location(image_id, url, {},
                                    validation_data=validation_data)
        except glance_exc.HTTPNotFound as e:
            raise exception.ImageNotFound(image_id=image_id) from e
        except _GLANCE_ERRORS as e:
            raise exception.GlanceError(
                image_id=image_id,
                reason=f'adding location ({api} API): {e}') from e
        if timeout is None:
            timeout = self._conf.worker.active_timeout
        self.wait_active(image_id, timeout, interval=0.2)
        LOG.info('Image %s now references %s (%s location API)', image_id,
                 url, api)
        return api
