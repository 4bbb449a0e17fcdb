#!/usr/bin/env bash
# PoC federation on this machine, in one command: prepare, start server and sites, run a job, download the global
# model, stop, check that nothing is left running. All options: poc_setup/run_poc.sh --help
# The code is fedbrats.deploy.poc; set PYTHON to the interpreter of the environment fedbrats is installed in.
set -euo pipefail
exec "${PYTHON:-python3}" -m fedbrats.deploy.poc "$@"
