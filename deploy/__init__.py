"""Multi-site deployment on this machine: NVFlare PoC mode and production startup kits, outside the package.

Run from a checkout's root (``python -m deploy.poc``, ``python -m deploy.distributed``, ``python -m deploy.provision``
or ``poc_setup/run_poc.sh``);
these modules import :mod:`fedbrats`, which never imports them. One concept per module:

* :mod:`deploy.processes`: the ``nvflare`` command, ports, starting kits, finding and stopping what a run started;
* :mod:`deploy.project`: the project file (``poc_setup/project.yml``) and its loopback variants;
* :mod:`deploy.kits`: provisioning, each site's local configuration, the class allow-list, staged jobs;
* :mod:`deploy.secrets`: private workspaces and key files;
* :mod:`deploy.admin`: the admin session that submits, follows and downloads a job;
* :mod:`deploy.follow`: a job's progress from the controller's round events and the server's log errors;
* :mod:`deploy.deployment`: a whole run (prepare, start, run a job, stop, check, report);
* :mod:`deploy.cli`: the options and the run shared by the commands;
* :mod:`deploy.poc`: ``python -m deploy.poc`` prepares, starts, runs a job in and stops a PoC federation;
* :mod:`deploy.provision`: ``python -m deploy.provision`` rehearses a production deployment on loopback;
* :mod:`deploy.distributed`: distributed provisioning (each participant makes its own key, ``nvflare cert`` and
  ``nvflare package``), and ``python -m deploy.distributed`` rehearses it with a job run without BYOC.
"""

from __future__ import annotations
