"""snapworker-worker: the snapshot worker of one compute host."""

import sys

from oslo_log import log as logging
from oslo_service import service

from snapworker import journal
from snapworker import service as worker_service
from snapworker.conf import CONF

LOG = logging.getLogger(__name__)


def main(argv=None):
    logging.register_options(CONF)
    # The endpoint only queues a job and returns; one dispatch thread is
    # plenty and keeps requests in arrival order (with oslo.messaging's
    # default pool of 64, two casts can reach the queue swapped).
    CONF.set_default('executor_thread_pool_size', 1)
    CONF(sys.argv[1:] if argv is None else argv, project='snapworker')
    logging.setup(CONF, 'snapworker')
    # Checked before the service process is forked: a worker that cannot
    # journal must not run, and oslo.service would respawn a child that
    # fails in start() forever while the service looks alive.
    try:
        journal.Journal(CONF.worker.journal_dir).prepare()
    except OSError as e:
        LOG.critical('[worker] journal_dir %s is unusable (%s): a worker '
                     'that cannot journal its snapshots could leave '
                     'resources behind after a crash; not starting.',
                     CONF.worker.journal_dir, e)
        sys.stderr.write(f'snapworker-worker: [worker] journal_dir '
                         f'{CONF.worker.journal_dir} is unusable: {e}\n')
        return 2
    launcher = service.launch(CONF, worker_service.WorkerService(CONF),
                              restart_method='mutate')
    launcher.wait()


if __name__ == '__main__':
    sys.exit(main())
