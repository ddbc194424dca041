"""The Nova side of snapworker (``pip install snapworker[nova]``).

nova-compute runs ``driver.SnapworkerLibvirtDriver``, a LibvirtDriver that
casts cold snapshots to the ``snapworker-worker`` of its host and waits
for the worker's notifications.

Installing it:

1. ``snapworker-nova-driver install`` puts a one-line module
   ``nova/virt/snapworker.py`` into the installed Nova: Nova imports
   ``compute_driver`` as ``nova.virt.<value>`` and nothing outside that
   package (see ``install.py`` for why a command and not package data).
2. nova.conf::

       [DEFAULT]
       compute_driver = snapworker.SnapworkerLibvirtDriver

   and, if the defaults do not fit, the ``[snapworker]`` options
   (``conf.py``). While the workers run an older release than
   nova-compute, cap the RPC API at theirs::

       [upgrade_levels]
       snapworker = 1.0

Nothing else of snapworker's configuration enters nova-compute: this
package, ``rpcapi`` and ``events`` never import ``snapworker.conf``.

What the worker must share with nova-compute, or requests and events
never meet:

* ``[DEFAULT] host``: nova-compute addresses the worker of
  ``CONF.host``; the worker listens under its own ``host``.
* ``[DEFAULT] transport_url`` and ``control_exchange``: the request is
  cast on nova-compute's transport and exchange (Nova's exchange is
  ``nova``; oslo.messaging's default, which the worker has unless told
  otherwise, is ``openstack``).
* ``[oslo_messaging_notifications] transport_url`` and ``topics``: the
  driver subscribes to the notification topics of nova.conf on that
  exchange, so the worker must publish its notifications there.
* ``[worker] topic`` = ``[snapworker] topic``.

For RBD root disks (``images_type = rbd``) the worker's ``[rbd]`` options
must reach Nova's cluster, and ``[rbd] glance_pool`` should name Glance's
rbd pool: the worker acts with the user's token, which cannot read
Glance's store details, and without the pool it streams instead of
cloning.

The devstack plugin writes a snapworker.conf that satisfies all of these.
"""
