"""Ring attention (context parallel) on CPU against single-process tiled attention.

For each of causal and non-causal attention at sequence length N (default 16384,
B=1, H=8, D=64, fp32), measures

* single-process ``attnkit.attention(method="tiled")`` with all the cores, and
* ``attnkit.distributed.ring_attention`` over P gloo processes (default 2) sharing the
  cores equally (zig-zag layout),

and reports per rank: peak extra memory of forward (inputs requiring grad, so what
backward saves is counted) and of forward+backward (the torch CPU allocator's live
bytes, :func:`attnkit.bench.memory.peak_memory_here` with the profiler probe); the
median time of forward and of forward+backward (slowest rank of each repetition); the
bytes each rank sends per ring step; and how much of the communication hides behind
compute: ``wait_s`` is the time a pass spends blocked on transfers (exposed
communication), ``comm_alone_s`` the time the same transfers take with nothing to
overlap, so ``hidden = 1 - wait_s / comm_alone_s``.

Repetitions are a fixed count with a barrier before each, not torch.utils.benchmark's
adaptive counts: adaptive counts could differ across ranks, and a collective program
must run the same calls on every rank.  Each measurement runs in fresh processes
(spawned), the baseline never concurrently with the ring.

Run (roughly 20-30 minutes at the defaults on 2 quiet cores; `--reps 1` or `--causal yes` for less)::

    python benchmarks/bench_ring.py --out benchmarks/results/ring_cpu
    python benchmarks/bench_ring.py --seq 2048 --reps 1 --out /tmp/ring_small   # a quick check

The machine (CPU model, cores, torch version) and the load average before and after are
written with the results; ``--note`` adds a line (e.g. "measured under load").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkit
from attnkit.bench.machine import cpu_model
from attnkit.bench.memory import peak_memory_here
from attnkit.distributed import ring_attention, ring_stats, shard

MiB = 1 << 20


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def make_inputs(args):
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)  # (B, H, N, D)
    q, k, v, do = (torch.randn(shape, generator=g) for _ in range(4))
    return q, k, v, do


def timed(fn, reps: int, barrier=None) -> list[float]:
    times = []
    for _ in range(reps):
        if barrier:
            barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def quiet_fds():
    """Silence the profiler's C++ start/stop lines (file descriptors 1 and 2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def measure(fwd, do, reps: int, barrier=None) -> dict:
    """Memory and time of fwd() and of fwd().backward(do)."""

    def fwd_bwd():
        fwd().backward(do)

    fwd_bwd()  # warm-up (allocator, thread pools, gloo connections)
    with quiet_fds():
        mem_f = peak_memory_here(fwd, probe="profiler")
        mem_fb = peak_memory_here(fwd_bwd, probe="profiler")
    return {
        "peak_fwd_bytes": mem_f.peak_bytes,
        "peak_fwd_bwd_bytes": mem_fb.peak_bytes,
        "fwd_s": timed(fwd, reps, barrier),
        "fwd_bwd_s": timed(fwd_bwd, reps, barrier),
    }


def baseline_worker(_, args, causal: bool, threads: int, conn_path: str) -> None:
    torch.set_num_threads(threads)
    q, k, v, do = make_inputs(args)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    result = measure(lambda: attnkit.attention(q, k, v, is_causal=causal, method="tiled"), do, args.reps)
    with open(conn_path, "w") as f:
        json.dump(result, f)


def comm_alone(local_k, local_v, reps: int) -> float:
    """Seconds for one ring step's k, v transfer with nothing to overlap (median)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    recv = (torch.empty_like(local_k), torch.empty_like(local_v))

    def step():
        ops = [dist.P2POp(dist.isend, t, (rank + 1) % world) for t in (local_k, local_v)]
        ops += [dist.P2POp(dist.irecv, t, (rank - 1) % world) for t in recv]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    step()
    return statistics.median(timed(step, max(3, reps), dist.barrier))


def ring_worker(rank: int, args, causal: bool, init: str, out_path: str) -> None:
    torch.set_num_threads(rank_threads(args))
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=args.world, timeout=datetime.timedelta(minutes=30)
    )
    q, k, v, do = make_inputs(args)
    q, k, v, do = (shard(t).contiguous() for t in (q, k, v, do))  # (B, H, N/P, D); the full ones are freed
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fwd():
        return ring_attention(q, k, v, is_causal=causal)

    result = measure(fwd, do, args.reps, dist.barrier)
    with ring_stats() as prof:
        timed(lambda: fwd().backward(do), args.reps, dist.barrier)
    result["stats_fwd"] = prof.forward.as_dict()
    result["stats_bwd"] = prof.backward.as_dict()
    result["comm_alone_s"] = comm_alone(k.detach(), v.detach(), args.reps)
    gathered = [None] * args.world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def run_config(args, causal: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ring_path, init = os.path.join(tmp, "ring.json"), os.path.join(tmp, "init")
        base = {}
        for threads in sorted({args.threads, rank_threads(args)}, reverse=True):
            path = os.path.join(tmp, f"base{threads}.json")
            mp.spawn(baseline_worker, args=(args, causal, threads, path), nprocs=1)
            with open(path) as f:
                base[threads] = json.load(f)
        mp.spawn(ring_worker, args=(args, causal, init, ring_path), nprocs=args.world)
        with open(ring_path) as f:
            ranks = json.load(f)
    return {"causal": causal, "tiled": base, "ring": ranks}


def rank_threads(args) -> int:
    return max(1, args.threads // args.world)


def summarise(args, cfg: dict) -> dict:
    """Medians, per-rank maxima, per-step volume and overlap from one config's raw numbers."""
    base, ranks = cfg["tiled"], cfg["ring"]
    p = args.world
    chunk = args.batch * args.heads * (args.seq // p) * args.head_dim * 4  # one fp32 k (or v) chunk
    per_rep = lambda key: [max(r[key][i] for r in ranks) for i in range(args.reps)]
    inputs = 4 * chunk * p  # q, k, v and the upstream gradient, full length
    out = {"causal": cfg["causal"], "tiled": {}}
    for threads, b in base.items():
        out["tiled"][int(threads)] = {
            "inputs_MiB": inputs / MiB,
            "peak_fwd_MiB": b["peak_fwd_bytes"] / MiB,
            "peak_fwd_bwd_MiB": b["peak_fwd_bwd_bytes"] / MiB,
            "fwd_s": statistics.median(b["fwd_s"]),
            "fwd_bwd_s": statistics.median(b["fwd_bwd_s"]),
        }
    comm = max(r["comm_alone_s"] for r in ranks)
    fw = [r["stats_fwd"] for r in ranks]
    bw = [r["stats_bwd"] for r in ranks]
    fwd_comm, bwd_comm = (p - 1) * comm, (p - 1) * comm + p * comm  # k, v moves; fp32 dk, dv moves
    out["ring"] = {
        "inputs_MiB_per_rank": inputs / p / MiB,
        "peak_fwd_MiB_per_rank": max(r["peak_fwd_bytes"] for r in ranks) / MiB,
        "peak_fwd_bwd_MiB_per_rank": max(r["peak_fwd_bwd_bytes"] for r in ranks) / MiB,
        "fwd_s": statistics.median(per_rep("fwd_s")),
        "fwd_bwd_s": statistics.median(per_rep("fwd_bwd_s")),
        "bytes_per_step_fwd": 2 * chunk,
        "bytes_per_step_bwd": 4 * chunk,
        "bytes_per_pass_fwd": fw[0]["bytes_sent"] / fw[0]["calls"],
        "bytes_per_pass_bwd": bw[0]["bytes_sent"] / bw[0]["calls"],
        "comm_alone_step_s": comm,
        "wait_s_fwd": max(s["wait_s"] / s["calls"] for s in fw),
        "wait_s_bwd": max(s["wait_s"] / s["calls"] for s in bw),
        "total_s_fwd": max(s["total_s"] / s["calls"] for s in fw),
        "total_s_bwd": max(s["total_s"] / s["calls"] for s in bw),
    }
    r = out["ring"]
    r["wait_share_fwd"] = r["wait_s_fwd"] / r["total_s_fwd"]
    r["wait_share_bwd"] = r["wait_s_bwd"] / r["total_s_bwd"]
    r["hidden_fwd"] = max(0.0, 1 - r["wait_s_fwd"] / fwd_comm) if fwd_comm > 0 else None
    r["hidden_bwd"] = max(0.0, 1 - r["wait_s_bwd"] / bwd_comm) if bwd_comm > 0 else None
    return out


def markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        "# Ring attention (context parallel) on CPU",
        "",
        (f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, Python {m['python']}. "
        f"Load average before / after: {report['load_before']} / {report['load_after']}."),
        "",
        (f"N = {c['seq']}, B = {c['batch']}, H = {c['heads']}, D = {c['head_dim']}, fp32; ring over P = "
        f"{c['world']} gloo processes with {max(1, c['threads'] // c['world'])} thread(s) each (zig-zag layout), "
        f"against single-process tiled (`attnkit.attention(method=\"tiled\")`) with all {c['threads']} threads "
        f"and with one rank's share. Inputs: q, k, v and the upstream gradient. Median of {c['reps']} runs "
        f"(ring: slowest rank of each run). Memory: peak live bytes above the inputs (torch CPU allocator, "
        f"profiler), forward with inputs requiring grad."),
    ]
    if report.get("note"):
        lines += ["", f"**Note: {report['note']}**"]
    lines += [
        "",
        (
            "| attention | method | inputs (MiB/rank) | peak fwd (MiB/rank) | peak fwd+bwd (MiB/rank) | "
            "fwd+bwd incl. inputs (MiB/rank) | fwd (s) | fwd+bwd (s) |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cfg in report["results"]:
        kind = "causal" if cfg["causal"] else "full"
        for threads, t in cfg["tiled"].items():
            lines.append(
                f"| {kind} | tiled, 1 process, {threads} thread(s) | {t['inputs_MiB']:.0f} | {t['peak_fwd_MiB']:.1f} | "
                f"{t['peak_fwd_bwd_MiB']:.1f} | {t['inputs_MiB'] + t['peak_fwd_bwd_MiB']:.0f} | {t['fwd_s']:.2f} | "
                f"{t['fwd_bwd_s']:.2f} |"
            )
        r = cfg["ring"]
        lines.append(
            f"| {kind} | ring, P = {c['world']} x {max(1, c['threads'] // c['world'])} thread(s) | "
            f"{r['inputs_MiB_per_rank']:.0f} | {r['peak_fwd_MiB_per_rank']:.1f} | {r['peak_fwd_bwd_MiB_per_rank']:.1f} | "
            f"{r['inputs_MiB_per_rank'] + r['peak_fwd_bwd_MiB_per_rank']:.0f} | {r['fwd_s']:.2f} | {r['fwd_bwd_s']:.2f} |"
        )
    lines += [
        "",
        ("Communication per rank: each forward step sends one k and one v chunk; each backward step sends "
        "k, v and the fp32 dk, dv accumulators. `wait` is the time a pass spent blocked on transfers "
        "(exposed communication, plus any wait for a slower neighbour to finish computing: in backward the "
        "last dk, dv can only leave once the neighbour's last step is done); `alone` the time one step's k, v "
        "transfer takes with no compute; hidden = 1 - wait / (transfers x alone), floored at 0."),
        "",
        (
            "| attention | bytes/step fwd | bytes/step bwd | alone (ms/step) | wait fwd (s, share) | "
            "wait bwd (s, share) | hidden fwd | hidden bwd |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cfg in report["results"]:
        r = cfg["ring"]
        pct = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"
        lines.append(
            f"| {'causal' if cfg['causal'] else 'full'} | {r['bytes_per_step_fwd'] / MiB:.1f} MiB | "
            f"{r['bytes_per_step_bwd'] / MiB:.1f} MiB | {1e3 * r['comm_alone_step_s']:.1f} | "
            f"{r['wait_s_fwd']:.3f} ({pct(r['wait_share_fwd'])}) | {r['wait_s_bwd']:.3f} ({pct(r['wait_share_bwd'])}) | "
            f"{pct(r['hidden_fwd'])} | {pct(r['hidden_bwd'])} |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384, help="sequence length N")
    parser.add_argument("--world", type=int, default=2, help="ring size P")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="total threads (split among ranks)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--note", default="", help="a line for the report, e.g. 'measured under load'")
    parser.add_argument("--out", default="benchmarks/results/ring_cpu", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.seq % (2 * args.world):
        parser.error(f"--seq {args.seq} must be divisible by 2P = {2 * args.world} (zig-zag layout)")
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = []
    for causal in {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]:
        print(f"causal={causal}: tiled, then ring over {args.world} processes ...", file=sys.stderr, flush=True)
        results.append(summarise(args, run_config(args, causal)))
    report = {
        "machine": machine(),
        "config": {k: getattr(args, k) for k in ("seq", "world", "batch", "heads", "head_dim", "reps", "threads")},
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "note": args.note,
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
