"""Benchmark of the exact-attention layer on CPU (naive, SDPA, tiled, auto).

The code lives in :mod:`attnkit.bench.exact`; this script and ``attnkit bench`` run it::

    python benchmarks/bench_exact.py --out benchmarks/results
    python benchmarks/bench_exact.py --blocks --out benchmarks/results
"""

import sys

from attnkit.bench.exact import main

if __name__ == "__main__":
    sys.exit(main())
