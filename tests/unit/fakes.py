"""Doubles for the two outside systems the manager talks to.

Unit tests run the real manager, pipeline, sources and streams against
these; functional tests replace them with libvirt and Glance themselves.
"""

import hashlib
import threading

from snapworker import exception
from snapworker import glance
from snapworker import hypervisor

#: The project of the unit tests' request contexts, domains and images.
PROJECT = 'p'


def _format_of(path):
    """What Nova would write into the domain XML for a test disk file."""
    if path and path.endswith(('.raw', '.img')):
        return 'raw'
    return 'qcow2'


class FakeHypervisor:
    """Domains by instance UUID, with states a test can change."""

    def __init__(self):
        self.domains = {}

    def add(self, instance_uuid, state='shut off', path=None, kind='file',
            managed_save=False, fmt=None, owner=PROJECT):
        disk = hypervisor.RootDisk(
            kind=kind, path=path,
            driver_format=fmt or _format_of(path)) if path else None
        self.domains[instance_uuid] = hypervisor.Domain(
            uuid=instance_uuid, name=f'instance-{instance_uuid[:8]}',
            state=state, root_disk=disk, managed_save=managed_save,
            owner_project=owner)

    def get_domain(self, instance_uuid):
        try:
            return self.domains[instance_uuid]
        except KeyError:
            raise exception.InstanceNotFound(
                instance_uuid=instance_uuid) from None

    def close(self):
        pass


class FakeImageService:
    """Glance images in memory; uploads are read to the end like Glance.

    ``upload_gate``, when set, makes every upload wait for it: the tests
    use it to hold jobs running while they look at the queue.
    ``mid_upload_gate`` makes an upload wait for it after its first chunk,
    once it has set ``mid_upload``: a job caught while its data moves.
    """

    def __init__(self):
        self.images = {}
        self.uploads = []
        self.deleted = []
        self.upload_gate = None
        self.mid_upload_gate = None
        self.mid_upload = threading.Event()
        self.lock = threading.Lock()

    def create(self, image_id, status='queued', owner=PROJECT):
        self.images[image_id] = {'id': image_id, 'status': status,
                                 'owner': owner}

    def __call__(self, context):
        return self

    def get(self, image_id):
        try:
            return dict(self.images[image_id])
        except KeyError:
            raise exception.ImageNotFound(image_id=image_id) from None

    def claim(self, image_id, project_id):
        return glance.check_claim(self.get(image_id), project_id)

    def upload(self, image_id, body, size, disk_format, store=None):
        if self.upload_gate is not None:
            self.upload_gate.wait(10)
        chunks = []
        while True:
            data = body.read(1024 * 1024)
            if not data:
                break
            chunks.append(data)
            if self.mid_upload_gate is not None and len(chunks) == 1:
                self.mid_upload.set()
                self.mid_upload_gate.wait(10)
        with self.lock:
            self.uploads.append(image_id)
        image = self.images[image_id]
        data = b''.join(chunks)
        # What Glance computes over what it received.
        image.update(status='active', disk_format=disk_format,
                     size=size, data=data,
                     checksum=hashlib.md5(data).hexdigest(),
                     os_hash_algo='sha512',
                     os_hash_value=hashlib.sha512(data).hexdigest())

    def wait_active(self, image_id, timeout):
        return self.get(image_id)

    def status(self, image_id):
        image = self.images.get(image_id)
        return image['status'] if image else 'deleted'

    def delete(self, image_id, retries=True):
        self.deleted.append(image_id)
        self.images.pop(image_id, None)
        return True
