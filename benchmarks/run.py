"""Benchmarks of the federated jobs: ``python benchmarks/run.py --mode quick|full --out-dir benchmarks/results/<mode>``.

A thin entry point; the code is :mod:`benchmarks` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts benchmarks/ itself first on the path; the repository root is what holds the package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
