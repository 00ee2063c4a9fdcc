"""The 2-bit caches on more books: teacher-forced perplexity at 8192 tokens (bench_cache's
chunking and plans, fitted on Emma), full cache, uniform 2-bit with sinks, the key bit plan, and the
plan with one value channel per kv head held apart.

    cd benchmarks && python cache_books.py [--books "Mansfield Park" "Sense & Sensibility"] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import time

import bench_cache as bc
from attnkit import data


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--books", nargs="+", default=["Mansfield Park", "Sense & Sensibility"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--caches", nargs="+", default=["full", "q2-minmax-s4", "q2-minmax-s4-plan", "q2-minmax-s4-plan-v1"])
    args = p.parse_args(argv)
    model, tok = data.load_smollm2()
    books = data.austen_novels()
    plans = bc.fit_plans(model, tok, books)
    print(f"plans fitted on {plans['tokens']} tokens of {plans['book']} in " + ", ".join(
        f"{k} {t:.1f} s" for k, t in plans["seconds"].items()), flush=True)
    for book in args.books:
        ids = bc.tokens_of(tok, books[book], args.tokens, start=20_000)
        full = None
        for name in args.caches:
            bc.use(model, name)
            start = time.perf_counter()
            ppl = bc.perplexity(model, ids, bc.make_cache(name, model.config, {}), 256)
            full = ppl if name == "full" else full
            delta = f" ({100 * (ppl / full - 1):+.2f}%)" if full and name != "full" else ""
            print(f"{book} T={args.tokens} {name}: {ppl:.3f}{delta} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
