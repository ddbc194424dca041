"""The only module that talks to Glance (python-glanceclient, keystoneauth1).

The worker acts for the user who asked for the snapshot: every request
carries that user's token from the RPC request context, plus a service
token when ``[service_user] send_service_user_token`` is set, exactly as
nova-compute talks to Glance. With ``[glance] auth_strategy = noauth`` it
sends the identity headers keystonemiddleware would have set instead, for a
Glance deployed without Keystone.
"""

import time

import glanceclient
from glanceclient import exc as glance_exc
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from keystoneauth1 import plugin as ks_plugin
from oslo_log import log as logging

from snapworker import exception
from snapworker.conf import CONF

LOG = logging.getLogger(__name__)

_FINAL_FAILURE_STATES = ('killed', 'deleted', 'pending_delete')

# glanceclient has two unrelated roots: HTTP errors derive from
# ClientException, transport errors (CommunicationError, InvalidEndpoint)
# from its own BaseException.
_GLANCE_ERRORS = (glance_exc.ClientException, glance_exc.BaseException,
                  ks_exc.ClientException)


class ContextAuth(ks_plugin.BaseAuthPlugin):
    """Authenticates Glance requests as the user of a request context."""

    def __init__(self, context, strategy, service_auth=None):
        super().__init__()
        self._context = context
        self._strategy = strategy
        self._service_auth = service_auth

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
            if CONF.service_user.send_service_user_token:
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


def _service_auth():
    if not CONF.service_user.send_service_user_token:
        return None
    return ks_loading.load_auth_from_conf_options(CONF, 'service_user')


def _client(context):
    strategy = CONF.glance.auth_strategy
    auth = ContextAuth(context, strategy, _service_auth())
    session = ks_loading.load_session_from_conf_options(
        CONF, 'glance', auth=auth)
    return glanceclient.Client(
        '2', session=session,
        service_type=CONF.glance.service_type,
        interface=CONF.glance.valid_interfaces,
        region_name=CONF.glance.region_name,
        endpoint_override=CONF.glance.endpoint_override,
        global_request_id=context.global_id)


def _retrying(func, *args, **kwargs):
    """Retry an idempotent metadata request on connection failures."""
    attempts = CONF.glance.num_retries + 1
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


class ImageService:
    """The Glance operations a snapshot needs, with snapworker's errors."""

    def __init__(self, context):
        self._client = _client(context)

    def get(self, image_id):
        """The image's metadata as a dict.

        :raises ImageNotFound: no such image (or not visible to the user).
        """
        try:
            return dict(_retrying(self._client.images.get, image_id))
        except glance_exc.HTTPNotFound as e:
            raise exception.ImageNotFound(image_id=image_id) from e
        except _GLANCE_ERRORS as e:
            raise exception.GlanceError(image_id=image_id,
                                        reason=str(e)) from e

    def upload(self, image_id, body, size, disk_format,
               container_format='bare'):
        """Set the formats, then stream ``body`` as the image data.

        ``body`` is read to its end by glanceclient in bounded chunks
        (chunked transfer), so memory does not depend on the image size.
        """
        try:
            _retrying(self._client.images.update, image_id,
                      disk_format=disk_format,
                      container_format=container_format)
            self._client.images.upload(image_id, body, image_size=size)
        except glance_exc.HTTPNotFound as e:
            raise exception.ImageNotFound(image_id=image_id) from e
        except _GLANCE_ERRORS as e:
            raise exception.GlanceError(image_id=image_id,
                                        reason=str(e)) from e

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

    def delete(self, image_id):
        """Delete the image, as Nova does for a failed snapshot.

        Best effort: the snapshot has already failed, and a cleanup error
        must not hide its cause. Returns whether the image is gone.
        """
        try:
            _retrying(self._client.images.delete, image_id)
        except glance_exc.HTTPNotFound:
            return True
        except Exception:
            LOG.exception('Could not delete image %s after a failed '
                          'snapshot', image_id)
            return False
        return True
