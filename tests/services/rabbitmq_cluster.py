"""A private three-node RabbitMQ cluster on loopback, for broker outages.

The machine's broker (``rabbitmq.py``) is shared and never stopped; the
tests that stop a broker node under a live subscription need nodes of
their own. Each node here has its own node name, AMQP and distribution
ports, mnesia and log directories, and the three share an Erlang cookie
and an epmd of their own (its own port), so nothing touches the machine's
broker. Every listener is bound to 127.0.0.1.

The nodes boot in parallel as standalone brokers; then the second and
third join the first (``rabbitmqctl join_cluster``), again in parallel.
``start()`` returns a handle whose ``to_dict()`` survives as JSON and
whose nodes can be stopped and started again one by one.
"""

import concurrent.futures
import json
import os
import shutil
import subprocess
import uuid

from tests import services

RABBITMQ_BIN = '/usr/lib/rabbitmq/bin'
NODES = 3
START_TIMEOUT = 90


def _node_env(state_dir, node):
    """The environment of a node's server and of rabbitmqctl for it."""
    home = os.path.join(state_dir, 'home')
    return dict(
        os.environ,
        HOME=home,  # .erlang.cookie, shared by the nodes and rabbitmqctl
        RABBITMQ_NODENAME=node['name'],
        RABBITMQ_NODE_IP_ADDRESS='127.0.0.1',
        RABBITMQ_NODE_PORT=str(node['port']),
        RABBITMQ_DIST_PORT=str(node['dist_port']),
        ERL_EPMD_ADDRESS='127.0.0.1',
        ERL_EPMD_PORT=str(node['epmd_port']),
        RABBITMQ_CONF_ENV_FILE=os.path.join(state_dir, 'rabbitmq-env.conf'),
        RABBITMQ_CONFIG_FILE=os.path.join(node['dir'], 'rabbitmq.conf'),
        RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(node['dir'],
                                                   'advanced.config'),
        RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(node['dir'],
                                                   'enabled_plugins'),
        RABBITMQ_MNESIA_BASE=os.path.join(node['dir'], 'mnesia'),
        RABBITMQ_LOG_BASE=os.path.join(node['dir'], 'log'),
        RABBITMQ_PID_FILE=os.path.join(node['dir'], 'pid'),
        # The distribution listens on loopback only, like AMQP.
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
            '-kernel inet_dist_use_interface {127,0,0,1}'),
    )


def _ctl(state_dir, node, *args, timeout=180):
    """rabbitmqctl on one node. The bound is generous: each call boots an
    Erlang VM, and with the cloud starting beside it on a loaded 2-core
    machine a stop_app was seen to need more than 60 s."""
    proc = subprocess.run(
        [os.path.join(RABBITMQ_BIN, 'rabbitmqctl'), '-n', node['name'],
         *args], env=_node_env(state_dir, node), capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise services.ServiceError('rabbitmqctl %s on %s exited %d:\n%s%s'
                                    % (' '.join(args), node['name'],
                                       proc.returncode, proc.stdout,
                                       proc.stderr))
    return proc.stdout


class RabbitCluster:
    """Handle of the cluster: its nodes and how to stop or start each."""

    def __init__(self, state_dir, nodes, epmd_port):
        self.state_dir = state_dir
        self.nodes = nodes
        self.epmd_port = epmd_port

    @property
    def ports(self):
        return [node['port'] for node in self.nodes]

    def transport_url(self, order=None):
        """``rabbit://`` URL of the nodes (indexes ``order``), in order."""
        order = range(len(self.nodes)) if order is None else order
        hosts = ','.join('guest:guest@127.0.0.1:%d' % self.nodes[i]['port']
                         for i in order)
        return 'rabbit://%s/' % hosts

    def node_up(self, index):
        return services.port_open('127.0.0.1', self.nodes[index]['port'])

    def start_node(self, index):
        """Boot node ``index`` (its cluster membership is kept on disk)."""
        node = self.nodes[index]
        log_path = os.path.join(node['dir'], 'server.log')
        proc = services.spawn(
            [os.path.join(RABBITMQ_BIN, 'rabbitmq-server')], log_path,
            env=_node_env(self.state_dir, node))
        node['pid'] = proc.pid
        services.wait_until(lambda: self.node_up(index), START_TIMEOUT,
                            'RabbitMQ node %s' % node['name'], log_path,
                            proc=proc, interval=0.2)

    def stop_node(self, index, timeout=30):
        """Stop node ``index`` and return once it is gone.

        Found by the pid file the node writes, so that a node restarted
        through another handle (a test restarting what an earlier one
        stopped) is stopped too; the pid recorded at start is the
        fallback.
        """
        node = self.nodes[index]
        pid_file = os.path.join(node['dir'], 'pid')
        pgid = node.get('pid')
        try:
            with open(pid_file) as f:
                pgid = os.getpgid(int(f.read().strip()))
        except (OSError, ValueError):
            pass
        if pgid:
            services.stop_group(pgid, timeout=timeout)
        node['pid'] = None
        if os.path.exists(pid_file):
            os.unlink(pid_file)

    def stop(self):
        for index in range(len(self.nodes)):
            self.stop_node(index)
        # The nodes' own epmd outlives them; it is this cluster's only.
        subprocess.run(['epmd', '-port', str(self.epmd_port), '-kill'],
                       env=dict(os.environ, ERL_EPMD_ADDRESS='127.0.0.1'),
                       capture_output=True, timeout=30)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def to_dict(self):
        return {'state_dir': self.state_dir, 'nodes': self.nodes,
                'epmd_port': self.epmd_port}

    @classmethod
    def from_dict(cls, d):
        return cls(d['state_dir'], d['nodes'], d['epmd_port'])


def stop_from_dict(d):
    RabbitCluster.from_dict(d).stop()


def start(state_dir, nodes=NODES):
    """Boot ``nodes`` nodes in parallel and cluster them; return a handle.

    Failures stop whatever did start before they propagate.
    """
    os.makedirs(os.path.join(state_dir, 'home'), exist_ok=True)
    with open(os.path.join(state_dir, 'rabbitmq-env.conf'), 'w'):
        pass  # not /etc/rabbitmq/rabbitmq-env.conf, the machine broker's
    cookie = os.path.join(state_dir, 'home', '.erlang.cookie')
    with open(os.open(cookie, os.O_WRONLY | os.O_CREAT, 0o400), 'w') as f:
        f.write(uuid.uuid4().hex)
    suffix = uuid.uuid4().hex[:6]
    epmd_port = services.free_port()
    specs = []
    for i in range(nodes):
        node_dir = os.path.join(state_dir, 'node%d' % i)
        os.makedirs(node_dir)
        port = services.free_port()
        specs.append({'name': 'snapw%s-%d@localhost' % (suffix, i),
                      'port': port, 'dist_port': services.free_port(),
                      'epmd_port': epmd_port, 'dir': node_dir, 'pid': None})
        with open(os.path.join(node_dir, 'rabbitmq.conf'), 'w') as f:
            f.write('listeners.tcp.local = 127.0.0.1:%d\n'
                    'loopback_users = none\n'
                    'log.file.level = warning\n' % port)
        with open(os.path.join(node_dir, 'enabled_plugins'), 'w') as f:
            f.write('[].\n')
    cluster = RabbitCluster(state_dir, specs, epmd_port)
    try:
        with concurrent.futures.ThreadPoolExecutor(nodes) as pool:
            for future in [pool.submit(cluster.start_node, i)
                           for i in range(nodes)]:
                future.result()
            first = specs[0]['name']
            for future in [pool.submit(_join, state_dir, node, first)
                           for node in specs[1:]]:
                future.result()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _join(state_dir, node, first):
    _ctl(state_dir, node, 'stop_app')
    _ctl(state_dir, node, 'join_cluster', first)
    _ctl(state_dir, node, 'start_app')


def running_nodes(cluster, index=0):
    """Names of the running cluster members, as node ``index`` sees them."""
    out = _ctl(cluster.state_dir, cluster.nodes[index], 'cluster_status',
               '--formatter', 'json')
    return sorted(json.loads(out)['running_nodes'])

