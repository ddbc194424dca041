"""Unit tests: no services.

oslo.service's threading backend is chosen first, as every console script
does (``snapworker.cmd``): the unit tests then run the backend the worker
and the CLI run, and may import the CLI's modules.
"""

from snapworker import cmd  # noqa: F401
