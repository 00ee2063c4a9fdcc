"""Decode speed only (the last table of bench_cache.py, without its hours of perplexity runs).

    python benchmarks/decode_speed.py [--context 4096] [--rounds 2] [--caches full q4-minmax-s4 q2-minmax-s4]

Each round runs every cache once, interleaved (bench_cache.decode_speed: a prefill of
``--context`` tokens of Pride & Prejudice, then 32 greedy decode steps); prints each
round's tokens/s, the best of the rounds against the full-precision cache's best (the
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
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--caches", nargs="+", default=["full", "q4-minmax-s4", "q2-minmax-s4"])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = data.load_smollm2()
    ids = bc.tokens_of(tok, data.austen_novels()["Pride & Prejudice"], args.context, start=20_000)
    runs: dict[str, list[float]] = {name: [] for name in args.caches}
    for r in range(args.rounds):
        for name in args.caches:
            bc.use(model, name)
            runs[name].append(bc.decode_speed(model, ids, bc.make_cache(name, model.config, {}), args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in runs.items()), flush=True)
    full = runs.get("full", [1.0] * args.rounds)
    for name, v in runs.items():
        print(f"{name}: best {max(v):.2f} tok/s ({max(v) / max(full):.3f}x of the best full); each round against "
              "that round's full: " + ", ".join(f"{x / f:.3f}x" for x, f in zip(v, full)))


if __name__ == "__main__":
    main()
