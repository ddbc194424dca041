"""Sphinx configuration of snapworker's documentation.

Build (warnings are errors, as in CI)::

    sphinx-build -W --keep-going -b html doc/source doc/build/html

The theme is Sphinx's own alabaster: it needs no git checkout (the pages
build from a tarball too) and fetches nothing at build or view time;
openstackdocstheme would add pbr/git lookups and links to
docs.openstack.org assets for no content of ours.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '_exts'))

# The pages show the console scripts' docstrings: choose oslo.service's
# backend as those scripts do, before anything imports oslo_service.service
# (oslo.messaging does), or importing snapworker.cmd fails.
import snapworker.cmd  # noqa: E402,F401

project = 'snapworker'
copyright = 'snapworker developers'
author = 'snapworker developers'

extensions = [
    'oslo_config.sphinxext',
    'snapworker_sphinx',
]

# The reference pages render option help as reST: keep it strict.
nitpicky = False
exclude_patterns = ['_build']
html_theme = 'alabaster'
html_theme_options = {
    'description': 'Cold snapshots for Nova, offloaded',
    'show_relbars': True,
}
html_static_path = []
templates_path = []
