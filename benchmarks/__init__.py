"""Benchmarks of the federated jobs: speed, memory, communication and scale, measured and reported.

Run ``python benchmarks/run.py --mode quick --out-dir benchmarks/results/quick`` (see ``benchmarks/README.md``). The
code is split by what it measures:

- :mod:`benchmarks.system`: the machine, library versions and a process-tree memory sampler;
- :mod:`benchmarks.simlog`: round timelines from the controller's round events and the sites' events;
- :mod:`benchmarks.federated`: simulator runs, the same work without NVFlare, communication, scale;
- :mod:`benchmarks.compute`: training throughput and full-size inference;
- :mod:`benchmarks.report`: ``results.json``, ``report.md`` and the PNG plots;
- :mod:`benchmarks.main`: settings of each mode and the command line.
"""

from __future__ import annotations
