"""Decode speed only (the last table of bench_cache.py, without its hours of perplexity runs).

    cd benchmarks && python decode_speed.py [--context 4096] [--rounds 3] [--caches full q4-minmax-s4 q2-minmax-s4]

The same runs as bench_cache.py's speed table (bench_cache.speed_rounds: every cache once
per round, interleaved, each a prefill of ``--context`` tokens of Persuasion and 32 greedy
decode steps); prints the best of the rounds against the full-precision cache's best (the
convention of cache_cpu.md's table) and each round against the same round's full cache.
"""

from __future__ import annotations

import argparse

import torch

import bench_cache as bc
from attnkit import data


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--caches", nargs="+", default=list(bc.SPEED_CACHES))
    args = p.parse_args(argv)
    if "full" not in args.caches:
        p.error("argument --caches: must include 'full', the cache the others are compared with")
    torch.manual_seed(0)
    model, tok = data.load_smollm2()
    books = data.austen_novels()
    if any("-plan" in name for name in args.caches):
        bc.fit_plans(model, tok, books)
    ids = bc.speed_ids(tok, books, args.context)
    runs = bc.speed_rounds(model, ids, args.caches, args.rounds, args.steps, {})
    full = runs["full"]
    for name, v in runs.items():
        print(f"{name}: best {max(v):.2f} tok/s ({max(v) / max(full):.3f}x of the best full); each round against "
              "that round's full: " + ", ".join(f"{x / f:.3f}x" for x, f in zip(v, full)))


if __name__ == "__main__":
    main()
