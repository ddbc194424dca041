"""snapworker-status: can this host run snapworker-worker as configured?

    snapworker-status [--config-file FILE] upgrade check [--json]

The ``<service>-status upgrade check`` of every OpenStack service
(oslo.upgradecheck, as nova-status and glance-status): run it on a
compute host, as the worker's user and with the worker's configuration
files, after installing or upgrading snapworker and before (re)starting
the worker. Checks: journal directory, instances path, libvirt, Glance,
Ceph RBD, RPC version cap (snapworker/checks.py). Each ends Success,
Warning or Failure, and the details of anything but Success name the
option or the resource to fix.

Exit status (oslo.upgradecheck's): 0 every check succeeded, 1 at least
one warning, 2 at least one failure, 255 a check itself crashed.
"""

import sys

from oslo_upgradecheck import upgradecheck

from snapworker import checks
from snapworker.conf import CONF


def main(argv=None):
    return upgradecheck.main(
        CONF, project='snapworker', upgrade_command=checks.Checks(),
        argv=sys.argv[1:] if argv is None else argv)


if __name__ == '__main__':
    sys.exit(main())
