"""Databases on the machine's MariaDB for the test services.

Glance's sqlite database fails concurrent writers: oslo.db begins every
transaction with a plain (deferred) ``BEGIN`` and opens a connection per
session, so when a request and one of Glance's own background tasks (the
v2.17 location import) write at once, one of them gets "database is
locked" at once and the request an HTTP 500. Services shared by the whole
test run therefore keep their data in MariaDB, like a real deployment.

MariaDB itself is a machine service (127.0.0.1:3306, as root through the
local socket): installed by tools/setup-env and started here when nothing
answers. Each database gets a user of its own, reachable over TCP.
"""

import os
import shutil
import subprocess

from tests import services

HOST = "127.0.0.1"
PORT = 3306


def run_sql(sql):
    """Run statements as MariaDB's root through the local socket."""
    proc = subprocess.run(["mysql", "-u", "root", "-e", sql],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise services.ServiceError("mysql failed: %s" % proc.stderr.strip())


def ensure_running():
    """MariaDB answers on 127.0.0.1:3306: started (and installed) if not."""
    if services.port_open(HOST, PORT):
        return
    if not shutil.which("mariadbd"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q",
                        "--no-install-recommends", "mariadb-server"],
                       check=True, env=env, capture_output=True)
    subprocess.run(["/etc/init.d/mariadb", "start"], check=True,
                   capture_output=True)
    services.wait_until(lambda: services.port_open(HOST, PORT), 60,
                        "MariaDB on 3306", "/var/log/mysql/error.log")


def create_database(name, password):
    """A new, empty database ``name`` and its user ``name``; its URL.

    Anything of the same name (a killed run's) is dropped first.
    """
    ensure_running()
    run_sql(f"DROP DATABASE IF EXISTS {name}; "
            f"DROP USER IF EXISTS '{name}'@'{HOST}'; "
            f"CREATE DATABASE {name} CHARACTER SET utf8mb4; "
            f"CREATE USER '{name}'@'{HOST}' IDENTIFIED BY '{password}'; "
            f"GRANT ALL ON {name}.* TO '{name}'@'{HOST}'")
    return "mysql+pymysql://%s:%s@%s:%d/%s?charset=utf8" % (
        name, password, HOST, PORT, name)


def drop_database(name):
    """Drop database ``name`` and its user; gone already is fine."""
    run_sql(f"DROP DATABASE IF EXISTS {name}; "
            f"DROP USER IF EXISTS '{name}'@'{HOST}'")
