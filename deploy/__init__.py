"""Multi-site deployment: NVFlare PoC mode on one machine and production startup kits.

* :mod:`deploy.provision`: the project file (``poc_setup/project.yml``), provisioning, startup kits,
  each site's local configuration, the admin session that submits and follows a job, and the check that nothing
  is left running. ``python -m deploy.provision`` rehearses a production deployment on loopback.
* :mod:`deploy.poc`: ``python -m deploy.poc`` prepares, starts, runs a job in and stops a PoC
  federation in a private workspace.
"""

from __future__ import annotations
