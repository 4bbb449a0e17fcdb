#!/usr/bin/env bash
# PoC federation on this machine, in one command: prepare, start server and sites, run a job, download the global
# model, stop, check that nothing is left running. All options: poc_setup/run_poc.sh --help
# The code is deploy/poc.py of this checkout; set PYTHON to the interpreter of the environment fedbrats is installed in.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m deploy.poc "$@"
