"""The ``attnkit`` command line: ``attnkit methods``, ``attnkit bench``, ``attnkit eval``."""

from __future__ import annotations

import argparse
import json
import sys

_SHORT_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}

_FLAGS = [
    ("exact", "exact"),
    ("causal", "causal"),
    ("causal_with_mask", "causal+mask"),
    ("dropout", "dropout"),
    ("gqa", "GQA"),
    ("double_backward", "2nd-order"),
    ("returns_weights", "weights"),
    ("deterministic", "determ."),
]


def _methods_table() -> str:
    import attnkit

    rows = []
    header = ["method", "available", "devices", "dtypes", "masks"] + [label for _, label in _FLAGS]
    for name, caps in attnkit.methods().items():
        d = caps.as_dict()
        rows.append(
            [
                name,
                "yes" if caps.available else f"no: {caps.unavailable_reason}",
                ",".join(d["devices"]),
                ",".join(_SHORT_DTYPES[t] for t in d["dtypes"]),
                (",".join(d["mask_kinds"]) or "-") + ("" if d["full_masks"] else " (key padding only)"),
            ]
            + ["yes" if d[key] else "no" for key, _ in _FLAGS]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_methods(args: argparse.Namespace) -> int:
    import attnkit

    if args.json:
        print(json.dumps({name: caps.as_dict() for name, caps in attnkit.methods().items()}, indent=2))
    else:
        print(_methods_table())
        print("\nUse a method with attnkit.attention(..., method=NAME) or NAME:key=value,... ; "
              "\"auto\" picks the fastest exact one that serves the call.")
    return 0


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from attnkit.bench.main import main as bench_main

    return bench_main(rest)


def _cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from attnkit.eval.main import main as eval_main

    return eval_main(rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnkit", description="Attention for long sequences.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_methods = sub.add_parser("methods", help="list every method and what it supports")
    p_methods.add_argument("--json", action="store_true", help="print the capabilities as JSON")
    sub.add_parser("bench", help="benchmark the methods (attnkit bench --help for options)", add_help=False)
    sub.add_parser("eval", help="perplexity and sentiment of pretrained models with each method "
                                "(attnkit eval --help for options)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "methods":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _cmd_methods(args)
    return _cmd_eval(args, rest) if args.command == "eval" else _cmd_bench(args, rest)


if __name__ == "__main__":
    sys.exit(main())
