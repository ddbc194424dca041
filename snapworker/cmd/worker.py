"""snapworker-worker: the snapshot worker of one compute host."""

import sys

from oslo_log import log as logging
from oslo_service import service

from snapworker import service as worker_service
from snapworker.conf import CONF


def main(argv=None):
    logging.register_options(CONF)
    # The endpoint only queues a job and returns; one dispatch thread is
    # plenty and keeps requests in arrival order (with oslo.messaging's
    # default pool of 64, two casts can reach the queue swapped).
    CONF.set_default('executor_thread_pool_size', 1)
    CONF(sys.argv[1:] if argv is None else argv, project='snapworker')
    logging.setup(CONF, 'snapworker')
    launcher = service.launch(CONF, worker_service.WorkerService(CONF),
                              restart_method='mutate')
    launcher.wait()


if __name__ == '__main__':
    main()
