"""``attnkit eval``: what swapping attention costs and loses on real models and text, offline.

Subcommands::

    attnkit eval perplexity --model smollm2 --data wiki|books --context N [--method M ...] [--plan P ...]
    attnkit eval sentiment  --model minilm [--method M ...]
    attnkit eval autotune   --model smollm2 --data books --context N --max-error D [--flops-ratio R]
                            [--per-head [--weigh error|share|loss]]
                            [--table measured_plan.json] --out plan.json
    attnkit eval trainstep  --model smollm2 --context 2048

Each writes a markdown table to stdout (and ``--out-md``) and the full result as JSON
(``--out-json``), with the machine it ran on.  Models, tokenised text, fitted heads and
calibrated states are cached under ``~/.cache/attnkit`` (``$ATTNKIT_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["main"]


def _machine() -> dict:
    from ..bench.machine import machine_info

    info = machine_info("cpu")
    info["note"] = "shared machine: speed figures (tokens/s, seconds) depend on load; quality figures do not"
    return info


def _load(model: str):
    from .. import data

    if model == "smollm2":
        return data.load_smollm2()
    if model == "minilm":
        return data.load_minilm()
    raise ValueError(f"--model: expected 'smollm2' or 'minilm', got {model!r}")


def _methods(args, default: list[str]) -> dict[str, object]:
    from ..autotune import load_plan

    out: dict[str, object] = {}
    for spec in args.method or ([] if args.plan else default):
        out[spec] = spec
    for path in args.plan or []:
        out[f"plan:{Path(path).name}"] = load_plan(path)
    return out


def _calibration_batches(tokenizer, data: str, context: int, count: int):
    from .perplexity import token_ids, windows

    ids = token_ids(tokenizer, data, "calibration", max_tokens=context * (count + 1))
    return windows(ids, context, 2 * count)[::2][:count]


def _calibrated(model, tokenizer, args, methods: dict) -> dict:
    """``{label: state tensors}`` for each method with trainable state, fitted (or cached)."""
    from ..calibrate import calibrate, trainable_state
    from ..patch import patch
    from .store import cached_tensors, text_digest

    out = {}
    for label, method in list(methods.items()):
        with patch(model, method) as h:
            fittable = any(trainable_state(getattr(m, "attn_state", None)) for _, m in h.modules())
        if not fittable:
            continue
        key = {"model": args.model, "method": h.plan(), "data": args.data, "context": args.calibrate_context,
               "batches": args.calibrate_batches, "budget": args.calibrate}

        def build(method=method, label=label):
            batches = _calibration_batches(tokenizer, args.data, args.calibrate_context, args.calibrate_batches)
            cal = calibrate(model, batches, method, budget=_budget(args.calibrate))
            tensors = cal.state_dict()  # before remove(): the handle lists the patched modules
            cal.handle.remove()
            print(f"calibrated {label}: error {_mean(cal.before):.4f} -> {_mean(cal.after):.4f} "
                  f"({cal.seconds:.0f} s)", file=sys.stderr)
            if not tensors:
                raise ValueError(f"--calibrate: {label} has no fitted state")
            return tensors

        name = f"calibration-{args.model}-{text_digest(json.dumps(key, sort_keys=True))[:12]}"
        tensors, _ = cached_tensors(name, key, build)
        out[label + " +calibrated"] = (method, tensors)
    return out


def _mean(d: dict) -> float:
    return sum(d.values()) / max(1, len(d))


def _budget(text: str):
    return int(text) if text.isdigit() else text


def cmd_perplexity(args) -> dict:
    from .perplexity import default_methods, perplexity_rows, token_ids, windows

    model, tokenizer = _load(args.model)
    ids = token_ids(tokenizer, args.data, "eval", max_tokens=args.context * (args.windows + 1) // 2 + args.context)
    wins = windows(ids, args.context, args.windows)
    methods = _methods(args, default_methods(args.context))
    calibrations = {}
    if args.calibrate:
        for label, (method, tensors) in _calibrated(model, tokenizer, args, methods).items():
            methods[label] = method
            calibrations[label] = tensors
    rows = perplexity_rows(model, wins, methods, calibrations=calibrations, measure_memory=not args.no_memory)
    return {"kind": "perplexity", "model": args.model, "data": args.data, "context": args.context,
            "windows": len(wins), "rows": rows}


def cmd_sentiment(args) -> dict:
    from .. import data
    from .sentiment import SENTIMENT_METHODS, sentiment_rows

    model, tokenizer = _load(args.model)
    train, test = data.sentiment_split()
    if args.limit:
        test = test[: args.limit]
    methods = _methods(args, SENTIMENT_METHODS)
    handles = {}
    if args.calibrate:
        from ..calibrate import calibrate

        batches = [dict(tokenizer([t for t, _ in train[i : i + 64]], padding=True, return_tensors="pt"))
                   for i in range(0, 64 * args.calibrate_batches, 64)]
        for spec in args.calibrate_method or []:
            def fit(spec=spec):
                cal = calibrate(model, batches, spec, budget=_budget(args.calibrate))
                print(f"calibrated {spec}: error {_mean(cal.before):.4f} -> {_mean(cal.after):.4f}", file=sys.stderr)
                return cal.handle
            methods[spec + " +calibrated"] = spec
            handles[spec + " +calibrated"] = fit
    rows, hit = sentiment_rows(model, tokenizer, train, test, methods, model_name=args.model,
                               calibrate=lambda label, m: handles[label]() if label in handles else None)
    return {"kind": "sentiment", "model": args.model, "train": len(train), "test": len(test),
            "probe_cached": hit, "rows": rows}


def cmd_autotune(args) -> dict:
    from ..autotune import autotune, fit_flops, load_plan, save_plan, select

    t0 = time.perf_counter()
    if args.table is not None:  # re-plan from a measured table: the model does not run
        report = load_plan(args.table)
        if "table" not in report:
            raise SystemExit(f"attnkit eval autotune: argument --table: {args.table} has no measured table "
                             "(write one with attnkit eval autotune --out)")
        if report.get("seq_len") != args.context:
            raise SystemExit(f"attnkit eval autotune: argument --table: {args.table} was measured for context "
                             f"{report.get('seq_len')}, not --context {args.context}")
    else:
        from .perplexity import scored_nll

        model, tokenizer = _load(args.model)
        batches = _calibration_batches(tokenizer, args.data, args.context, args.calibrate_batches)
        report = autotune(model, batches, max_error=args.max_error, candidates=args.method or None,
                          seq_len=args.context, loss=scored_nll if args.weigh == "loss" else None)
    if args.flops_ratio:
        plan = fit_flops(report, args.flops_ratio, per_head=args.per_head, weigh=args.weigh)
    else:
        plan = select(report, args.max_error, per_head=args.per_head)
    save_plan(plan, args.out)
    return {"kind": "autotune", "model": args.model, "data": args.data, "context": args.context,
            "seconds": time.perf_counter() - t0, "plan_file": args.out, "max_error": plan["max_error"],
            "rule": plan["rule"], "flops": plan["flops"], "layers": plan["layers"]}


def cmd_trainstep(args) -> dict:
    from ..bench.memory import peak_memory_here
    from ..patch import patch
    from .perplexity import token_ids

    model, tokenizer = _load(args.model)
    ids = token_ids(tokenizer, "books", "eval", max_tokens=args.context)[None]  # (1, N)
    method = (args.method or ["auto"])[0]
    if args.method and len(args.method) > 1:
        raise ValueError(f"--method: trainstep measures one method, got {args.method}")
    model.train()
    rows = []
    for ckpt in (False, True):
        with patch(model, method, checkpoint=ckpt):
            def step():
                loss = model(ids, labels=ids).loss
                loss.backward()
                model.zero_grad(set_to_none=True)

            step()  # warm-up (allocator, lazy init)
            t0 = time.perf_counter()
            mem = peak_memory_here(step, probe="profiler")
            secs = time.perf_counter() - t0
        rows.append({"label": f"checkpoint={ckpt}", "method": method, "peak_bytes": mem.peak_bytes,
                     "seconds": secs})
    model.eval()
    return {"kind": "trainstep", "model": args.model, "context": args.context, "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    from ..autotune import WEIGHTS

    p = argparse.ArgumentParser(prog="attnkit eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("--method", action="append", help="method spec (repeatable); default: one per family")
        q.add_argument("--out-json", help="write the result as JSON here")
        q.add_argument("--out-md", help="write the markdown table here")
        q.add_argument("--threads", type=int, help="torch.set_num_threads")

    q = sub.add_parser("perplexity", help="sliding-window perplexity of a causal LM per method")
    q.add_argument("--model", default="smollm2", choices=["smollm2"])
    q.add_argument("--data", default="wiki", choices=["wiki", "books"])
    q.add_argument("--context", type=int, default=1024)
    q.add_argument("--windows", type=int, default=4, help="windows evaluated (each scores its last context/2 tokens)")
    q.add_argument("--plan", action="append", help="a plan JSON file (attnkit.autotune / save_plan); repeatable")
    q.add_argument("--calibrate", help="also evaluate each method with trainable state after attnkit.calibrate "
                   "with this budget (steps per layer, or time such as '5m'); cached")
    q.add_argument("--calibrate-context", type=int, default=1024)
    q.add_argument("--calibrate-batches", type=int, default=1)
    q.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    common(q)

    q = sub.add_parser("sentiment", help="accuracy of a linear probe on a frozen encoder per method")
    q.add_argument("--model", default="minilm", choices=["minilm"])
    q.add_argument("--plan", action="append")
    q.add_argument("--limit", type=int, help="evaluate on the first LIMIT test sentences")
    q.add_argument("--calibrate", help="budget for --calibrate-method (steps per layer or time)")
    q.add_argument("--calibrate-method", action="append", help="a method to calibrate then evaluate")
    q.add_argument("--calibrate-batches", type=int, default=4, help="batches of 64 training sentences")
    common(q)

    q = sub.add_parser("autotune", help="per-layer plan within an error budget (and optionally a FLOP budget)")
    q.add_argument("--model", default="smollm2", choices=["smollm2", "minilm"])
    q.add_argument("--data", default="books", choices=["wiki", "books"])
    q.add_argument("--context", type=int, default=4096)
    q.add_argument("--max-error", type=float, default=0.1)
    q.add_argument("--flops-ratio", type=float, help="instead: the smallest error budget saving this many x FLOPs")
    q.add_argument("--calibrate-batches", type=int, default=1)
    q.add_argument("--per-head", action="store_true",
                   help="choose per query head (a layer's heads may run different methods) instead of per layer")
    q.add_argument("--weigh", choices=WEIGHTS, default="error",
                   help="with --per-head and --flops-ratio, minimise the summed squared head errors (error), those "
                   "weighted by each head's share of its layer's output norm (share), or the head errors' estimated "
                   "squared effect on the scored tokens' loss (loss: the table is measured with one backward pass "
                   "per calibration window)")
    q.add_argument("--by-share", dest="weigh", action="store_const", const="share", help="the same as --weigh share")
    q.add_argument("--table", type=Path, help="re-plan from the measured table in this plan file (from --out) "
                   "instead of running the model")
    q.add_argument("--out", required=True, help="plan JSON file to write")
    common(q)

    q = sub.add_parser("trainstep", help="train-step peak memory and time with and without checkpoint=True")
    q.add_argument("--model", default="smollm2", choices=["smollm2"])
    q.add_argument("--context", type=int, default=2048)
    common(q)
    return p.parse_args(argv)


_COMMANDS = {"perplexity": cmd_perplexity, "sentiment": cmd_sentiment, "autotune": cmd_autotune,
             "trainstep": cmd_trainstep}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``attnkit eval`` (and ``python -m attnkit.eval``)."""
    from .report import render

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..data import MissingDataError

    try:
        result = _COMMANDS[args.command](args)
    except MissingDataError as e:
        print(f"attnkit eval: {e}", file=sys.stderr)
        return 2
    result["command"] = "attnkit eval " + " ".join(sys.argv[1:] if argv is None else argv)
    result["machine"] = _machine()
    md = render(result)
    print(md)
    if args.out_md:
        Path(args.out_md).write_text(md)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=1, default=str))
    return 0
