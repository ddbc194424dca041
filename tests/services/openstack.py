"""A one-machine OpenStack with snapworker inside, for tests and the demo.

Keystone (fernet), Glance (keystonemiddleware authtoken), Placement,
Neutron (neutron-server alone: no agents), Nova's API, conductor,
scheduler and one nova-compute on the root libvirtd (``qemu:///system``,
real QEMU, KVM when /dev/kvm is there) with ``compute_driver =
snapworker.SnapworkerLibvirtDriver``, and a ``snapworker-worker``
configured by devstack/plugin.sh itself (sourced with stand-ins for
devstack's functions), so the configuration under test is the one the
plugin writes.

Nova's own driver, for comparisons, is the same nova-compute restarted
with ``compute_driver = libvirt.LibvirtDriver`` (use_driver()): a second
nova-compute on the same libvirt would report the same hypervisor host
name, and Placement refuses a second resource provider of that name.

Everything runs from one PyPI venv (tools/setup-env --with-cloud builds
.venv-cloud, pinned by tools/cloud-constraints.txt) and Debian's QEMU and
libvirt. MariaDB and RabbitMQ are machine services: started if nothing
answers, never stopped; the cloud has its own databases (``snapcloud_*``)
and vhost (``snapcloud``), dropped on stop. The root libvirtd and virtlogd
are stopped only if this module started them.

Numbers chosen for this 2-core machine (see shared notes
openstack-cloud.md): one process per API, one conductor and scheduler
worker, ``shutdown_timeout = 0`` (an OS-less guest ignores ACPI) and a
token lifetime of TOKEN_LIFETIME seconds: short enough that a test can
outlive a user's token, long enough above keystoneauth's 120 s re-auth
margin that a CLI command does not re-authenticate on every request.
"""

import concurrent.futures
import configparser
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import textwrap
import time
import urllib.error
import urllib.request

from tests import services
from tests.services import glance as glance_service
from tests.services import libvirtd as libvirtd_service
from tests.services import mariadb
from tests.services import worker as worker_service

VENV = os.environ.get("CLOUD_VENV",
                      os.path.join(services.REPO_ROOT, ".venv-cloud"))
BIN = os.path.join(VENV, "bin")

PREFIX = "snapcloud"
DB_USER = PREFIX
DB_PASSWORD = "snapcloud-db"
DATABASES = ("keystone", "glance", "placement", "nova_api", "nova",
             "nova_cell0", "neutron")
VHOST = PREFIX
REGION = "RegionOne"
COMPUTE_HOST = "snapcloud-compute"
DRIVERS = {"snapworker": "snapworker.SnapworkerLibvirtDriver",
           "native": "libvirt.LibvirtDriver"}
#: nova-compute logs this once its RPC server listens.
COMPUTE_READY_LINE = "Join ServiceGroup membership for this service compute"
FLAVOR = "snapcloud.tiny"
#: Seconds a Keystone token lives: the token tests wait this long. Not
#: less: keystoneauth re-authenticates once under 120 s are left, so a
#: client's first 10 s (most CLI commands whole) go without re-auth.
TOKEN_LIFETIME = 130
#: nova.conf [snapworker] accept_timeout, via the plugin's setting.
ACCEPT_TIMEOUT = 30
SERVICE_PASSWORD = "snapcloud-service"
ADMIN_PASSWORD = "snapcloud-admin"
MEMBER = {"user": "demo", "password": "snapcloud-demo", "project": "demo"}
SERVICE_USERS = ("nova", "glance", "placement", "neutron")
LIBVIRT_URI = "qemu:///system"
#: One cloud per machine: its databases, vhost and guest names and the
#: root libvirtd are machine-wide. This file names the running one.
LOCK_PATH = "/run/snapcloud.lock"
_KVM_GET_API_VERSION = 0xAE00

# WSGI apps, each under its own uWSGI; the extra flags Glance needs are
# the test Glance's own.
_APIS = {
    "keystone": ("keystone.wsgi.api:application", ()),
    "glance": (None, glance_service._UWSGI_FLAGS),
    "placement": ("placement.wsgi.api:application", ()),
    "nova-api": ("nova.wsgi.osapi_compute:application", ()),
    "neutron": ("neutron.wsgi.api:application", ()),
}
# Stop order: the worker and the users of the APIs first.
_PROCESSES = ("worker", "nova-compute", "nova-scheduler",
              "nova-conductor", "nova-api", "neutron", "placement",
              "glance", "keystone")


@dataclasses.dataclass
class CloudService:
    """A running cloud. ``pid_dir`` holds one pid file per process, so a
    test that restarts a process (the worker, a nova-compute) leaves a
    handle that still stops the new one."""

    state_dir: str
    urls: dict
    transport_url: str
    clouds_yaml: str
    nova_conf: str
    compute_conf: str
    worker_conf: str
    worker_log: str
    instances_path: str
    virt_type: str
    started_libvirtd: bool
    kvm_mode: list = None

    def to_dict(self):
        """Return a JSON-serialisable description, for stop_from_dict()."""
        return dataclasses.asdict(self)

    def stop(self):
        stop_from_dict(self.to_dict())


# -- processes

def _pid_path(state_dir, name):
    return os.path.join(state_dir, "pids", name)


def pid_of(d, name):
    """The pid (= process group) of one of the cloud's processes, or None."""
    try:
        with open(_pid_path(d["state_dir"], name)) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _spawn(state_dir, name, argv, env=None):
    log_path = os.path.join(state_dir, "logs", name + ".log")
    proc = services.spawn(argv, log_path, env=env or _environ(state_dir),
                          cwd=state_dir)
    with open(_pid_path(state_dir, name), "w") as f:
        f.write(str(proc.pid))
    return proc, log_path


def stop_process(d, name, timeout=20):
    """Stop one process of the cloud (its whole group) and forget it."""
    pid = pid_of(d, name)
    if pid is not None:
        services.stop_group(pid, timeout)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_pid_path(d["state_dir"], name))


def _environ(state_dir):
    """The environment of every cloud process.

    The ``OS_*_CONFIG_DIR`` variables must be in the real environment:
    pyuwsgi's ``--env`` is invisible to os.environ, and Keystone then
    silently falls back to a sqlite database in its cwd.
    """
    env = dict(os.environ)
    for project in ("keystone", "glance", "placement", "nova", "neutron"):
        env["OS_%s_CONFIG_DIR" % project.upper()] = os.path.join(
            state_dir, project)
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    for key in [k for k in env if k.startswith(("OS_CLOUD", "OS_AUTH"))]:
        del env[key]
    env.pop("CEPH_ARGS", None)
    return env


def _run(state_dir, name, *argv, timeout=300):
    """Run a set-up command to its end, logging to logs/<name>.log."""
    log_path = os.path.join(state_dir, "logs", name + ".log")
    with open(log_path, "ab") as log:
        rc = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, cwd=state_dir,
                             env=_environ(state_dir), timeout=timeout)
    if rc != 0:
        raise services.ServiceError("%s exited %d; log %s:\n%s" % (
            " ".join(argv), rc, log_path, services.log_tail(log_path)))


# -- configuration

def _write_ini(path, sections):
    """Write {section: {key: value}} as an ini file (DEFAULT first)."""
    cp = configparser.RawConfigParser()
    cp.optionxform = str
    for section, values in sections.items():
        if section != "DEFAULT":
            cp.add_section(section)
        for key, value in values.items():
            cp.set(section, key, str(value))
    with open(path, "w") as f:
        cp.write(f)


def _db_url(name):
    return "mysql+pymysql://%s:%s@127.0.0.1/%s_%s?charset=utf8" % (
        DB_USER, DB_PASSWORD, PREFIX, name)


def _service_auth(urls, user):
    """A keystoneauth password section for a service user."""
    return {"auth_type": "password", "auth_url": urls["identity"],
            "username": user, "password": SERVICE_PASSWORD,
            "user_domain_name": "Default", "project_name": "service",
            "project_domain_name": "Default", "region_name": REGION}


def _authtoken(urls, user):
    return dict(_service_auth(urls, user),
                www_authenticate_uri=urls["identity"],
                service_token_roles_required=True)


def _write_configs(sd, urls, transport_url, virt_type):
    """Every project's config under sd/<project>/."""
    for project in ("keystone", "glance", "placement", "nova", "neutron"):
        os.makedirs(os.path.join(sd, project), exist_ok=True)
    log = {"use_stderr": True, "debug": True}
    _write_ini(os.path.join(sd, "keystone", "keystone.conf"), {
        "DEFAULT": log,
        "database": {"connection": _db_url("keystone")},
        "token": {"provider": "fernet", "expiration": TOKEN_LIFETIME},
        "fernet_tokens": {"key_repository": sd + "/keystone/fernet-keys"},
        "credential": {"key_repository": sd + "/keystone/credential-keys"},
        # bcrypt's default 12 rounds cost ~0.3 s per authentication.
        "identity": {"password_hash_rounds": 4},
    })
    for sub in ("images", "staging", "tasks", "locks"):
        os.makedirs(os.path.join(sd, "glance", sub), exist_ok=True)
    _write_ini(os.path.join(sd, "glance", "glance-api.conf"), {
        "DEFAULT": dict(log, enabled_backends="local:file",
                        worker_self_reference_url=urls["image"]),
        "database": {"connection": _db_url("glance")},
        "glance_store": {"default_backend": "local"},
        "local": {"filesystem_store_datadir": sd + "/glance/images/"},
        "os_glance_staging_store": {
            "filesystem_store_datadir": sd + "/glance/staging/"},
        "os_glance_tasks_store": {
            "filesystem_store_datadir": sd + "/glance/tasks/"},
        "oslo_concurrency": {"lock_path": sd + "/glance/locks"},
        "keystone_authtoken": _authtoken(urls, "glance"),
        "paste_deploy": {
            "flavor": "keystone",
            "config_file": VENV + "/etc/glance/glance-api-paste.ini"},
    })
    _write_ini(os.path.join(sd, "placement", "placement.conf"), {
        "DEFAULT": log,
        "placement_database": {"connection": _db_url("placement")},
        "api": {"auth_strategy": "keystone"},
        "keystone_authtoken": _authtoken(urls, "placement"),
    })
    _write_ini(os.path.join(sd, "neutron", "neutron.conf"), {
        "DEFAULT": dict(
            log, core_plugin="ml2", service_plugins="",
            auth_strategy="keystone", transport_url=transport_url,
            notify_nova_on_port_status_changes=False,
            notify_nova_on_port_data_changes=False,
            api_paste_config=VENV + "/etc/neutron/api-paste.ini"),
        "database": {"connection": _db_url("neutron")},
        "keystone_authtoken": _authtoken(urls, "neutron"),
        "oslo_concurrency": {"lock_path": sd + "/neutron/locks"},
    })
    # neutron-server's WSGI app insists on this file beside neutron.conf.
    os.makedirs(os.path.join(sd, "neutron", "plugins", "ml2"), exist_ok=True)
    _write_ini(os.path.join(sd, "neutron", "plugins", "ml2", "ml2_conf.ini"), {
        # No agents: no network type a port could bind to is needed.
        "ml2": {"type_drivers": "flat", "tenant_network_types": "",
                "mechanism_drivers": ""},
    })
    nova_conf = os.path.join(sd, "nova", "nova.conf")
    instances = os.path.join(sd, "instances")
    for path in (instances, sd + "/nova/state"):
        os.makedirs(path, exist_ok=True)
    _write_ini(nova_conf, {
        "DEFAULT": dict(
            log, transport_url=transport_url, host=COMPUTE_HOST,
            my_ip="127.0.0.1", state_path=sd + "/nova/state",
            instances_path=instances,
            compute_driver="libvirt.LibvirtDriver",
            heal_instance_info_cache_interval=-1,
            # An OS-less guest ignores ACPI: stop at once, not after 60 s.
            shutdown_timeout=0, graceful_shutdown_timeout=10,
            osapi_compute_workers=1, metadata_workers=1),
        "api_database": {"connection": _db_url("nova_api")},
        "database": {"connection": _db_url("nova")},
        "api": {"auth_strategy": "keystone"},
        "conductor": {"workers": 1},
        "scheduler": {"workers": 1, "discover_hosts_in_cells_interval": -1},
        "libvirt": {"virt_type": virt_type, "connection_uri": LIBVIRT_URI,
                    # host-passthrough fails under nested KVM (MSR 0x10a).
                    "cpu_mode": "none"},
        # Cold snapshots of running guests too: the path snapworker takes.
        "workarounds": {"disable_libvirt_livesnapshot": True},
        "vnc": {"enabled": False},
        "glance": {"region_name": REGION},
        "placement": _service_auth(urls, "placement"),
        "neutron": _service_auth(urls, "neutron"),
        "service_user": dict(_service_auth(urls, "nova"),
                             send_service_user_token=True),
        "keystone_authtoken": _authtoken(urls, "nova"),
        "notifications": {"notification_format": "both"},
        "oslo_messaging_notifications": {"driver": "messagingv2",
                                         "transport_url": transport_url},
        "oslo_concurrency": {"lock_path": sd + "/nova/locks"},
        # Default "sudo privsep-helper" is not on sudo's PATH.
        "nova_sys_admin": {"helper_command": "%s/privsep-helper "
                           "--config-file %s" % (BIN, nova_conf)},
    })
    # nova-api's WSGI app reads api-paste.ini from OS_NOVA_CONFIG_DIR.
    shutil.copy(VENV + "/etc/nova/api-paste.ini", sd + "/nova/")
    return nova_conf, instances


# The plugin's configure logic, run with devstack's functions replaced:
# the ini stand-ins of the plugin's unit test, then what differs here.
_PLUGIN_STANDINS = textwrap.dedent("""\
    setup_develop() { log setup_develop "$@"; }
    get_python_exec_prefix() { echo "$CLOUD_BIN"; }
    get_transport_url() { echo "$CLOUD_TRANSPORT_URL"; }
    get_notification_url() { echo "$CLOUD_TRANSPORT_URL"; }
    """)


def _run_devstack_plugin(sd, nova_conf, urls, transport_url):
    """Install and configure snapworker the way devstack/plugin.sh does.

    Phases ``stack install`` (the driver's stub module into this Nova;
    the package itself is in the venv already) and ``stack post-config``
    (snapworker.conf from nova.conf, compute_driver in nova.conf).
    Returns the worker's config path.
    """
    from tests.unit import test_devstack_plugin as plugin_test
    conf_dir = os.path.join(sd, "snapworker")
    script = (plugin_test.STANDINS + _PLUGIN_STANDINS
              + "source %s\n" % plugin_test.SETTINGS
              + "source %s stack install\n" % plugin_test.PLUGIN
              + "source %s stack post-config\n" % plugin_test.PLUGIN)
    env = dict(
        _environ(sd), CALLS=os.path.join(sd, "logs", "devstack-calls.log"),
        CLOUD_BIN=BIN, CLOUD_TRANSPORT_URL=transport_url,
        DEST=os.path.dirname(services.REPO_ROOT),
        SNAPWORKER_DIR=services.REPO_ROOT, SNAPWORKER_CONF_DIR=conf_dir,
        DATA_DIR=os.path.join(sd, "data"), NOVA_CONF=nova_conf,
        NOVA_INSTANCES_PATH=os.path.join(sd, "instances"),
        STACK_USER="root", ENABLE_DEBUG_LOG_LEVEL="True",
        REGION_NAME=REGION, GLANCE_URL=urls["image"],
        SNAPWORKER_ACCEPT_TIMEOUT=str(ACCEPT_TIMEOUT),
        ENABLED_SERVICES="n-cpu")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise services.ServiceError("devstack plugin failed:\n%s%s" % (
            proc.stdout, proc.stderr))
    return os.path.join(conf_dir, "snapworker.conf")


# -- machine services

def _apt_install(*packages):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q",
                    "--no-install-recommends", *packages],
                   check=True, env=env, capture_output=True)


def _create_databases():
    """Fresh snapcloud_* databases (a killed run may have left some)."""
    sql = ["CREATE USER IF NOT EXISTS '%s'@'127.0.0.1' IDENTIFIED BY '%s'"
           % (DB_USER, DB_PASSWORD)]
    for name in DATABASES:
        sql += ["DROP DATABASE IF EXISTS %s_%s" % (PREFIX, name),
                "CREATE DATABASE %s_%s CHARACTER SET utf8mb4" % (PREFIX, name),
                "GRANT ALL ON %s_%s.* TO '%s'@'127.0.0.1'"
                % (PREFIX, name, DB_USER)]
    mariadb.run_sql("; ".join(sql))


def _drop_databases():
    mariadb.run_sql(
        "; ".join("DROP DATABASE IF EXISTS %s_%s" % (PREFIX, name)
                  for name in DATABASES)
        + "; DROP USER IF EXISTS '%s'@'127.0.0.1'" % DB_USER)


def _rabbitmqctl(*args, check=True):
    return subprocess.run(["rabbitmqctl", "-q", *args], check=check,
                          capture_output=True, text=True)


def _create_vhost(base_url):
    """A vhost of the cloud's own on the shared broker; its URL."""
    _rabbitmqctl("delete_vhost", VHOST, check=False)
    _rabbitmqctl("add_vhost", VHOST)
    _rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    return base_url.rstrip("/") + "/" + VHOST


def _ensure_libvirtd():
    """The root libvirtd with real QEMU: (started here, /dev/kvm's mode).

    /dev/kvm ships root:root 0600 here and QEMU (user libvirt-qemu, group
    kvm) fails on it; the mode found is returned to be put back, or None
    when KVM is not used (no usable /dev/kvm, or SNAPWORKER_CLOUD_VIRT_TYPE
    =qemu): guests then run under QEMU's software emulation (TCG).
    """
    if not os.path.exists("/usr/bin/qemu-system-x86_64"):
        _apt_install("qemu-system-x86", "libvirt-daemon-system")
    kvm_mode = None
    if os.environ.get("SNAPWORKER_CLOUD_VIRT_TYPE", "kvm") == "kvm" and (
            _kvm_usable()):
        st = os.stat("/dev/kvm")
        kvm_mode = [stat.S_IMODE(st.st_mode), st.st_gid]
        shutil.chown("/dev/kvm", group="kvm")
        os.chmod("/dev/kvm", 0o660)
    if _libvirt_answers():
        return False, kvm_mode
    for daemon in ("virtlogd", "libvirtd"):
        subprocess.run([daemon, "-d"], check=True)
    services.wait_until(_libvirt_answers, 30, "root libvirtd",
                        "/var/log/libvirt/libvirtd.log")
    return True, kvm_mode


def _kvm_usable():
    """/dev/kvm opens and answers KVM's API version (12): a device node
    alone (e.g. in a container without the module) is not enough."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


def _libvirt_answers():
    return subprocess.run(["virsh", "-c", LIBVIRT_URI, "version"],
                          capture_output=True).returncode == 0


def _remove_guests():
    """Destroy and undefine every instance-* domain (ours: Nova's names)."""
    names = subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, "list", "--all", "--name"],
        capture_output=True, text=True).stdout.split()
    for name in names:
        if name.startswith("instance-"):
            subprocess.run(["virsh", "-c", LIBVIRT_URI, "destroy", name],
                           capture_output=True)
            subprocess.run(["virsh", "-c", LIBVIRT_URI, "undefine",
                            "--managed-save", name], capture_output=True)
            log = "/var/log/libvirt/qemu/%s.log" % name
            if os.path.exists(log):
                os.unlink(log)


# -- REST

def request(method, url, token=None, body=None, headers=None, timeout=30):
    """One JSON request; returns (status, headers, body): the decoded JSON,
    text if the answer is not JSON, None if empty."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Auth-Token", token)
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, resp_headers, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        status, resp_headers, raw = exc.code, exc.headers, exc.read()
    if "json" not in (resp_headers.get("Content-Type") or ""):
        # Glance answers some errors (404) in plain text.
        return status, resp_headers, raw.decode(errors="replace") or None
    return status, resp_headers, json.loads(raw) if raw.strip() else None


def _expect(method, url, token=None, body=None, headers=None):
    status, _, result = request(method, url, token, body, headers)
    if status >= 400:
        raise services.ServiceError("%s %s: %d %s" % (method, url, status,
                                                      result))
    return result


def get_token(identity_url, user, password, project, domain="Default"):
    """A project-scoped token (the body's ``token`` and the id)."""
    status, headers, body = request("POST", identity_url + "/auth/tokens",
                                    body={"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"name": domain},
            "password": password}}},
        "scope": {"project": {"name": project,
                              "domain": {"name": domain}}}}})
    if status != 201:
        raise services.ServiceError("token for %s: %d %s" % (user, status,
                                                              body))
    return headers["X-Subject-Token"], body["token"]


def admin_token(d):
    return get_token(d["urls"]["identity"], "admin", ADMIN_PASSWORD,
                     "admin")[0]


def token_valid(d, token):
    """Whether Keystone still accepts token (an expired one is 404)."""
    status = request("GET", d["urls"]["identity"] + "/auth/tokens",
                     admin_token(d), headers={"X-Subject-Token": token})[0]
    return status == 200


def _make_catalog(urls):
    """Projects, users, roles, services and endpoints, straight via REST
    (an openstack CLI call costs ~2 s; this is ~30 requests)."""
    ks = urls["identity"]
    token = get_token(ks, "admin", ADMIN_PASSWORD, "admin")[0]

    def create(kind, **fields):
        return _expect("POST", "%s/%ss" % (ks, kind), token,
                       {kind: fields})[kind]["id"]

    roles = {r["name"]: r["id"] for r in
             _expect("GET", ks + "/roles", token)["roles"]}
    if "service" not in roles:  # bootstrap makes it in newer Keystones
        roles["service"] = create("role", name="service")
    projects = {name: create("project", name=name, domain_id="default")
                for name in ("service", MEMBER["project"])}

    def grant(project, user, role):
        _expect("PUT", "%s/projects/%s/users/%s/roles/%s" % (
            ks, projects[project], user, roles[role]), token)

    for name in SERVICE_USERS:
        user = create("user", name=name, password=SERVICE_PASSWORD,
                      domain_id="default")
        grant("service", user, "admin")
        grant("service", user, "service")
    member = create("user", name=MEMBER["user"],
                    password=MEMBER["password"], domain_id="default")
    grant(MEMBER["project"], member, "member")
    for kind, name, url in (("image", "glance", urls["image"]),
                            ("placement", "placement", urls["placement"]),
                            ("compute", "nova", urls["compute"]),
                            ("network", "neutron", urls["network"])):
        service = create("service", type=kind, name=name)
        for interface in ("public", "internal"):
            create("endpoint", service_id=service, interface=interface,
                   url=url, region_id=REGION)


# -- start and stop

def _api_argv(name, port):
    module, flags = _APIS[name]
    argv = [BIN + "/uwsgi", "--master", "--need-app", "--lazy-apps",
            "--processes", "1", "--threads", "2", "--die-on-term",
            "--http-socket", "127.0.0.1:%d" % port]
    if module:
        argv += ["--module", module, "--add-header", "Connection: close"]
    return argv + list(flags)


def _answers(url):
    """Any HTTP answer below 500 from the API's root."""
    try:
        status = request("GET", url, timeout=2)[0]
    except OSError:
        return False
    return status < 500


def _start_api(sd, name, port, url):
    proc, log_path = _spawn(sd, name, _api_argv(name, port))
    services.wait_until(lambda: _answers(url), 90, name, log_path, proc,
                        interval=0.2)


def _db_syncs(sd, nova_conf):
    """Every schema, in parallel (each is seconds of mostly waiting)."""
    nova = [BIN + "/nova-manage", "--config-file", nova_conf]
    jobs = {
        "glance-manage": [[BIN + "/glance-manage", "--config-file",
                           sd + "/glance/glance-api.conf", "db_sync"]],
        "placement-manage": [[BIN + "/placement-manage", "--config-file",
                              sd + "/placement/placement.conf", "db",
                              "sync"]],
        "neutron-db-manage": [[BIN + "/neutron-db-manage", "--config-file",
                               sd + "/neutron/neutron.conf", "--config-file",
                               sd + "/neutron/plugins/ml2/ml2_conf.ini",
                               "upgrade", "heads"]],
        "nova-manage": [
            nova + ["api_db", "sync"],
            nova + ["cell_v2", "map_cell0", "--database_connection",
                    _db_url("nova_cell0")],
            nova + ["cell_v2", "create_cell", "--name", "cell1"],
            nova + ["db", "sync"]],
    }

    def run_all(name, commands):
        for argv in commands:
            _run(sd, name, *argv)

    _parallel({name: (run_all, name, cmds) for name, cmds in jobs.items()})


def _parallel(jobs):
    """Run {name: (func, *args)} at once; re-raise the first failure."""
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(*job) for job in jobs.values()]
    for future in futures:
        future.result()


def start(state_dir, base_transport_url):
    """Bring the whole cloud up under state_dir; return a CloudService.

    One cloud per machine: while another runs, this waits for it to stop
    (``_lock``). On failure everything started so far is stopped again.
    """
    if not os.path.exists(BIN + "/nova-compute"):
        raise services.ServiceError("no OpenStack in %s: run "
                                    "tools/setup-env --with-cloud" % VENV)
    sd = os.path.abspath(state_dir)
    for sub in ("pids", "logs", "data"):
        os.makedirs(os.path.join(sd, sub), exist_ok=True)
    _lock(sd)
    try:
        return _start(sd, base_transport_url)
    except BaseException:
        _unlock(sd)
        raise


def _start(sd, base_transport_url):
    """start() once the machine is this cloud's."""
    # QEMU runs as libvirt-qemu and must reach the instances folder: the
    # caller's folder (a private temporary one, often) too.
    libvirtd_service._make_traversable(os.path.dirname(sd))
    libvirtd_service._make_traversable(sd)
    ports = {name: services.free_port() for name in _APIS}
    base = "http://127.0.0.1:%d"
    urls = {"identity": base % ports["keystone"] + "/v3",
            "image": base % ports["glance"],
            "placement": base % ports["placement"],
            "compute": base % ports["nova-api"] + "/v2.1",
            "network": base % ports["neutron"]}
    mariadb.ensure_running()
    _create_databases()
    transport_url = _create_vhost(base_transport_url)
    started_libvirtd, kvm_mode = _ensure_libvirtd()
    virt_type = "kvm" if kvm_mode is not None else "qemu"
    nova_conf, instances = _write_configs(
        sd, urls, transport_url, virt_type)
    svc = CloudService(
        state_dir=sd, urls=urls, transport_url=transport_url,
        clouds_yaml=_write_clouds_yaml(sd, urls["identity"]),
        nova_conf=nova_conf, compute_conf="", worker_conf="",
        worker_log=os.path.join(sd, "logs", "worker.log"),
        instances_path=instances, virt_type=virt_type,
        started_libvirtd=started_libvirtd, kvm_mode=kvm_mode)
    # Written now: a failure below must still stop what did start.
    _save(svc)
    try:
        _bring_up(svc, ports)
    except BaseException:
        stop_from_dict(svc.to_dict())
        raise
    return svc


def _lock(sd, timeout=1800, interval=5):
    """Make this the machine's only cloud, waiting for another to stop.

    Another cloud would drop this one's databases and destroy its guests
    (two test runs, or a run and tools/run-cloud-demo). The lock must
    outlive the starting process (``tests.services up`` exits, the cloud
    stays), so it is a file naming its owner; one whose starter and
    processes are all gone (a killed run's) is taken over.
    """
    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        try:
            fd = os.open(LOCK_PATH, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o644)
        except FileExistsError:
            owner = _lock_owner()
            if owner is not None and not _owner_alive(owner):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(LOCK_PATH)
                continue
            if time.monotonic() > deadline:
                raise services.ServiceError(
                    "another one-machine cloud runs (%s): stop it first"
                    % (owner or LOCK_PATH)) from None
            if not waiting:
                waiting = True
                print("  waiting for another cloud to stop: %s" % owner,
                      flush=True)
            time.sleep(interval)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"state_dir": sd, "pid": os.getpid()}, f)
        return


def _lock_owner():
    """The lock's content, None when it cannot be read (just made)."""
    try:
        with open(LOCK_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _owner_alive(owner):
    """The starter of the owning cloud, or one of its processes, lives."""
    pids = [owner.get("pid")]
    pid_dir = os.path.join(owner.get("state_dir", "/nonexistent"), "pids")
    with contextlib.suppress(OSError):
        pids += [pid_of({"state_dir": owner["state_dir"]}, name)
                 for name in os.listdir(pid_dir)]
    return any(pid is not None and (_alive(pid)
                                    or services._group_members(pid))
               for pid in pids)


def _alive(pid):
    """pid is a live (not zombie) process."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, TypeError):
        return False


def _unlock(sd):
    """Remove the lock if it is this cloud's."""
    owner = _lock_owner()
    if owner is not None and owner.get("state_dir") == sd:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(LOCK_PATH)


def _save(svc):
    with open(os.path.join(svc.state_dir, "cloud.json"), "w") as f:
        json.dump(svc.to_dict(), f, indent=2)


def _bring_up(svc, ports):
    sd, urls = svc.state_dir, svc.urls
    # Keystone and its catalog while the other schemas are made.
    _timed("db+keystone", _parallel, {
        "keystone": (_start_keystone, sd, ports["keystone"], urls),
        "schemas": (_db_syncs, sd, svc.nova_conf)})
    svc.worker_conf = _run_devstack_plugin(sd, svc.nova_conf, urls,
                                           svc.transport_url)
    svc.compute_conf = _write_compute_conf(svc.nova_conf)
    _save(svc)
    _timed("apis", _parallel, {
        name: (_start_api, sd, name, ports[name], urls[key])
        for name, key in (("glance", "image"), ("placement", "placement"),
                          ("nova-api", "compute"), ("neutron", "network"))})
    _warm_up_neutron(urls)
    for name in ("nova-conductor", "nova-scheduler"):
        _spawn(sd, name, [BIN + "/" + name, "--config-file",
                          svc.nova_conf])
    _timed("compute+worker", _parallel, {
        "compute": (start_compute, svc.to_dict()),
        "worker": (start_worker, svc.to_dict())})
    _timed("cell mapping", _wait_for_compute, svc)
    _make_flavor(svc)


def _start_keystone(sd, port, urls):
    """Schema, keys, bootstrap, the API, then the catalog: services check
    their users when they start."""
    ks = [BIN + "/keystone-manage", "--config-file",
          sd + "/keystone/keystone.conf"]
    for args in (["db_sync"],
                 ["fernet_setup", "--keystone-user", "root",
                  "--keystone-group", "root"],
                 ["credential_setup", "--keystone-user", "root",
                  "--keystone-group", "root"],
                 ["bootstrap", "--bootstrap-password", ADMIN_PASSWORD,
                  "--bootstrap-admin-url", urls["identity"],
                  "--bootstrap-public-url", urls["identity"],
                  "--bootstrap-internal-url", urls["identity"],
                  "--bootstrap-region-id", REGION]):
        _run(sd, "keystone-setup", *ks, *args)
    _start_api(sd, "keystone", port, urls["identity"])
    _make_catalog(urls)


def _timed(name, func, *args):
    t0 = time.monotonic()
    result = func(*args)
    print("  %-12s %.1f s" % (name, time.monotonic() - t0), flush=True)
    return result


def _warm_up_neutron(urls):
    """Neutron 29: a worker's first GET /v2.0/ports fails 500 (Port has no
    attribute port_forwardings) until it served a GET /v2.0/networks."""
    token = get_token(urls["identity"], "admin", ADMIN_PASSWORD, "admin")[0]
    _expect("GET", urls["network"] + "/v2.0/networks", token)
    _expect("GET", urls["network"] + "/v2.0/ports", token)


def _write_compute_conf(nova_conf):
    """nova-cpu.conf: nova.conf as the plugin left it, without database
    access (nova-compute has none; devstack copies nova.conf likewise)."""
    cp = configparser.RawConfigParser(strict=False)
    cp.optionxform = str
    cp.read(nova_conf)
    for section in ("database", "api_database"):
        cp.remove_section(section)
    path = os.path.join(os.path.dirname(nova_conf), "nova-cpu.conf")
    with open(path, "w") as f:
        cp.write(f)
    return path


def start_compute(d, driver="snapworker", timeout=120):
    """Start nova-compute with one of DRIVERS; return once it listens.

    The driver goes in a config file read after nova-cpu.conf, so the
    plugin's own choice stays untouched in nova.conf.
    """
    driver_conf = os.path.join(d["state_dir"], "nova", "driver.conf")
    _write_ini(driver_conf, {"DEFAULT": {"compute_driver": DRIVERS[driver]}})
    log_path = os.path.join(d["state_dir"], "logs", "nova-compute.log")
    offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    proc, _ = _spawn(d["state_dir"], "nova-compute", [
        BIN + "/nova-compute", "--config-file", d["compute_conf"],
        "--config-file", driver_conf])

    def ready():
        with open(log_path, errors="replace") as f:
            f.seek(offset)
            return COMPUTE_READY_LINE in f.read()

    services.wait_until(ready, timeout, "nova-compute", log_path, proc,
                        interval=0.2)


def use_driver(d, driver):
    """Restart nova-compute with another driver (a key of DRIVERS)."""
    stop_process(d, "nova-compute")
    start_compute(d, driver)


def start_worker(d, conf_path=None, timeout=60):
    """Start snapworker-worker (the plugin's config unless conf_path)."""
    log_start = (os.path.getsize(d["worker_log"])
                 if os.path.exists(d["worker_log"]) else 0)
    proc, log_path = _spawn(d["state_dir"], "worker", [
        BIN + "/snapworker-worker", "--config-file",
        conf_path or d["worker_conf"]])

    def ready():
        with open(log_path, errors="replace") as f:
            f.seek(log_start)
            return worker_service.READY_LINE in f.read()

    services.wait_until(ready, timeout, "snapworker-worker", log_path, proc,
                        interval=0.1)
    return proc


def compute_services(d, token=None):
    """Nova's os-services list (binary, host, state, status, id)."""
    return _expect("GET", d["urls"]["compute"] + "/os-services",
                   token or admin_token(d),
                   headers={"OpenStack-API-Version": "compute 2.53"}
                   )["services"]


def _wait_for_compute(svc, timeout=120):
    """nova-compute up in the API and mapped to cell1."""
    d = svc.to_dict()
    token = admin_token(d)
    log_path = os.path.join(svc.state_dir, "logs", "nova-compute.log")
    services.wait_until(
        lambda: any(s["binary"] == "nova-compute" and s["state"] == "up"
                    for s in compute_services(d, token)),
        timeout, "nova-compute up", log_path, interval=1)
    _run(svc.state_dir, "nova-manage", BIN + "/nova-manage", "--config-file",
         svc.nova_conf, "cell_v2", "discover_hosts")


def _make_flavor(svc):
    _expect("POST", svc.urls["compute"] + "/flavors", admin_token(
        svc.to_dict()), {"flavor": {"name": FLAVOR, "ram": 128, "vcpus": 1,
                                    "disk": 1}})


def _write_clouds_yaml(sd, identity_url):
    """clouds.yaml for the CLI: ``snapcloud`` (the member) and
    ``snapcloud-admin``. JSON is YAML."""
    def cloud(user, password, project):
        return {"auth": {"auth_url": identity_url, "username": user,
                         "password": password, "project_name": project,
                         "user_domain_name": "Default",
                         "project_domain_name": "Default"},
                "region_name": REGION, "identity_api_version": 3}
    path = os.path.join(sd, "clouds.yaml")
    with open(path, "w") as f:
        json.dump({"clouds": {
            PREFIX: cloud(MEMBER["user"], MEMBER["password"],
                          MEMBER["project"]),
            PREFIX + "-admin": cloud("admin", ADMIN_PASSWORD, "admin"),
        }}, f, indent=2)
    return path


def stop_from_dict(d):
    """Stop everything start() started, from its to_dict().

    Goes on after a failure so one stuck process leaves nothing else
    running; raises ServiceError naming what failed at the end.
    """
    failures = []
    for name in _PROCESSES:
        try:
            stop_process(d, name)
        except Exception as exc:
            failures.append("%s: %s" % (name, exc))
    steps = [_remove_guests, _drop_databases,
             lambda: _rabbitmqctl("delete_vhost", VHOST, check=False)]
    if d.get("started_libvirtd"):
        steps.append(_stop_root_libvirtd)
    if d.get("kvm_mode"):
        mode, gid = d["kvm_mode"]
        steps.append(lambda: (os.chown("/dev/kvm", -1, gid),
                              os.chmod("/dev/kvm", mode)))
    for step in steps:
        try:
            step()
        except Exception as exc:
            failures.append(str(exc))
    _unlock(d["state_dir"])
    if failures:
        raise services.ServiceError("cloud stop: %s" % "; ".join(failures))


def _stop_root_libvirtd():
    for daemon in ("libvirtd", "virtlogd"):
        try:
            with open("/run/%s.pid" % daemon) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 15
        # A daemon's exit leaves a zombie when nothing reaps orphans (a
        # container's init): gone is "no live process in its group".
        while services._group_members(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)
