"""Benchmarks of the federated jobs: speed, memory, communication and scale, measured and reported.

Run ``python benchmarks/run.py --mode quick --out-dir benchmarks/results/quick`` (see ``benchmarks/README.md``). The
code is split by what it measures:

- :mod:`fedbrats.benchmarks.system`: the machine, library versions and a process-tree memory sampler;
- :mod:`fedbrats.benchmarks.simlog`: round timelines from the controller's round events and the sites' log lines;
- :mod:`fedbrats.benchmarks.federated`: simulator runs, the same work without NVFlare, communication, scale;
- :mod:`fedbrats.benchmarks.compute`: training throughput and full-size inference;
- :mod:`fedbrats.benchmarks.report`: ``results.json``, ``report.md`` and the PNG plots;
- :mod:`fedbrats.benchmarks.main`: settings of each mode and the command line.
"""

from __future__ import annotations
