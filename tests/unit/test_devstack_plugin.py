"""The devstack plugin, run by bash with stand-ins for devstack's functions.

Each phase is sourced the way stack.sh, unstack.sh and clean.sh source it
(``source plugin.sh stack post-config``). The stand-ins log their calls,
and ``iniset``/``iniget`` edit real ini files, so the tests check the
configuration the plugin leaves behind: the snapworker.conf the worker
reads and the nova.conf nova-compute reads.
"""

import configparser
import os
import shutil
import subprocess
import tempfile

import testtools

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PLUGIN = os.path.join(ROOT, 'devstack', 'plugin.sh')
SETTINGS = os.path.join(ROOT, 'devstack', 'settings')

# devstack's functions, as far as the plugin uses them. iniset/iniget go
# through configparser: real files in, real files out.
STANDINS = r'''
log() { echo "$*" >>"$CALLS"; }
_ini() { python3 - "$@" <<'PY'
import configparser, sys
op, path, section, key = sys.argv[1:5]
cp = configparser.RawConfigParser(strict=False)
cp.optionxform = str
cp.read(path)
if op == 'get':
    if cp.has_section(section) or section == 'DEFAULT':
        print(cp.get(section, key, fallback=''))
    sys.exit(0)
if section != 'DEFAULT' and not cp.has_section(section):
    cp.add_section(section)
cp.set(section, key, sys.argv[5])
with open(path, 'w') as f:
    cp.write(f)
PY
}
iniset() { log iniset "$@"; _ini set "$@"; }
iniget() { _ini get "$@"; }
enable_service() { ENABLED_SERVICES+=",$1"; }
is_service_enabled() { [[ ,$ENABLED_SERVICES, == *,$1,* ]]; }
setup_develop() { log setup_develop "$@"; }
get_python_exec_prefix() { echo "$FAKE_BIN"; }
get_transport_url() { echo rabbit://stackrabbit:secret@10.0.0.1:5672/; }
get_notification_url() { echo rabbit://stackrabbit:secret@10.0.0.1:5672/; }
run_process() { log run_process "$@"; }
stop_process() { log stop_process "$@"; }
echo_summary() { :; }
sudo() { "$@"; }
'''


class DevstackPluginTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix='snapworker-devstack-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.calls = os.path.join(self.tmp, 'calls')
        self.nova_conf = os.path.join(self.tmp, 'nova.conf')
        self.conf_dir = os.path.join(self.tmp, 'etc-snapworker')
        self.fake_bin = os.path.join(self.tmp, 'bin')
        os.makedirs(self.fake_bin)
        for command in ('snapworker-nova-driver', 'snapworker-worker'):
            path = os.path.join(self.fake_bin, command)
            with open(path, 'w') as f:
                f.write(f'#!/bin/sh\necho {command} "$@" >>"$CALLS"\n')
            os.chmod(path, 0o755)
        self.write_nova_conf()

    def write_nova_conf(self, **sections):
        conf = {
            'DEFAULT': {'compute_driver': 'libvirt.LibvirtDriver',
                        'host': 'compute-1'},
            'libvirt': {'virt_type': 'qemu'},
            'service_user': {'send_service_user_token': 'True',
                             'auth_type': 'password',
                             'username': 'nova', 'password': 'secret'},
        }
        for section, values in sections.items():
            conf.setdefault(section, {}).update(values)
        cp = configparser.RawConfigParser()
        cp.read_dict(conf)
        with open(self.nova_conf, 'w') as f:
            cp.write(f)

    def run_plugin(self, *phases, enabled=True):
        """Source settings, then plugin.sh once per phase, like devstack."""
        script = STANDINS + f'source {SETTINGS}\n'
        if not enabled:
            script += 'ENABLED_SERVICES=n-cpu\n'
        for phase in phases:
            script += f'source {PLUGIN} {phase}\n'
        env = dict(
            os.environ, CALLS=self.calls, FAKE_BIN=self.fake_bin,
            DEST=os.path.dirname(ROOT), SNAPWORKER_DIR=ROOT,
            SNAPWORKER_CONF_DIR=self.conf_dir,
            DATA_DIR=os.path.join(self.tmp, 'data'),
            NOVA_CONF=self.nova_conf,
            NOVA_INSTANCES_PATH='/opt/stack/data/nova/instances',
            STACK_USER=os.environ.get('USER') or 'root',
            ENABLE_DEBUG_LOG_LEVEL='True', REGION_NAME='RegionOne',
            GLANCE_URL='http://10.0.0.1/image', ENABLED_SERVICES='n-cpu')
        proc = subprocess.run(['bash', '-euo', 'pipefail', '-c', script],
                              env=env, capture_output=True, text=True)
        self.assertEqual(0, proc.returncode, proc.stderr)
        if not os.path.exists(self.calls):
            return []
        with open(self.calls) as f:
            return f.read().splitlines()

    def read_ini(self, path):
        cp = configparser.RawConfigParser(strict=False)
        cp.read(path)
        return cp

    def test_install_develops_with_nova_extra_and_installs_stub(self):
        calls = self.run_plugin('stack install')

        self.assertEqual([f'setup_develop {ROOT} nova',
                          'snapworker-nova-driver install'], calls)

    def test_post_config_writes_worker_conf_matching_nova(self):
        self.run_plugin('stack post-config')

        conf = self.read_ini(os.path.join(self.conf_dir, 'snapworker.conf'))
        self.assertEqual('compute-1', conf.get('DEFAULT', 'host'))
        self.assertEqual('/opt/stack/data/nova/instances',
                         conf.get('DEFAULT', 'instances_path'))
        self.assertEqual('qemu:///system', conf.get('DEFAULT', 'libvirt_uri'))
        self.assertEqual('nova', conf.get('DEFAULT', 'control_exchange'))
        self.assertEqual('rabbit://stackrabbit:secret@10.0.0.1:5672/',
                         conf.get('DEFAULT', 'transport_url'))
        self.assertEqual('messagingv2',
                         conf.get('oslo_messaging_notifications', 'driver'))
        self.assertEqual('http://10.0.0.1/image',
                         conf.get('glance', 'endpoint_override'))
        self.assertEqual('nova', conf.get('service_user', 'username'))
        self.assertEqual('True',
                         conf.get('service_user', 'send_service_user_token'))
        self.assertFalse(conf.has_section('rbd') and
                         conf.has_option('rbd', 'user'))
        self.assertTrue(os.path.isdir(os.path.join(
            self.tmp, 'data', 'snapworker', 'scratch')))
        journal = os.path.join(self.tmp, 'data', 'snapworker', 'journal')
        self.assertEqual(journal, conf.get('worker', 'journal_dir'))
        self.assertTrue(os.path.isdir(journal))
        nova = self.read_ini(self.nova_conf)
        self.assertEqual('snapworker.SnapworkerLibvirtDriver',
                         nova.get('DEFAULT', 'compute_driver'))
        self.assertEqual('120', nova.get('snapworker', 'accept_timeout'))
        self.assertEqual('120', conf.get('worker', 'max_request_age'))

    def test_post_config_follows_nova_rbd_and_libvirt_uri(self):
        self.write_nova_conf(libvirt={
            'images_type': 'rbd', 'rbd_user': 'cinder',
            'images_rbd_ceph_conf': '/etc/ceph/other.conf',
            'connection_uri': 'qemu+tcp://localhost/system'})

        self.run_plugin('stack post-config')

        conf = self.read_ini(os.path.join(self.conf_dir, 'snapworker.conf'))
        self.assertEqual('cinder', conf.get('rbd', 'user'))
        self.assertEqual('/etc/ceph/other.conf', conf.get('rbd', 'ceph_conf'))
        self.assertEqual('qemu+tcp://localhost/system',
                         conf.get('DEFAULT', 'libvirt_uri'))

    def test_post_config_allows_only_novas_volume_group(self):
        self.write_nova_conf(libvirt={'images_type': 'lvm',
                                      'images_volume_group': 'stack-vg'})
        self.run_plugin('stack post-config')
        conf = self.read_ini(os.path.join(self.conf_dir, 'snapworker.conf'))
        self.assertEqual('/dev/stack-vg/',
                         conf.get('worker', 'block_device_prefixes'))

    def test_extra_runs_worker_and_unstack_stops_it(self):
        calls = self.run_plugin('stack extra', 'unstack')

        conf = os.path.join(self.conf_dir, 'snapworker.conf')
        self.assertEqual(
            [f'run_process snapworker-worker {self.fake_bin}/'
             f'snapworker-worker --config-file {conf}',
             'stop_process snapworker-worker'], calls)

    def test_clean_removes_config_and_stub(self):
        self.run_plugin('stack post-config')

        calls = self.run_plugin('clean')

        self.assertEqual('snapworker-nova-driver remove', calls[-1])
        self.assertFalse(os.path.exists(self.conf_dir))

    def test_disabled_service_does_nothing(self):
        calls = self.run_plugin('stack install', 'stack post-config',
                                'stack extra', enabled=False)

        self.assertEqual([], calls)
        self.assertFalse(os.path.exists(self.conf_dir))

    def test_shellcheck_clean(self):
        if not shutil.which('shellcheck'):
            self.skipTest('shellcheck is not installed')
        proc = subprocess.run(['shellcheck', '-x', PLUGIN, SETTINGS],
                              capture_output=True, text=True)
        self.assertEqual(0, proc.returncode, proc.stdout)
