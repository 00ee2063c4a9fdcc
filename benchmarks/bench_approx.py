"""Benchmark of the sub-quadratic families on CPU: time, peak memory, FLOPs, scaling, error.

The code lives in :mod:`attnkit.bench.approx` (measured by the runner behind
``attnkit bench``); this script and ``attnkit bench --suite approx`` run it::

    python benchmarks/bench_approx.py --out benchmarks/results           # approx_cpu.{json,md}
    python benchmarks/bench_approx.py --errors --out benchmarks/results  # approx_errors.{json,md}
"""

import sys

from attnkit.bench.approx import main, slope, structured_qkv  # noqa: F401  (kept importable from here)

if __name__ == "__main__":
    sys.exit(main())
