"""The Nova side is a light client: it adds only its own options.

nova-compute imports ``snapworker.nova.driver`` into a process whose
global CONF is Nova's. The worker's options (``[DEFAULT] host`` among
them, defined differently from Nova's) must never reach it, and nothing
may be registered as a side effect of importing snapworker's modules but
what ``snapworker/nova/conf.py`` lists.

Checked in a child Python, so that the global CONF is fresh (this test
runner's already holds the worker's options).
"""

import json
import os
import subprocess
import sys
import textwrap

import testtools

from snapworker.nova import conf as nova_conf

#: Import Nova and everything the driver imports from it, take CONF's
#: inventory, import the driver, take it again.
_CHILD = textwrap.dedent("""\
    import json, sys
    from oslo_config import cfg

    def inventory():
        out = {}
        for name in cfg.CONF:
            value = cfg.CONF[name]
            out[name] = (sorted(value) if isinstance(value, cfg.CONF.GroupAttr)
                         else None)
        return out

    import nova.conf
    from nova import exception, rpc
    from nova.compute import power_state, task_states
    from nova.virt.libvirt import driver, host, utils
    before = inventory()
    import snapworker.nova.driver
    after = inventory()
    print(json.dumps({
        'before': before, 'after': after,
        'modules': sorted(m for m in sys.modules
                          if m.split('.')[0] == 'snapworker')}))
    """)


class LightClientTest(testtools.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        env = dict(os.environ, OS_NOVA_DISABLE_EVENTLET_PATCHING='1')
        proc = subprocess.run([sys.executable, '-c', _CHILD], env=env,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise AssertionError(proc.stderr[-3000:])
        cls.result = json.loads(proc.stdout.splitlines()[-1])

    def added(self):
        """{group or DEFAULT option: option names} the import added."""
        before, after = self.result['before'], self.result['after']
        added = {}
        for name, opts in after.items():
            if name not in before:
                added[name] = opts
            elif opts is not None and opts != before[name]:
                added[name] = sorted(set(opts) - set(before[name]))
        return added

    def test_only_the_nova_side_options_are_registered(self):
        expected = {str(group): sorted(opt.dest for opt in opts)
                    for group, opts in nova_conf.list_opts()}

        self.assertEqual(expected, self.added())
        self.assertEqual({'snapworker', 'upgrade_levels'}, set(expected))
        # Nova's own group, joined rather than replaced.
        self.assertIn('compute', self.result['after']['upgrade_levels'])

    def test_nothing_was_removed_or_replaced(self):
        before, after = self.result['before'], self.result['after']
        for name, opts in before.items():
            self.assertIn(name, after)
            if opts is not None:
                self.assertLessEqual(set(opts), set(after[name]), name)

    def test_no_worker_module_is_imported(self):
        modules = set(self.result['modules'])

        self.assertIn('snapworker.nova.driver', modules)
        self.assertEqual(set(), {m for m in modules
                                 if m.startswith('snapworker.conf')})
        self.assertLessEqual(modules, {
            'snapworker', 'snapworker.events', 'snapworker.notifications',
            'snapworker.rpc', 'snapworker.rpcapi', 'snapworker.nova',
            'snapworker.nova.conf', 'snapworker.nova.disks',
            'snapworker.nova.driver', 'snapworker.nova.exception',
            'snapworker.nova.waiter'})
