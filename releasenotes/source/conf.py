"""Sphinx configuration of snapworker's release notes (reno).

Build (reno reads the notes from git history, so from a clone)::

    sphinx-build -W --keep-going -b html releasenotes/source releasenotes/build/html

Same theme as the documentation (doc/source/conf.py): alabaster, offline.
"""

project = 'snapworker release notes'
copyright = 'snapworker developers'
author = 'snapworker developers'

extensions = ['reno.sphinxext']
exclude_patterns = ['_build']
html_theme = 'alabaster'
html_static_path = []
templates_path = []
