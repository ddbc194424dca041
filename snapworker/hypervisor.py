"""The only module that talks to libvirt.

The worker only ever reads from libvirt (a read-only connection): which
domain belongs to an instance, whether it is shut off, and where its root
disk lives. The disk location is taken from here, never from the request.
"""

import dataclasses
import threading
from xml.etree import ElementTree

import libvirt

from snapworker import exception

# libvirt prints every error to stderr unless a handler is registered; the
# worker turns the errors it cares about into SnapshotErrors instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: 'nostate',
    libvirt.VIR_DOMAIN_RUNNING: 'running',
    libvirt.VIR_DOMAIN_BLOCKED: 'blocked',
    libvirt.VIR_DOMAIN_PAUSED: 'paused',
    libvirt.VIR_DOMAIN_SHUTDOWN: 'shutting down',
    libvirt.VIR_DOMAIN_SHUTOFF: 'shut off',
    libvirt.VIR_DOMAIN_CRASHED: 'crashed',
    libvirt.VIR_DOMAIN_PMSUSPENDED: 'suspended',
}


@dataclasses.dataclass(frozen=True)
class RootDisk:
    """Where an instance's root disk lives, as its domain XML says.

    Examples::

        RootDisk(kind='file', path='/var/lib/nova/instances/<uuid>/disk',
                 driver_format='qcow2')
        RootDisk(kind='block', path='/dev/nova-vg/<uuid>_disk',
                 driver_format='raw')
        RootDisk(kind='rbd', pool='vms', name='<uuid>_disk',
                 driver_format='raw')
    """

    kind: str
    driver_format: str | None = None
    path: str | None = None
    pool: str | None = None
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Domain:
    uuid: str
    name: str
    state: str
    root_disk: RootDisk | None
    #: The guest's memory is saved to be restored: Nova's
    #: ``_suspend_guest_for_snapshot`` stopped a running guest this way and
    #: resumes it when the disk is released. A guest is waiting on us.
    managed_save: bool = False
    #: The project that owns the instance, from Nova's metadata in the
    #: domain XML (``<nova:owner><nova:project uuid=...>``); None when the
    #: domain has none (not a domain Nova made).
    owner_project: str | None = None
    #: The Glance image the instance was built from, from Nova's metadata
    #: (``<nova:root type='image' uuid=...>``); None when not from an
    #: image or not said.
    base_image_id: str | None = None

    @property
    def shut_off(self):
        return self.state == 'shut off'


#: Nova's metadata namespace, ``.../nova/1.1`` today; any version is read.
_NOVA_NS_PREFIX = 'http://openstack.org/xmlns/libvirt/nova/'


def _nova_child(element, name):
    """The single child ``<nova:name>`` of element, else None."""
    if element is None:
        return None
    found = [child for child in element
             if child.tag.startswith('{' + _NOVA_NS_PREFIX)
             and child.tag.endswith('}' + name)]
    return found[0] if len(found) == 1 else None


def parse_owner_project(tree):
    """The owner project UUID Nova wrote into the domain, or None.

    Exactly one ``<metadata><nova:instance><nova:owner><nova:project>``
    counts: a domain with none, or with two, has no owner the worker
    can trust.
    """
    instance = _nova_child(tree.find('metadata'), 'instance')
    project = _nova_child(_nova_child(instance, 'owner'), 'project')
    if project is None:
        return None
    return project.get('uuid') or None


def parse_base_image(tree):
    """The image UUID of ``<nova:root type='image'>``, or None."""
    root = _nova_child(_nova_child(tree.find('metadata'), 'instance'),
                       'root')
    if root is None or root.get('type') != 'image':
        return None
    return root.get('uuid') or None


def parse_root_disk(xml):
    """The first ``<disk device='disk'>`` of a domain: Nova's root disk."""
    tree = xml if isinstance(xml, ElementTree.Element) else (
        ElementTree.fromstring(xml))
    for disk in tree.findall('./devices/disk'):
        if disk.get('device', 'disk') != 'disk':
            continue
        driver = disk.find('driver')
        fmt = driver.get('type') if driver is not None else None
        source = disk.find('source')
        if source is None:
            continue
        disk_type = disk.get('type')
        if disk_type == 'file' and source.get('file'):
            return RootDisk(kind='file', path=source.get('file'),
                            driver_format=fmt)
        if disk_type == 'block' and source.get('dev'):
            return RootDisk(kind='block', path=source.get('dev'),
                            driver_format=fmt)
        if disk_type == 'network' and source.get('protocol') == 'rbd':
            pool, _, name = (source.get('name') or '').partition('/')
            return RootDisk(kind='rbd', pool=pool, name=name,
                            driver_format=fmt)
        return RootDisk(kind=disk_type or 'unknown', driver_format=fmt)
    return None


def _version(number):
    """libvirt's packed version number (major * 1e6 + minor * 1e3 + micro)."""
    major, rest = divmod(number, 1000000)
    return f'{major}.{rest // 1000}.{rest % 1000}'


class Hypervisor:
    """Read-only view of the domains of this host."""

    def __init__(self, uri):
        self._uri = uri
        self._lock = threading.Lock()
        self._conn = None

    def _connection(self):
        with self._lock:
            if self._conn is None or not self._conn.isAlive():
                self._conn = libvirt.openReadOnly(self._uri)
            return self._conn

    def describe(self):
        """Open the read-only connection and say what answers on it.

        For ``snapworker-status upgrade check``: the worker needs nothing
        but this connection from libvirt, so being able to open it is
        what "libvirt reachable" means. Returns e.g. ``'QEMU 7.2.0 on
        compute-1, libvirt 9.0.0'``.

        :raises ConnectionError: the connection cannot be opened or does
            not answer (libvirt's message as its text).
        """
        try:
            conn = self._connection()
            return (f'{conn.getType()} {_version(conn.getVersion())} on '
                    f'{conn.getHostname()}, libvirt '
                    f'{_version(conn.getLibVersion())}')
        except libvirt.libvirtError as e:
            raise ConnectionError(str(e)) from e

    def get_domain(self, instance_uuid):
        """The domain of an instance, with its state and root disk.

        :raises InstanceNotFound: no domain has this UUID.
        """
        try:
            dom = self._connection().lookupByUUIDString(instance_uuid)
            state, _reason = dom.state()
            xml = dom.XMLDesc(0)
            name = dom.name()
            managed_save = bool(dom.hasManagedSaveImage(0))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise exception.InstanceNotFound(
                    instance_uuid=instance_uuid) from e
            raise
        tree = ElementTree.fromstring(xml)
        return Domain(uuid=instance_uuid, name=name,
                      state=_STATE_NAMES.get(state, f'state {state}'),
                      root_disk=parse_root_disk(tree),
                      managed_save=managed_save,
                      owner_project=parse_owner_project(tree),
                      base_image_id=parse_base_image(tree))

    def close(self):
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None
