"""KV caches on SmolLM2-135M with Jane Austen: bytes, perplexity, greedy agreement, decode speed.

Writes ``<out>/cache_cpu.json`` and ``.md``.  Everything runs offline (attnkit.data).

    python benchmarks/bench_cache.py                      # the full run (hours on 2 shared cores)
    python benchmarks/bench_cache.py --sizes 512 --prompts 2 --new-tokens 32 --speed-context 512 --out bench-out
    python benchmarks/bench_cache.py --perplexity-only q2-minmax-s4-plan-v1   # into the committed results

* bytes: ``nbytes()`` of each cache holding T tokens of SmolLM2's shapes (30 layers, 3 kv
  heads, D = Dv = 64), everything counted, against an fp16 cache (T·30·3·128·2 B) and
  against the fp32 DynamicCache the fp32 model really uses.  Shapes alone fix the count,
  so this fills each cache with random keys/values (one update per layer, then decode
  steps to show the residual's cycle) instead of running the model.
* perplexity: teacher-forced through each cache, the text fed in chunks (``--chunk``), so
  later chunks attend the quantized / compressed past; a chunk attends itself exactly.
* agreement: greedy generation from ``--prompts`` prompts, fraction of generated tokens
  equal to the full-precision cache's, position by position.
* speed: decode tokens/s after a ``--speed-context`` prefill; full = DynamicCache with
  transformers' SDPA attention (what a user runs), interleaved with each quantized cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import attnkit.cache as kvc
from attnkit.cache import native
from attnkit import data
from attnkit.bench.machine import cpu_model

QUANT = [(4, "minmax", 0), (4, "search", 0), (2, "minmax", 0), (2, "search", 0), (4, "minmax", 4), (2, "minmax", 4),
         (2, "search", 4), (2, "minmax", 4, "plan"), (2, "minmax", 4, "plan-v1")]
# (bits, scale, sinks[, plan]): "plan" = key_bits fitted by key_bit_plan; "plan-v<k>" with value_channels=k
PLAN_BOOK, PLAN_TOKENS = "Emma", 2048  # the calibration text of the key bit plans: not a book the tables measure
PLANS: dict[str, dict] = {}  # "q<bits>-<plan>" -> plan, fitted once per run by fit_plans()


def quant_name(bits: int, scale: str, sinks: int, plan: str = "") -> str:
    return f"q{bits}-{scale}" + (f"-s{sinks}" if sinks else "") + (f"-{plan}" if plan else "")


def plan_key(bits: int, plan: str) -> str:
    return f"q{bits}-{plan}"


def fit_plans(model, tok, books: dict) -> dict:
    """Fit the plan of every planned cache in QUANT (into PLANS); returns what was done."""
    ids = tokens_of(tok, books[PLAN_BOOK], PLAN_TOKENS, start=20_000)
    seconds = {}
    for bits, plan in sorted({(q[0], q[3]) for q in QUANT if len(q) > 3}):
        start = time.perf_counter()
        value_channels = int(plan.split("-v")[1]) if "-v" in plan else 0
        PLANS[plan_key(bits, plan)] = kvc.key_bit_plan(model, [ids], bits=bits, value_channels=value_channels)
        seconds[plan_key(bits, plan)] = time.perf_counter() - start
    return {"book": PLAN_BOOK, "tokens": PLAN_TOKENS, "start": 20_000, "seconds": seconds,
            "widths": {k: {str(w): sum(row.count(w) for layer in p["key_bits"] for row in layer) for w in (0, 2, 4, 8)}
                       for k, p in PLANS.items()}}


def commit() -> str:
    """The checkout's commit (short hash), "+ changes" when the caches' code or the benchmarks
    differ from it."""
    git = ["git", "-C", str(Path(__file__).parent.parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "src/attnkit/cache", "benchmarks/*.py"],
                           capture_output=True, text=True).stdout
    return head + (" + changes" if dirty.strip() else "")


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}


def tokens_of(tok, text: str, n: int, start: int = 0) -> torch.Tensor:
    ids = tok(text[start : start + n * 8], return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"the text gave {ids.shape[1]} tokens, {n} needed")
    return ids


# -- bytes -----------------------------------------------------------------------------------


def memory_window_equal_size(cfg, sinks: int, window: int, features: int) -> int:
    """The window of a window-only cache holding as many bytes as CompressedMemory(sinks, window, features)."""
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    per_token = hkv * 2 * d * 4  # fp32 keys + values, per layer
    summary = hkv * ((d + 1) * features + 1) * 4 + features * d * 4 / cfg.num_hidden_layers
    return window + math.ceil(summary / per_token)


def fill(cache, cfg, t: int, extra_steps: int = 0) -> None:
    """Put t tokens (one update per layer), then ``extra_steps`` single-token updates."""
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    for n in ([t] if t else []) + [1] * extra_steps:
        for layer in range(cfg.num_hidden_layers):
            cache.update(torch.randn(1, hkv, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g), layer)


def bytes_table(cfg, sizes, mem_args) -> list[dict]:
    hkv, d, layers = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers
    rows = []
    for t in sizes:
        fp16 = t * layers * hkv * 2 * d * 2
        caches = {quant_name(*q): (lambda name=quant_name(*q): make_cache(name, cfg, mem_args))
                  for q in QUANT if q[1] == "minmax"}
        caches["memory"] = lambda: kvc.CompressedMemory(**mem_args)
        rows.append({"cache": "fp32 DynamicCache", "tokens": t, "bytes": 2 * fp16, "bytes_per_token": 2 * fp16 / t,
                     "x_smaller_than_fp16": 0.5})
        for name, make in caches.items():
            cache = make()
            fill(cache, cfg, t)
            row = {"cache": name, "tokens": t, "bytes": cache.nbytes(), "bytes_per_token": cache.nbytes() / t,
                   "x_smaller_than_fp16": fp16 / cache.nbytes()}
            if name != "memory":  # the residual's cycle: up to G − 1 keys wait in full precision for their group
                xs = []
                for extra in range(1, cache.group_size):
                    fill(cache, cfg, 0, extra_steps=1)
                    xs.append((t + extra) * fp16 / t / cache.nbytes())
                row["x_smaller_worst_in_next_group"] = min(xs)
                row["x_smaller_best_in_next_group"] = max(xs)
            rows.append(row)
    return rows


@torch.no_grad()
def quant_errors(model, ids: torch.Tensor, group: int = 64) -> dict:
    """Relative squared error ||x̂ − x||² / ||x||² of SmolLM2's real keys and values (all layers),
    quantized as QuantizedCache does (keys per channel over G tokens, values per token), with
    min-max and with the clipping search applied to each."""
    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=model.config)
    model(ids, cache=cache, use_cache=True)
    out = {}
    for bits in (4, 2):
        for mode in ("minmax", "search"):
            num = {"keys": 0.0, "values": 0.0}
            den = {"keys": 0.0, "values": 0.0}
            for layer in cache.layers:
                k, v = layer.keys.float(), layer.values.float()  # (1, H, T, D)
                t = k.shape[-2] // group * group
                kg = k[:, :, :t].unflatten(2, (-1, group)).transpose(-1, -2)  # (1, H, nG, D, G)
                for name, x in (("keys", kg), ("values", v)):
                    c, sc, lo = kvc.quantize(x, bits, mode)
                    num[name] += (kvc.dequantize(c, sc, lo) - x).pow(2).sum().item()
                    den[name] += x.pow(2).sum().item()
            for name, total in num.items():
                out[f"{bits}-bit {name} {mode}"] = total / den[name]
    return out


# -- perplexity and generation -----------------------------------------------------------------


def make_cache(name: str, cfg, mem_args: dict):
    if name == "full":
        return DynamicCache(config=cfg)
    if name.startswith("q"):
        bits, scale, *rest = name[1:].split("-")
        sinks = next((int(r[1:]) for r in rest if r.startswith("s")), 0)
        plan = PLANS[plan_key(int(bits), name[name.index("plan") :])] if "plan" in rest else None  # fit_plans() first
        return kvc.QuantizedCache(bits=int(bits), scale=scale, sinks=sinks, key_bits=plan)
    if name == "memory":
        return kvc.CompressedMemory(**mem_args)
    if name == "window-only":
        return kvc.CompressedMemory(sinks=mem_args["sinks"], window=memory_window_equal_size(cfg, **mem_args),
                                    features=0)
    raise ValueError(name)


def perplexity_names() -> list[str]:
    """The caches of the perplexity table, in its order."""
    return ["full"] + [quant_name(*q) for q in QUANT] + ["memory", "window-only"]


def use(model, name: str):
    """The attention each cache runs with: SDPA for the DynamicCache, attnkit's for the others."""
    model.set_attn_implementation("sdpa" if name == "full" else kvc.register())


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, cache, chunk: int) -> float:
    nll, count = 0.0, 0
    for c0 in range(0, ids.shape[1], chunk):
        logits = model(ids[:, c0 : c0 + chunk], cache=cache, use_cache=True).logits.float()
        target = ids[:, c0 + 1 : c0 + chunk + 1]
        logits = logits[:, : target.shape[1]]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count)


@torch.no_grad()
def generate(model, ids: torch.Tensor, cache, n: int) -> torch.Tensor:
    """Greedy continuation of a batch of equal-length prompts (B, P) -> (B, n) new tokens."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    return out[:, ids.shape[1] :]


@torch.no_grad()
def decode_speed(model, ids: torch.Tensor, cache, steps: int) -> float:
    out = model(ids, cache=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - start)


SPEED_CACHES = ("full", "q4-minmax-s4", "q2-minmax-s4", "q2-minmax-s4-plan", "q2-minmax-s4-plan-v1")


def speed_ids(tok, books: dict, context: int) -> torch.Tensor:
    """The prefill the decode-speed runs start from."""
    return tokens_of(tok, books["Persuasion"], context, start=5_000)


def speed_rounds(model, ids: torch.Tensor, names, rounds: int, steps: int, mem_args: dict) -> dict[str, list[float]]:
    """Decode tokens/s of each cache, ``rounds`` times, the caches interleaved within a round."""
    tps: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names:
            use(model, name)
            tps[name].append(decode_speed(model, ids, make_cache(name, model.config, mem_args), steps))
        print(f"speed round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in tps.items()), flush=True)
    return tps


def generations(model, tok, books: dict, names, gen: dict, mem_args: dict, start: float) -> dict[str, torch.Tensor]:
    """Greedy continuations of ``gen["prompts"]`` prompts of Emma under each cache."""
    text = books["Emma"]
    prompts = torch.cat([tokens_of(tok, text, gen["prompt_tokens"], start=10_000 + i * 60_000)
                         for i in range(gen["prompts"])])
    outs = {}
    for name in names:
        use(model, name)
        outs[name] = generate(model, prompts, make_cache(name, model.config, mem_args), gen["new_tokens"])
        print(f"generation {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    return outs


def speed_table(model, tok, books: dict, args, mem_args: dict) -> tuple[dict, str]:
    """The decode-speed table (best of ``args.speed_rounds`` interleaved rounds) and its note."""
    tps = speed_rounds(model, speed_ids(tok, books, args.speed_context), SPEED_CACHES, args.speed_rounds,
                       args.speed_steps, mem_args)
    speed = {"context": args.speed_context, "steps": args.speed_steps, "tokens_per_s": {k: max(v) for k, v in tps.items()},
             "all_runs": tps, "kernel": native.status()}
    return speed, speed_note(args.speed_rounds, speed["kernel"])


def speed_note(rounds: int, kernel: str) -> str:
    """What the decode-speed table measures and what limits it."""
    return (
        f"Each figure is the best of its {rounds} rounds (the caches interleaved in each round); the per-round "
        "ratios against the same round's full cache are in cache_cpu.json (all_runs). Decoding (few query rows) takes "
        "QuantizedSnapshot._attend_two_pass with the C kernel: every packed key group's scores computed straight from the codes by a C "
        "kernel (attnkit.cache.native.dq_matmul, or plan_scores for a key plan: each row of codes unpacked into SIMD "
        "registers, the group's fp16 scale and low folded in, the scores written in place into one score tensor), one "
        "softmax, then the packed value rows' product the same way (the held-apart value channels by "
        "native.dq_rowdot); the new token's value row is quantized and packed in C too (native.quantize_rows, bit for "
        "bit PyTorch's). The kernel: " + kernel + ". What limits decoding now is the same for every cache: "
        "the model's own matrix products (its 135M fp32 weights read once per token, about half of each step) and "
        "some 20-30 eager PyTorch operators per layer and token around the kernels; the full-precision "
        "DynamicCache instead copies its whole fp32 cache once per token (torch.cat), which is why a packed cache "
        "can decode faster than it.")


# -- report ------------------------------------------------------------------------------------


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# KV caches on SmolLM2-135M (CPU)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"load average at start {tuple(round(x, 1) for x in m['load_avg_at_start'])}. {res['note']}",
        "",
        f"Command: `{res['command']}`",
        "",
        "QuantizedCache defaults: group_size 64 (keys: 64 tokens per channel; values: 64 channels per token), "
        "residual 0, fp16 scale + fp16 zero point per group; `-s4`: sinks=4 (the first 4 tokens kept exact, "
        "in the model's dtype). CompressedMemory: "
        f"{res['memory_args']}; the window-only cache has the same bytes ({res['window_only_window']}-token window).",
        "",
    ]
    if res.get("plans"):
        pl = res["plans"]
        lines += [
            f"`-plan`: `key_bits=attnkit.cache.key_bit_plan(model, ...)`, fitted on {pl['tokens']} tokens of "
            f"{pl['book']} (not a text measured below): each key channel (layer, kv head, channel) gets 0 bits (its "
            "group mean), b or 2b bits, chosen by query energy at the key bytes of uniform b bits. `-plan-v<k>`: "
            "`value_channels=k` as well: each (layer, kv head)'s k value channels whose removal most shrinks the "
            "per-token value groups' mean squared range held apart (4-bit per channel over groups of 64 tokens), on top "
            "of the same key widths. Fit time (s): "
            + ", ".join(f"{k} {t:.1f}" for k, t in pl["seconds"].items()) + ". Key channels per width: "
            + "; ".join(f"{k} {w}" for k, w in pl["widths"].items()) + ".",
            "",
        ]
    lines += [
        "## Cache bytes (everything counted) vs an fp16 cache",
        "",
        "| cache | tokens | MiB | bytes/token | x smaller than fp16 | worst / best in the next group |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["bytes"]:
        worst, best = r.get("x_smaller_worst_in_next_group"), r.get("x_smaller_best_in_next_group")
        lines.append(f"| {r['cache']} | {r['tokens']} | {r['bytes'] / 2**20:.2f} | {r['bytes_per_token']:.0f} | "
                     f"{r['x_smaller_than_fp16']:.2f} | {'' if worst is None else f'{worst:.2f} / {best:.2f}'} |")
    if res.get("memory_bytes"):
        lines += ["", "## CompressedMemory size as the sequence grows", "",
                  "| tokens | " + " | ".join(res["memory_bytes"]) + " |", "|---|" + "---:|" * len(res["memory_bytes"]),
                  "| MiB | " + " | ".join(f"{b / 2**20:.3f}" for b in res["memory_bytes"].values()) + " |"]
    if "quant_error" in res:
        lines += ["", "## Quantization error of SmolLM2's real keys and values (1024 tokens, all layers)", "",
                  "Relative squared error ||x̂ − x||² / ||x||². QuantizedCache's `scale=\"search\"` applies the "
                  "clipping search to values only: on keys its lower squared error costs perplexity (clipped key "
                  "outliers are the large scores).", "", "| bits | tensor | min-max | search |", "|---|---|---:|---:|"]
        for bits in (4, 2):
            for name in ("keys", "values"):
                e = res["quant_error"]
                lines.append(f"| {bits} | {name} | {e[f'{bits}-bit {name} minmax']:.5f} | "
                             f"{e[f'{bits}-bit {name} search']:.5f} |")
    lines += ["", f"## Teacher-forced perplexity ({res['book']}, chunks of {res['chunk']} tokens)", "",
              "| cache | " + " | ".join(f"T={t}" for t in res["sizes"]) + " |",
              "|---|" + "---:|" * len(res["sizes"])]
    for name, per in res["perplexity"].items():
        cells = []
        for t in res["sizes"]:
            p, full = per[str(t)], res["perplexity"]["full"][str(t)]
            cells.append(f"{p:.3f}" if name == "full" else f"{p:.3f} ({100 * (p / full - 1):+.2f}%)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    g = res["generation"]
    lines += ["", f"## Greedy generation: {g['prompts']} prompts of {g['prompt_tokens']} tokens, {g['new_tokens']} "
              "new tokens", "", "| cache | tokens identical to the full cache's (position by position) |", "|---|---:|"]
    for name, frac in g["agreement"].items():
        lines.append(f"| {name} | {frac:.3f} |")
    s = res["speed"]
    lines += ["", f"## Decode speed after a {s['context']}-token prefill ({s['steps']} steps, tokens/s)", "",
              "| cache | tokens/s | vs full |", "|---|---:|---:|"]
    for name, tps in s["tokens_per_s"].items():
        lines.append(f"| {name} | {tps:.2f} | {tps / s['tokens_per_s']['full']:.2f}x |")
    lines += ["", res.get("speed_note", ""), ""] + [note for note in res.get("notes", [])]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--speed-context", type=int, default=4096)
    p.add_argument("--speed-steps", type=int, default=32)
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--memory", default="sinks=4,window=512,features=64")
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--note", default="")
    p.add_argument("--bytes-only", action="store_true",
                   help="recompute only the bytes tables (shapes fix them) into an existing <out>/cache_cpu.json")
    p.add_argument("--perplexity-only", nargs="+", metavar="CACHE",
                   help="compute only these caches' perplexity (at the run's sizes) into an existing <out>/cache_cpu.json")
    p.add_argument("--generation-only", nargs="+", metavar="CACHE",
                   help="compute only these caches' greedy agreement (against a new full-cache run) into an "
                        "existing <out>/cache_cpu.json")
    p.add_argument("--speed-only", action="store_true",
                   help="rerun only the decode-speed table (every cache of SPEED_CACHES) into an existing <out>/cache_cpu.json")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    mem_args = {k: int(v) for k, v in (kv.split("=") for kv in args.memory.split(","))}
    model, tok = data.load_smollm2()
    cfg = model.config
    books = data.austen_novels()
    book = "Pride & Prejudice"
    res = {"machine": machine(), "note": args.note, "command": "python benchmarks/bench_cache.py " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]), "sizes": args.sizes, "chunk": args.chunk,
        "book": book, "memory_args": mem_args, "window_only_window": memory_window_equal_size(cfg, **mem_args)}

    if args.bytes_only or args.perplexity_only or args.generation_only or args.speed_only:  # the rest kept as it was
        old = json.loads((args.out / "cache_cpu.json").read_text())
        old["plans"] = fit_plans(model, tok, books)
        if args.speed_only:
            old["speed"], old["speed_note"] = speed_table(model, tok, books, args, old["memory_args"])
            done = "Decode-speed table rerun by `--speed-only`"
        elif args.generation_only:
            g = old["generation"]
            outs = generations(model, tok, books, ["full", *args.generation_only], g, old["memory_args"], start)
            for name in args.generation_only:
                g["agreement"][name] = (outs[name] == outs["full"]).float().mean().item()
            order = [quant_name(*q) for q in QUANT] + ["memory"]
            g["agreement"] = dict(sorted(g["agreement"].items(), key=lambda kv: order.index(kv[0])))
            done = "Greedy agreement of " + ", ".join(f"`{n}`" for n in args.generation_only) + \
                " computed by `--generation-only`"
        elif args.bytes_only:
            old["bytes"] = bytes_table(cfg, old["sizes"], old["memory_args"])
            done = "Bytes tables recomputed by `--bytes-only`"
        else:
            for name in args.perplexity_only:
                old["perplexity"][name] = {}
                use(model, name)
                for t in old["sizes"]:
                    ids = tokens_of(tok, books[book], t, start=20_000)
                    old["perplexity"][name][str(t)] = perplexity(model, ids, make_cache(name, cfg, old["memory_args"]),
                                                                 old["chunk"])
                    print(f"ppl T={t} {name}: {old['perplexity'][name][str(t)]:.3f} ({time.perf_counter() - start:.0f} s)",
                          flush=True)
            order = perplexity_names()  # the new rows where a full run puts them
            old["perplexity"] = dict(sorted(old["perplexity"].items(), key=lambda kv: order.index(kv[0])))
            done = "Perplexity rows of " + ", ".join(f"`{n}`" for n in args.perplexity_only) + " computed by `--perplexity-only`"
        old.setdefault("notes", []).append(f"- {done} ({time.strftime('%Y-%m-%d')}, commit {commit()}, {cpu_model()}).")
        (args.out / "cache_cpu.json").write_text(json.dumps(old, indent=2))
        (args.out / "cache_cpu.md").write_text(markdown(old))
        print(f"wrote {done[0].lower() + done[1:]} into {args.out / 'cache_cpu.md'}")
        return
    res["plans"] = fit_plans(model, tok, books)
    res["bytes"] = bytes_table(cfg, args.sizes, mem_args)
    res["memory_bytes"] = {}
    for t in args.memory_sizes:
        cache = kvc.CompressedMemory(**mem_args)
        fill(cache, cfg, t)
        res["memory_bytes"][str(t)] = cache.nbytes()
    print(f"bytes done ({time.perf_counter() - start:.0f} s)", flush=True)

    res["quant_error"] = quant_errors(model, tokens_of(tok, books[book], 1024, start=20_000))
    names = perplexity_names()
    res["perplexity"] = {name: {} for name in names}
    for t in args.sizes:
        ids = tokens_of(tok, books[book], t, start=20_000)
        for name in names:
            use(model, name)
            res["perplexity"][name][str(t)] = perplexity(model, ids, make_cache(name, cfg, mem_args), args.chunk)
            print(f"ppl T={t} {name}: {res['perplexity'][name][str(t)]:.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)

    gen = {"prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    outs = generations(model, tok, books, ["full"] + [quant_name(*q) for q in QUANT] + ["memory"], gen, mem_args, start)
    gen["agreement"] = {name: (outs[name] == outs["full"]).float().mean().item() for name in outs if name != "full"}
    res["generation"] = gen

    res["speed"], res["speed_note"] = speed_table(model, tok, books, args, mem_args)
    res["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cache_cpu.json").write_text(json.dumps(res, indent=2))
    (args.out / "cache_cpu.md").write_text(markdown(res))
    print(f"wrote {args.out / 'cache_cpu.md'} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
