"""Benchmarks of the federated jobs: ``python benchmarks/run.py --mode quick|full --out-dir benchmarks/results/<mode>``.

A thin entry point; the code is :mod:`fedbrats.benchmarks` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import sys

from fedbrats.benchmarks.main import main

if __name__ == "__main__":
    sys.exit(main())
