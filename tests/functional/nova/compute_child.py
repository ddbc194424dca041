"""The child nova-compute of nova/test_driver.py: one ``driver.snapshot()``.

A module of its own, apart from the tests, so that the child imports
nothing but Nova, the driver under test and what it pulls in: the
functional tests' base imports the worker's configuration, which a real
nova-compute never has (``snapworker_modules`` of the result shows it).

Run by ``test_driver._CHILD`` after Nova's own ``parse_args``.
"""

import json
import sys
import time
import traceback
import uuid

_DRIVERS = {
    'native': 'nova.virt.libvirt.driver.LibvirtDriver',
    'snapworker': 'snapworker.nova.driver.SnapworkerLibvirtDriver',
}

#: Worker payload fields kept in the child's timeline.
_PAYLOAD_KEYS = ('strategy', 'plan_reason', 'source_kind', 'target_format',
                 'bytes_read', 'scratch_bytes', 'source_held_seconds',
                 'duration_seconds')


def main(spec_path):
    """The child: one snapshot through Nova's driver; results as JSON."""
    from unittest import mock

    from nova import context as nova_context
    from nova import objects
    from nova.compute import power_state
    from nova.network import model as network_model
    from nova.virt import virtapi
    from nova.virt.libvirt import driver as libvirt_driver
    from oslo_utils import importutils

    from snapworker import events

    with open(spec_path) as f:
        spec = json.load(f)
    objects.register_all()
    driver = importutils.import_class(_DRIVERS[spec['driver']])(
        virtapi.VirtAPI(), read_only=False)
    instance = objects.Instance(
        id=1, uuid=spec['instance_uuid'], project_id=spec['project_id'],
        user_id=spec['user_id'], image_ref=str(uuid.uuid4()),
        kernel_id='', ramdisk_id='', os_type='linux', root_gb=1,
        system_metadata={}, numa_topology=None, ephemeral_key_uuid=None,
        info_cache=objects.InstanceInfoCache(
            network_info=network_model.NetworkInfo()),
        pci_devices=objects.PciDeviceList(objects=[]),
        pci_requests=objects.InstancePCIRequests(requests=[]))
    context = nova_context.RequestContext(
        user_id=spec['user_id'], project_id=spec['project_id'],
        roles=['admin', 'member', 'reader'], auth_token='unused',
        is_admin=True)
    timeline = []

    def guest_state():
        try:
            guest = driver._host.get_guest(instance)
        except Exception:
            return 'no domain'
        return power_state.STATE_MAP[guest.get_power_state(driver._host)]

    def record(what, **extra):
        timeline.append(dict(what=what, state=guest_state(),
                             t=time.monotonic(), **extra))

    def recording(name):
        real = getattr(driver, name)

        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            record(name)
            return result
        return call

    def update_task_state(task_state, expected_state=None):
        record('task_state', task_state=task_state,
               expected_state=expected_state)

    real_wait = events.Subscription.wait

    def wait(self, timeout):
        event = real_wait(self, timeout)
        if event is not None:
            record('event', event_type=event.event_type,
                   payload={k: event.payload.get(k) for k in _PAYLOAD_KEYS})
        return event

    patches = [
        mock.patch.object(driver, name, recording(name))
        for name in ('_suspend_guest_for_snapshot',
                     '_resume_guest_after_snapshot')]
    patches.append(mock.patch.object(events.Subscription, 'wait', wait))
    if spec.get('live'):
        # QEMU's version check is what makes Nova choose a live snapshot;
        # the test driver is not QEMU.
        patches.append(mock.patch.object(driver._host, 'has_min_version',
                                         return_value=True))
        patches.append(mock.patch.object(
            libvirt_driver.LibvirtDriver, 'snapshot', autospec=True,
            side_effect=lambda *a, **k: record('LibvirtDriver.snapshot')))
    result = {'error': None}
    for patch in patches:
        patch.start()
    record('begin')
    started = time.monotonic()
    try:
        driver.snapshot(context, instance, spec['image_id'],
                        update_task_state)
    except Exception as e:
        result['error'] = {'type': type(e).__name__, 'message': str(e),
                           'traceback': traceback.format_exc()}
    result['seconds'] = round(time.monotonic() - started, 3)
    record('end')
    result['timeline'] = timeline
    # The light client: nova-compute never loads the worker's options.
    result['snapworker_modules'] = sorted(
        m for m in sys.modules if m.split('.')[0] == 'snapworker')
    with open(spec['result_path'], 'w') as f:
        json.dump(result, f, indent=1)
