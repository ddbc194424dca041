"""``[glance] snapshot_store = base``: the snapshot joins its base image.

The shared Glance has two stores, ``local`` (file, the default) and
``ceph`` (rbd). An instance built from an image kept in ``ceph`` gets its
snapshot uploaded there; one whose base image Nova's metadata does not
name gets Glance's default store.
"""

import io

from snapworker import notifications
from tests.functional import base


class BaseStoreTest(base.FunctionalTestCase):

    worker_conf = {'glance.snapshot_store': 'base'}

    def _base_image(self, store):
        image_id = self.create_image(disk_format='raw',
                                     container_format='bare')
        self.glance.images.upload(image_id, io.BytesIO(b'\0' * 4096),
                                  backend=store)
        return image_id

    def _snapshot(self, base_image):
        disk = self.make_disk(f'store-{base_image}', 'raw', size='4M')
        instance, _ = self.define_domain(path=disk, fmt='raw',
                                         base_image=base_image)
        image_id = self.create_image()
        last = self.snapshot(instance, image_id)[-1]
        self.assertEqual(notifications.END, last.event_type, last.payload)
        self.assertTrue(base.images_identical(
            disk, self.download(image_id, 'raw')))
        return last.payload, self.glance.images.get(image_id)

    def test_snapshot_goes_to_the_base_images_store(self):
        payload, image = self._snapshot(self._base_image('ceph'))
        self.assertEqual(('ceph', 'ceph'), (payload['store'],
                                            image['stores']))

    def test_unknown_base_image_means_the_default_store(self):
        payload, image = self._snapshot(None)
        self.assertEqual((None, 'local'), (payload['store'],
                                           image['stores']))
