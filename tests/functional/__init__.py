"""Functional tests: the worker against real services.

Laid out like the package where a test proves one module's capability
(``nova/`` the driver, ``sources/`` the block, RBD, reflink and
direct-write sources and plans, ``streams/`` the readers, ``cmd/`` the
commands, ``test_rpcapi``, ``test_hostio``). Scenarios that cross every
module (hostile input, outcomes under faults, crash recovery, broker
outage, the store policy) and the one-machine OpenStack (``cloud/``) are
at this level, beside the tests of the test services themselves
(``test_services``, ``test_ceph_service``). The services come from
``tests/services``, started once per run.
"""
