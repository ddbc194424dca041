"""Console scripts.

oslo.service's backend must be chosen before anything imports
``oslo_service.service`` (oslo.messaging does), so it happens here, when
the package of every console script is imported.
"""

import warnings

from oslo_service import backend

# eventlet is still a dependency of oslo.service; the worker never uses it.
warnings.filterwarnings('ignore', message=r'(?s).*Eventlet is deprecated')
backend.init_backend(backend.BackendType.THREADING)
