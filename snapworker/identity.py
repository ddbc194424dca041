"""A request context from keystoneauth credentials.

The operator CLI (the user's own session) and the upgrade check (the
``[service_user]``) both act through a token they obtained themselves; the
context they build is the one keystonemiddleware would describe for the
same token, so the worker and Glance see what they would see for a
request coming through Nova.
"""

from oslo_context import context as o_context

#: Catalog entries the worker may need: it finds Glance in the catalog it
#: receives when ``[glance] endpoint_override`` is unset. Nothing else of
#: the user's catalog is sent.
FORWARDED_SERVICE_TYPES = ('image',)


def context_from_access(access):
    """The request context of a keystoneauth ``AccessInfo``.

    As keystonemiddleware would describe the same token to a service:
    token, user, project, domains, role names; plus the Image service of
    the token's catalog (v3 format), which the worker uses to find Glance
    when its own configuration names no endpoint.
    """
    catalog = [service for service in
               (access.service_catalog.catalog or [])
               if service.get('type') in FORWARDED_SERVICE_TYPES]
    context = o_context.RequestContext(
        auth_token=access.auth_token,
        user_id=access.user_id, project_id=access.project_id,
        user_domain_id=access.user_domain_id,
        project_domain_id=access.project_domain_id,
        user_name=access.username, project_name=access.project_name,
        roles=list(access.role_names or ()),
        is_admin='admin' in (access.role_names or ()))
    context.service_catalog = catalog
    return context
