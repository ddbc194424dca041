"""What the worker trusts of a domain's XML: Nova's metadata, hostile too.

The owner decides whether a request may snapshot the instance, so only
exactly one ``<nova:owner><nova:project>`` in Nova's namespace counts.
"""

from xml.etree import ElementTree

import testtools

from snapworker import hypervisor

NOVA = 'http://openstack.org/xmlns/libvirt/nova/1.1'


def _domain(metadata):
    return ElementTree.fromstring(
        f"<domain><metadata>{metadata}</metadata><devices/></domain>")


def _instance(body, ns=NOVA):
    return f"<nova:instance xmlns:nova='{ns}'>{body}</nova:instance>"


OWNER = "<nova:owner><nova:project uuid='p1'>p</nova:project></nova:owner>"


class MetadataTestCase(testtools.TestCase):

    def test_owner_and_base_image(self):
        tree = _domain(_instance(
            OWNER + "<nova:root type='image' uuid='img-1'/>"))
        self.assertEqual(('p1', 'img-1'),
                         (hypervisor.parse_owner_project(tree),
                          hypervisor.parse_base_image(tree)))

    def test_no_trusted_owner(self):
        cases = [
            '',                                        # no metadata
            _instance(''),                             # no owner
            _instance(OWNER + OWNER),                  # two owners
            _instance(OWNER, ns='http://evil/nova/'),  # not Nova's
            _instance(OWNER) + _instance(OWNER),       # two instances
            _instance("<nova:owner><nova:project>p</nova:project>"
                      "</nova:owner>"),                # no uuid
        ]
        for metadata in cases:
            self.assertIsNone(
                hypervisor.parse_owner_project(_domain(metadata)), metadata)

    def test_root_not_from_an_image_names_no_base(self):
        tree = _domain(_instance(
            OWNER + "<nova:root type='volume' uuid='vol-1'/>"))
        self.assertIsNone(hypervisor.parse_base_image(tree))
