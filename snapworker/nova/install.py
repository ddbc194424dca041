"""snapworker-nova-driver: make the driver loadable as a Nova compute driver.

Nova imports ``[DEFAULT] compute_driver`` as ``nova.virt.<value>``, so an
out-of-tree driver needs a module inside Nova's own ``nova/virt/`` package.
This command writes (or removes) ``nova/virt/snapworker.py``, one line
re-exporting ``SnapworkerLibvirtDriver``, into the Nova that the running
Python imports::

    snapworker-nova-driver install   # then compute_driver =
                                     #   snapworker.SnapworkerLibvirtDriver
    snapworker-nova-driver remove
    snapworker-nova-driver show      # where the module is, if installed

Why a command rather than shipping the file with the package: pbr's
``data_files`` install relative to the installation prefix, not to
site-packages, so the path would depend on the Python version and install
scheme, break in editable installs and wheels, and could write into a
different Nova than the one nova-compute runs. Asking Python where
``nova.virt`` is gets the right directory in every case (virtualenv,
distribution packages, devstack's global install). The file is not in
Nova's RECORD: upgrading or reinstalling Nova keeps it, uninstalling Nova
leaves it behind (``remove`` first).
"""

import argparse
import importlib.util
import os
import sys

MODULE_NAME = 'snapworker.py'

STUB = '''\
"""compute_driver = snapworker.SnapworkerLibvirtDriver loads this.

Written by ``snapworker-nova-driver install``; removed by its ``remove``.
"""

from snapworker.nova.driver import SnapworkerLibvirtDriver  # noqa: F401
'''


def stub_path():
    """``nova/virt/snapworker.py`` of the Nova this Python imports."""
    spec = importlib.util.find_spec('nova.virt')
    if spec is None:
        raise SystemExit('Nova is not installed for ' + sys.executable)
    return os.path.join(spec.submodule_search_locations[0], MODULE_NAME)


def install(path):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(STUB)
    os.replace(tmp, path)


def remove(path):
    if os.path.exists(path):
        os.unlink(path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='snapworker-nova-driver',
        description='Install the nova.virt module that lets nova-compute '
                    'load SnapworkerLibvirtDriver.')
    parser.add_argument('action', choices=('install', 'remove', 'show'))
    args = parser.parse_args(argv)
    path = stub_path()
    if args.action == 'install':
        install(path)
    elif args.action == 'remove':
        remove(path)
    elif not os.path.exists(path):
        return 1
    print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
