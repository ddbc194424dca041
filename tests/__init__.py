"""snapworker's tests: unit (no services) and functional (real services).

oslo.service's threading backend is chosen first, as every console script
does (``snapworker.cmd``): test processes then run the backend the worker
and the CLI run, and may import the CLI's modules, whatever test module
discovery imports first.
"""

from snapworker import cmd  # noqa: F401
