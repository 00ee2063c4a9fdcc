"""The benchmark sweep behind ``attnkit bench``: every method × N × dtype × mode.

For each case, in order of growing N (so that smaller cases project the cost of larger
ones), the runner

1. checks the method can serve it (declared capabilities; a baseline's availability);
2. projects its time per call and peak memory from the same method's smaller N
   (:func:`attnkit.bench.scaling.project`) and skips it -- listed with the reason and
   the projection, never dropped -- when that is over ``time_budget_s``,
   ``mem_budget_bytes`` or what is left of ``run_budget_s``;
3. counts its FLOPs with ``FlopCounterMode`` at small N (cross-check of the formula),
   then, in a fresh process of its own (:func:`attnkit.bench.memory.run_fresh`, forked
   from a clean server), measures its peak extra memory (the first call), and times it
   in the timing process (:class:`_Sampler`; :func:`attnkit.bench.timing.time_callable`,
   every block kept as a raw sample); compiled cases are timed in the sweep's process.
   Every measuring process has the steady allocator
   (:func:`attnkit.bench.timing.steady_allocator`): without it, in one long process the
   same call's time depended on the allocation history (measured: vanilla attention's
   forward at N=1024 fp32 took 24 ms in one run and 40 ms in the next, math's at 4096
   1.76 s and 0.48 s, each steady within its run).  Later, *visits* (:class:`_Visits`)
   time every case of one (N, dtype, mode) again in the timing process, spread over the
   run;
4. measures, once per method × N × dtype, its error against the float64 reference on
   structured inputs (output, gradients, and the implied attention matrix at small N).

The result is a plain dict (the ``results.json`` the report, plots and ``--compare``
read).  :func:`run_stress` and :func:`run_profile` are the ``--stress`` and
``--profile`` modes.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from ..core.inputs import prepare_inputs
from ..core.reference import reference_attention
from ..core.registry import resolve
from .accuracy import method_errors, reference_with_grads
from .cases import (
    BASELINES, DTYPES, MODES, Case, Preset, attention_callable, autocast_for, case_flops, make_call, make_qkv,
    unsupported_reason,
)
from .flops import counted_flops
from .memory import child_start, exit_reason, forkserver_context, mp_context, peak_memory_here, run_fresh, stop_process
from .scaling import fit_exponent, project
from .timing import Timing, case_time, pool, release_heap, steady_allocator, timed_quietly

__all__ = ["Config", "run_sweep", "run_stress", "run_profile", "scaling_fits"]

BASELINE = "torch-sdpa"  # what the report's and --compare's time ratios divide by



@dataclass
class Config:
    """What one ``attnkit bench`` run measures and within which budgets.

    Attributes:
        methods: baseline names (``vanilla``, ``torch-sdpa``, ``xformers``) and attnkit specs.
        preset: the attention shape.
        ns: sequence lengths (N = S), measured in increasing order.
        dtypes: names from :data:`attnkit.bench.cases.DTYPES`.
        time_budget_s: skip a case whose projected time per call is above this.
        mem_budget_bytes: skip a case whose projected peak extra memory is above this.
        run_budget_s: skip what would not finish within this many seconds of the start.
        accuracy_max_n / prob_max_n / flop_check_max_n: the largest N at which errors,
            implied-probability errors and counted FLOPs are measured.
        rounds: rounds each case is timed in where the run budget allows: round one
            right after its memory is measured, then visits (:class:`_Visits`), all in
            the timing process (:class:`_Sampler`); pooled by :func:`pool_rounds`.
        max_rounds: visits go on, within the run budget, until each case has this many
            rounds (None or fewer than ``rounds`` means ``rounds``).
        visit_repeats / visit_run_time: a visit's measured blocks per slow case, and its
            least measured seconds per fast one.
        visit_gap_s: a group is visited again after at least this many seconds (unless
            nothing else is left to do).
        visit_share: the share of the time gone so far that visits may take while the
            sweep goes on.
    """

    methods: list[str]
    preset: Preset
    ns: list[int]
    dtypes: list[str]
    modes: tuple[str, ...] = MODES
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 3
    min_run_time: float = 0.2
    quiet_wait: float = 0.0
    quiet_load: float = 0.25
    retries: int = 0
    time_budget_s: float = 2.0
    mem_budget_bytes: int = 8 * 2**30
    run_budget_s: float | None = None
    timing: bool = True
    memory: bool = True
    accuracy: bool = True
    accuracy_max_n: int = 4096
    prob_max_n: int = 1024
    flop_check_max_n: int = 1024
    compile: bool = False
    progress: bool = True
    verbose: bool = False
    memory_context: str = "forkserver"
    rounds: int = 1
    max_rounds: int | None = None
    visit_repeats: int = 1
    visit_run_time: float = 0.02
    visit_gap_s: float = 30.0
    visit_share: float = 0.15
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.max_rounds = max(self.rounds, self.max_rounds or 0)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["preset"] = asdict(self.preset)
        return d


# -- progress ---------------------------------------------------------------------------


class _Progress:
    """tqdm's bar with an ETA when tqdm is installed (the ``bench`` extra), plain lines otherwise."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        self.enabled, self.total, self.done, self.start = enabled, total, 0, time.monotonic()
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label[:48], refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.done % 10 == 0 or self.done == self.total):
            rate = (time.monotonic() - self.start) / self.done
            print(f"[{self.done}/{self.total}] ETA {rate * (self.total - self.done):.0f} s ({label})",
                  file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- one case ---------------------------------------------------------------------------


def _fmt_s(x: float) -> str:
    return f"{x:.3g} s" if x >= 1 else f"{x * 1e3:.3g} ms"


def _fmt_b(x: float) -> str:
    return f"{x / 2**30:.3g} GiB" if x >= 2**30 else f"{x / 2**20:.3g} MiB"


def _materialised_bytes(case: Case) -> int | None:
    """Peak of the methods that build the N x S matrices, before anything was measured."""
    if case.method not in ("vanilla", "math"):
        return None
    p = case.preset
    return (2 if case.mode == "fwd" else 3) * p.batch * p.hq * case.n * case.n * 4


class _History:
    """Measured (N, time, bytes) per (method, dtype, mode, compiled), for projections and fits."""

    def __init__(self):
        self.points: dict[tuple, list[tuple[int, float | None, float | None]]] = {}
        self.over: dict[tuple, str] = {}

    @staticmethod
    def key(case: Case) -> tuple:
        return (case.label, case.dtype, case.mode)

    def add(self, case: Case, t: float | None, b: float | None) -> None:
        self.points.setdefault(self.key(case), []).append((case.n, t, b))

    def project(self, case: Case, which: int) -> tuple[float, float] | None:
        pts = self.points.get(self.key(case), [])
        return project([p[0] for p in pts], [p[which] for p in pts], case.n)


def _projection_check(case: Case, cfg: Config, hist: _History, started: float) -> tuple[dict, str | None]:
    """(projection, reason to skip or None)."""
    proj: dict = {}
    pt = hist.project(case, 1)
    if pt is not None:
        proj["time_s"], proj["time_exponent"] = pt
    pb = hist.project(case, 2)
    if pb is not None:
        proj["bytes"], proj["bytes_exponent"] = pb
    elif _materialised_bytes(case) is not None:
        proj["bytes"], proj["bytes_exponent"] = _materialised_bytes(case), 2.0
    ref = min((p[0] for p in hist.points.get(hist.key(case), [])), default=None)
    basis = f"from N<={max(p[0] for p in hist.points[hist.key(case)])}" if ref else "by formula"
    if "time_s" in proj and proj["time_s"] > cfg.time_budget_s:
        return proj, (f"projected {_fmt_s(proj['time_s'])} per call ({basis}, exponent "
                      f"{proj['time_exponent']:.2f}) exceeds the time budget {_fmt_s(cfg.time_budget_s)} per call "
                      f"(--time-budget-s)")
    if "bytes" in proj and proj["bytes"] > cfg.mem_budget_bytes:
        return proj, (f"projected peak {_fmt_b(proj['bytes'])} ({basis}, exponent {proj['bytes_exponent']:.2f}) "
                      f"exceeds the memory budget {_fmt_b(cfg.mem_budget_bytes)} (--mem-budget-gib)")
    if cfg.run_budget_s is not None:
        cost = (cfg.warmup + cfg.repeats + 3) * proj.get("time_s", 0.0)
        left = cfg.run_budget_s - (time.monotonic() - started)
        if cost > left:
            proj["case_wall_s"] = cost
            return proj, (f"the run budget ({cfg.run_budget_s:.0f} s, --run-budget-s) leaves {max(left, 0):.0f} s; "
                          f"this case would take about {cost:.0f} s")
    return proj, None


def _measure_case(case: Case, cfg: Config, mem_ctx, sampler: _Sampler | None) -> dict:
    row: dict = {"status": "ok"}
    if case.compiled:  # measured here: a fresh process would compile again
        fn = make_call(case, cfg.seed)
        start = time.perf_counter()
        fn()  # compiles
        row["compile_s"] = time.perf_counter() - start
        if cfg.timing:
            row["time"] = {**timed_quietly(fn, cfg), "process": "sweep"}
        row["memory_note"] = "not measured for compiled runs (each fresh process would compile again)"
    else:
        if case.n <= cfg.flop_check_max_n:
            row["flops_counted"] = counted_flops(make_call(case, cfg.seed))
            gc.collect()
        if cfg.memory:
            got, why = run_fresh(_memory_in_child, case, cfg.seed, torch.get_num_threads(), context=mem_ctx,
                                 timeout=300 + 30 * cfg.time_budget_s, quiet=True)
            if why is not None:
                return {**row, "status": "error", "reason": f"measuring process: {why}"}
            row["memory"] = got
            if got.get("error"):
                row["status"], row["reason"] = "error", f"memory: {got['error']}"
        if sampler is not None:  # there is one when cfg.timing
            # round one of its time, in the timing process (trimmed after: round one of the
            # next case measures memory in a process of its own, and accuracy needs it too)
            got, why = sampler.time([case], cfg, bracket=False, trim=True, timeout=300 + 30 * cfg.time_budget_s)
            if why is not None or "error" in got[0]:
                return {**row, "status": "error", "reason": f"timing process: {why or got[0]['error']}"}
            row["time"] = pool_rounds(got)
    if "time" in row:
        row["time"].setdefault("best", min(row["time"]["times"]))
        row["tokens_per_s"] = case.preset.batch * case.n / case_time(row["time"])
    return row


def _memory_in_child(case: Case, seed: int, threads: int) -> dict:
    """One case's peak memory, in a fresh process of its own: the first call, from the
    clean state, with the parent's thread count and the steady allocator; timing is the
    timing process's (:class:`_Sampler`).  Nothing is touched ahead of the call.
    (Touching twice the call's peak first, as this did before, cost more than it saved:
    on this project's VM fresh memory costs 0.3-2.5 s per GiB -- the host backs the
    guest's pages on first touch -- and glibc's heap still grew past it: math's
    forward+backward at N=4096 fp32 reached 21 GB resident with the reserve, 17 GB
    without, for a call whose peak is 4.5 GB.)"""
    steady_allocator()
    torch.set_num_threads(threads)
    return peak_memory_here(make_call(case, seed), device=case.device).as_dict()


def _time_group(cases: list[Case], seed: int, cfg: Config, calls: dict, bracket: bool = False) -> list[dict]:
    """One visit (:class:`_Visits`): every case of ``cases`` timed in turn in the calling
    process.  A case this process has not run yet is built and timed after its own warm-up
    and settling (:func:`timed_quietly`); one it has run before (``calls``: case key ->
    (callable, its last median, times timed)) is warm -- its inputs are still there, and
    its last median says how to time it -- and is timed at once (``process_visit``: the
    how-manieth time this process times the case).  With ``bracket``, the first case is timed again
    after the last, and its two timings are one round (:func:`_joined`).  A case that
    raises gets ``{"error": why}`` and the others go on."""
    out = []
    for case in cases + cases[:1] * (bracket and len(cases) > 1):
        start = time.monotonic()
        try:
            known = calls.get(case.key())
            if known is None:  # cold: its own warm-up and settling
                fn, visit = make_call(case, seed), 1
                t = timed_quietly(fn, cfg)
            else:  # warm: timed at once, as its last median says
                fn, median, visit = known[0], known[1], known[2] + 1
                t = timed_quietly(fn, replace(cfg, warmup=0), expect=median)
            calls[case.key()] = (fn, t["median"], visit)
            out.append({**t, "wall_s": time.monotonic() - start, "cases_in_process": len(cases), "process_visit": visit})
        except Exception as e:  # reported for this case only
            out.append({"error": f"{type(e).__name__}: {e}"})
        gc.collect()
    if len(out) > len(cases):
        last = out.pop()
        out[0] = _joined(out[0], last) if "error" not in out[0] and "error" not in last else out[0]
    return out


def _sampler_loop(conn, seed: int, threads: int) -> None:
    """The timing process (:class:`_Sampler`): times what the sweep sends, ``(cases, opts,
    bracket, trim)``, and sends back :func:`_time_group`'s rows, until it gets None.  With
    ``trim`` it gives its free heap back afterwards (while the sweep still measures memory
    and accuracy, which need it)."""
    child_start(quiet=True)
    steady_allocator()
    torch.set_num_threads(threads)
    calls: dict = {}
    while (msg := conn.recv()) is not None:
        cases, opts, bracket, trim = msg
        conn.send(_time_group(cases, seed, opts, calls, bracket))
        if trim:
            release_heap()
    conn.close()
    os._exit(0)  # skip interpreter teardown (torch's takes most of a second)


class _Sampler:
    """The timing process: one process, forked from the sweep's clean server when the
    first case is timed, that times every case of the run -- round one right after the
    case's memory is measured in a fresh process of its own, then every visit
    (:class:`_Visits`) -- and keeps each case's inputs from one timing to the next
    (:func:`_sampler_loop`).  Like every measuring process it has the steady allocator, so
    a call reuses warm heap pages whatever ran before it.

    Why one process: a visit in a fresh process paid a warm-up and settling calls for
    every case -- two to three calls for each one it timed -- and the first visit of a
    warm process still pays them once, so a run had room for two or three visits per
    case.  On this project's 2-core VM that is too few: a memory-bound call's speed
    switches between two levels for spells of one to ten seconds (Nystrom's forward at
    N=1024 bf16, timed in 0.1 s chunks in one process: 5.8-6.4 ms for a spell, then
    7.2-7.5 ms, then back; torch SDPA in the same kind of chunks 20.1-21.6 ms), so the
    fastest block of three or four short visits was at the slow level in all of them
    often enough to move a ratio by 20-35% between runs.  Warm, a visit costs one block
    per case."""

    def __init__(self, ctx, seed: int, threads: int):
        self.ctx, self.args = ctx, (seed, threads)
        self.proc = self.conn = None
        self.exitcode: int | None = None  # the last process's, once it is gone

    def time(self, cases: list[Case], opts: Config, bracket: bool, trim: bool,
             timeout: float) -> tuple[list | None, str | None]:
        """:func:`_time_group` in the timing process, with ``opts`` (warm-up, repeats...):
        (its rows, None), or (None, why) when the process died or timed out (it is gone
        then; the next call starts a new one, which warms each case up again)."""
        if self.proc is None:
            self.conn, child = self.ctx.Pipe()
            self.proc = self.ctx.Process(target=_sampler_loop, args=(child, *self.args), daemon=True)
            self.proc.start()
            child.close()  # so that recv sees EOF if the process dies
        try:
            self.conn.send((cases, opts, bracket, trim))
            if self.conn.poll(timeout):
                return self.conn.recv(), None
            why = f"timed out after {timeout:.0f} s"
        except (EOFError, OSError):
            why = None
        self.close(kill=True)
        return None, why or exit_reason(self.exitcode)

    def close(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.exitcode = stop_process(self.proc, 0.1 if kill else 5)
        self.conn.close()
        self.proc = self.conn = None


def _joined(a: dict, b: dict) -> dict:
    """Two timings of the same case in one process as one round: every block of both
    (:func:`attnkit.bench.timing.pool`)."""
    both = pool([Timing(**{k: x[k] for k in Timing.__dataclass_fields__ if k in x}) for x in (a, b)])
    return {**a, **both.as_dict(), "wall_s": a["wall_s"] + b["wall_s"], "bracketed": True}


class _Visits:
    """More timings of the cases measured so far, spread over the run.

    A *visit* times every case of one (N, dtype, mode) group in turn -- SDPA with the
    methods it is compared with -- in the visits' own process (:class:`_Sampler`): a case
    it has not run yet after its own warm-up and settling, a warm one at once; one
    block each for a slow call (``cfg.visit_repeats``) and about ``cfg.visit_run_time``
    seconds of blocks for a fast one.  torch SDPA (:data:`BASELINE`), which every ratio
    of the group divides by, is timed first and again last, so that one slow moment of
    it does not move all of them: in run Z of ``bench_stability.md`` both of its
    processes at N=4096 fp32 ran 371-379 ms, where attnkit's ``sdpa`` route to the same
    kernel ran 321 ms, and seven ratios moved 15-27%.  Each visit is a round of each of
    its cases (:func:`pool_rounds`), and every round records when it ran (``at_s``,
    seconds from the start of the sweep).

    Why: on this project's 2-core VM the machine itself moves a memory-bound kernel's
    time against a compute-bound one's by 20-40%, for spells of seconds
    (:class:`_Sampler`) and of minutes (``benchmarks/host_drift.py``: method/SDPA ratios,
    sampled every 3.5 s in one process, ranged 30-41% max/min; the lowest ratio in each
    minute held within 2.5-13%).  The fastest block is a steady figure only where a case
    was sampled on both sides of such spells, so the samples must be spread over
    minutes, and as many as possible must fit in the run budget.

    When: while the sweep goes on, between any two cases, in up to
    ``cfg.visit_share`` of the time gone so far; after it, in what is left of the run
    budget.  Each time, the group that is due -- a case with fewer than
    ``cfg.max_rounds`` rounds, last visited at least ``cfg.visit_gap_s`` ago -- with
    the fewest rounds so far goes first, the cheapest of those first, and only if its
    visit (the last one's wall time, or an estimate from its cases' times) fits."""

    def __init__(self, cfg: Config, sampler: _Sampler, started: float):
        self.cfg, self.sampler, self.started = cfg, sampler, started
        self.groups: dict[tuple, list[tuple[dict, Case]]] = {}
        self.last: dict[tuple, float] = {}  # when each group's cases were last timed
        self.cost: dict[tuple, float] = {}  # the wall time of each group's last visit
        self.visits: dict[tuple, int] = {}
        self.failed: set[tuple] = set()
        self.spent = 0.0  # seconds of visits while the sweep went on
        self.opts = replace(cfg, memory=False, repeats=cfg.visit_repeats,
                            min_run_time=min(cfg.min_run_time, cfg.visit_run_time))

    def add(self, row: dict, case: Case) -> None:
        """A case just measured (round one)."""
        if row["status"] == "ok" and row.get("time", {}).get("process") == "timing":
            key = (case.n, case.dtype, case.mode)
            self.groups.setdefault(key, []).append((row, case))
            self.last[key] = time.monotonic()

    def _due(self, key) -> list[tuple[dict, Case]]:
        if key in self.failed:
            return []
        return [(row, case) for row, case in self.groups[key] if len(row["time"]["rounds"]) < self.cfg.max_rounds]

    def _estimate(self, key) -> float:
        if key in self.cost:
            return self.cost[key]
        calls = self.cfg.warmup + 1 + self.cfg.visit_repeats  # warm-up, a settling call, the blocks
        return 0.3 + sum((1 + (case.method == BASELINE)) * (0.05 + max(calls * case_time(row["time"]),
                                                                      self.opts.min_run_time + 2 * case_time(row["time"])))
                         for row, case in self._due(key))

    def _pick(self, room: float, gap: bool) -> tuple | None:
        now, best = time.monotonic(), None
        for key in self.groups:
            due = self._due(key)
            if not due or (gap and now - self.last[key] < self.cfg.visit_gap_s) or self._estimate(key) > room:
                continue
            rank = (min(len(row["time"]["rounds"]) for row, _ in due), self._estimate(key))
            if best is None or rank < best[0]:
                best = (rank, key)
        return None if best is None else best[1]

    def _visit(self, key, trim: bool) -> float:
        self.visits[key] = self.visits.get(key, 0) + 1
        due = self._due(key)[:: 1 if self.visits[key] % 2 else -1]  # so that no case always runs first
        # the baseline every ratio of the group divides by goes first and last
        base = [rc for rc in due if rc[1].method == BASELINE]
        due = base + [rc for rc in due if rc[1].method != BASELINE]
        cases = [case for _, case in due]
        start = time.monotonic()
        got, why = self.sampler.time(cases, self.opts, bool(base), trim,
                                     timeout=300 + 30 * self.cfg.time_budget_s * (len(cases) + 1))
        took = time.monotonic() - start
        self.last[key], self.cost[key] = time.monotonic(), took
        for (row, case), t in zip(due, got or []):
            if "error" not in t:
                row["time"] = pool_rounds(row["time"]["rounds"] + [{**t, "at_s": start - self.started}])
                row["tokens_per_s"] = case.preset.batch * case.n / case_time(row["time"])
        if why is not None:  # the process failed as a whole: no more visits for this group (a new process for the rest)
            for row, _ in due:
                row["time"]["visit_error"] = why
            self.failed.add(key)
        return took

    def during_sweep(self) -> None:
        """Visit groups in up to ``cfg.visit_share`` of the time gone so far, less what visits took before."""
        while True:
            room = self.cfg.visit_share * (time.monotonic() - self.started) - self.spent
            key = self._pick(room, gap=True)
            if key is None:
                return
            self.spent += self._visit(key, trim=True)  # round one and accuracy still need the memory

    def to_the_end(self) -> None:
        """Visit groups in what is left of the run budget (without one: until every case has
        ``cfg.max_rounds`` rounds); when no group is past the gap, the one visited longest
        ago goes next rather than waiting."""
        while True:
            left = (float("inf") if self.cfg.run_budget_s is None
                    else self.cfg.run_budget_s - (time.monotonic() - self.started) - 1.0)
            key = self._pick(left, gap=True)
            if key is None:
                waiting = [k for k in self.groups if self._due(k) and self._estimate(k) <= left]
                if not waiting:
                    break
                key = min(waiting, key=lambda k: self.last[k])
            self._visit(key, trim=False)
        for key in self.groups:
            for row, _ in self.groups[key]:
                if len(row["time"]["rounds"]) < self.cfg.rounds:
                    row["time"]["rounds_skipped"] = (f"{len(row['time']['rounds'])} of {self.cfg.rounds} rounds: "
                                                     "not enough of the run budget left")


def pool_rounds(rounds: list[dict]) -> dict:
    """One timing from several rounds of the same case (round one and the visits): the
    fastest block of any round as ``best`` (the figure the report shows and compares), the
    lowest of the rounds' medians as ``median``, their range (max - min) as ``iqr``, every
    block kept.

    The fastest, not a median: what disturbs a measurement on a shared machine only ever
    slows it down, and on this project's 2-core VM it comes and goes within a second --
    torch SDPA's forward at N=1024 bf16, timed in 0.1 s chunks in one process, ran
    21-26 ms from chunk to chunk, LowRank's 7-10 ms; in ten processes, LowRank's forward
    ran 5.0-5.6 ms in nine and 10.2 ms (steady over 12 blocks) in one.  The fastest block
    is what the call costs when nothing else runs; with few rounds a median is the mean
    of the disturbed and the undisturbed."""
    medians = sorted(r["median"] for r in rounds)
    spread = medians[-1] - medians[0]
    loads = [r["other_load"] for r in rounds if r.get("other_load") is not None]
    times = [t for r in rounds for t in r["times"]]
    return {"best": min(times), "median": medians[0], "iqr": spread, "times": times,
            "number_per_block": max(r["number_per_block"] for r in rounds), "warmup": sum(r["warmup"] for r in rounds),
            "other_load": max(loads) if loads else None,
            **{k: max((r[k] for r in rounds if r.get(k) is not None), default=None) for k in ("page_faults", "fresh_bytes")},
            "process": "timing", "rounds": rounds}


# -- accuracy ---------------------------------------------------------------------------


class _References:
    """Float64 reference output, gradients (and probabilities at small N) per (N, dtype), computed once."""

    def __init__(self, cfg: Config):
        self.cfg, self.cache = cfg, {}

    def get(self, n: int, dtype: str):
        if (n, dtype) not in self.cache:
            self.cache.clear()  # one (N, dtype) at a time: the sweep goes in that order
            cfg = self.cfg
            q, k, v = make_qkv(cfg.preset, n, dtype, cfg.device, seed=cfg.seed, structured=True)
            g = torch.Generator().manual_seed(cfg.seed + 7)
            grad_out = torch.randn(q.shape, generator=g).to(cfg.device)
            ref = reference_with_grads(q, k, v, grad_out)
            probs = None
            if n <= cfg.prob_max_n:
                with torch.no_grad():
                    _, probs = reference_attention(q, k, v, return_weights=True)
            self.cache[n, dtype] = (q, k, v, grad_out, ref, probs)
        return self.cache[n, dtype]


def _accuracy(method: str, n: int, dtype: str, refs: _References) -> dict:
    q, k, v, grad_out, ref, probs = refs.get(n, dtype)
    fn = attention_callable(method)

    def run(q, k, v):
        with autocast_for(dtype, refs.cfg.device):
            return fn(q, k, v)

    implied = None
    if probs is not None and method not in BASELINES and not resolve(method).capabilities.exact:
        m = resolve(method)
        with torch.no_grad():
            implied = m.implied_weights(prepare_inputs(q, k, v, None, 0.0, False, None)).double()
    res = method_errors(run, q, k, v, grad_out, ref, implied=implied, ref_probs=probs if implied is not None else None)
    res["reference"] = "materialised" if q.shape[0] * q.shape[-3] * n * n <= 2**26 else "torch SDPA in float64"
    return res


# -- the sweep --------------------------------------------------------------------------


def _cases(cfg: Config) -> list[Case]:
    out = []
    for n in sorted(cfg.ns):
        for dtype in cfg.dtypes:
            for method in cfg.methods:
                for compiled in ((False, True) if cfg.compile and method != "xformers" else (False,)):
                    for mode in cfg.modes:
                        out.append(Case(method, cfg.preset, n, dtype, mode, cfg.device, compiled))
    return out


def _warm_process(cfg: Config) -> None:
    """One small untimed call of each kind, so that the first timed case pays no one-off costs."""
    for method in ("torch-sdpa", "tiled"):
        for mode in cfg.modes:
            make_call(Case(method, cfg.preset, 256, cfg.dtypes[0], mode, cfg.device), cfg.seed)()


def run_sweep(cfg: Config) -> dict:
    """Measure every case of ``cfg``; returns ``{"cases": [...], "accuracy": [...], "fits": [...]}``.

    Never raises for a failing case: it is recorded with ``status`` "error" and the reason.
    """
    for d in cfg.dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtype {d!r}: must be one of {sorted(DTYPES)}")
    started = time.monotonic()
    cases = _cases(cfg)
    hist, refs = _History(), _References(cfg)
    mem_ctx = (forkserver_context(("attnkit.bench.cases", "attnkit.bench.runner")) if cfg.memory_context == "forkserver"
               else cfg.memory_context)
    rows, acc_rows = [], []
    bar = _Progress(len(cases), cfg.progress, "attnkit bench")
    sampler = _Sampler(mp_context(mem_ctx), cfg.seed, torch.get_num_threads()) if cfg.timing else None
    visits = _Visits(cfg, sampler, started) if cfg.max_rounds > 1 and cfg.timing else None
    _warm_process(cfg)
    # The sweep collects garbage after every case (cycles can hold tensors); what exists
    # now -- torch, attnkit and their modules -- is not garbage, and leaving it out cut each
    # gc.collect() from 0.12 s (~290,000 objects) to microseconds: ~300 of them a run.
    gc.freeze()
    try:
        for i, case in enumerate(cases):
            if visits is not None and i:
                visits.during_sweep()
            row = {**case.as_dict(), "label": case.label, "flops": case_flops(case.method, case.preset.shape(case.n), case.mode)}
            why = unsupported_reason(case.method, case.preset, case.n, case.dtype, case.device)
            if why is not None:
                row.update(status="unavailable" if case.method in BASELINES else "unsupported", reason=why)
            else:
                proj, skip = _projection_check(case, cfg, hist, started)
                row["projected"] = proj
                if skip is None and hist.key(case) in hist.over:
                    skip = f"a smaller N was skipped ({hist.over[hist.key(case)]})"
                if skip is not None:
                    row.update(status="skipped", reason=skip)
                    hist.over.setdefault(hist.key(case), f"N={case.n}")
                else:
                    case_start = time.monotonic()
                    try:
                        row.update(_measure_case(case, cfg, mem_ctx, sampler))
                    except Exception as e:  # one failing case must not stop the sweep; it is reported
                        row.update(status="error", reason=f"{type(e).__name__}: {e}")
                    row["wall_s"] = time.monotonic() - case_start
                    if row.get("time", {}).get("rounds"):
                        row["time"]["rounds"][0]["at_s"] = case_start - started
                    if row["status"] == "ok":
                        hist.add(case, case_time(row.get("time")), (row.get("memory") or {}).get("peak_bytes"))
                        if visits is not None:
                            visits.add(row, case)
            rows.append(row)
            if cfg.verbose:
                t = case_time(row.get("time"))
                bar.write(f"N={case.n} {case.dtype} {case.label} {case.mode}: {row['status']}"
                          + (f" {_fmt_s(t)}" if t else "") + (f" ({row.get('reason')})" if row.get("reason") else ""))
            gc.collect()
            if cfg.accuracy and case.mode == cfg.modes[-1] and not case.compiled:
                acc_start = time.monotonic()
                acc_rows.append(_accuracy_row(case, cfg, rows, refs))
                acc_rows[-1]["wall_s"] = time.monotonic() - acc_start
                release_heap()  # the float64 references' memory, kept by the steady allocator
            bar.step(f"N={case.n} {case.dtype} {case.label} {case.mode}")
        if visits is not None:
            visits.to_the_end()
    finally:
        if sampler is not None:
            sampler.close()
        bar.close()
        gc.unfreeze()
    return {"cases": rows, "accuracy": acc_rows, "fits": scaling_fits(rows, cfg)}


def _accuracy_row(case: Case, cfg: Config, rows: list[dict], refs: _References) -> dict:
    out = {"method": case.method, "n": case.n, "dtype": case.dtype, "preset": case.preset.name}
    mine = [r for r in rows if (r["method"], r["n"], r["dtype"], r["compiled"]) == (case.method, case.n, case.dtype, False)]
    if case.n > cfg.accuracy_max_n:
        return {**out, "status": "skipped", "reason": f"N > --accuracy-max-n {cfg.accuracy_max_n}"}
    bad = [r for r in mine if r["status"] in ("unsupported", "unavailable")]
    if bad:
        return {**out, "status": bad[0]["status"], "reason": bad[0]["reason"]}
    if any(r["status"] == "skipped" for r in mine) and not any(r["status"] == "ok" for r in mine):
        return {**out, "status": "skipped", "reason": "the case was over budget"}
    try:
        return {**out, "status": "ok", **_accuracy(case.method, case.n, case.dtype, refs)}
    except Exception as e:  # reported, not raised
        return {**out, "status": "error", "reason": f"{type(e).__name__}: {e}"}


def scaling_fits(rows: list[dict], cfg: Config, min_n: int = 1024) -> list[dict]:
    """Log-log exponent of time, memory and FLOPs against N per (method, dtype, mode).

    Fitted over N >= ``min_n`` where at least two such points were measured (smaller N
    are dominated by fixed overheads), else over all measured N.
    """
    fits = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["dtype"], r["mode"]), []).append(r)
    for (label, dtype, mode), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        big = [r for r in ok if r["n"] >= min_n]
        use = big if len(big) >= 2 else ok
        ns = [r["n"] for r in use]

        def fit(values):
            f = fit_exponent(ns, values)
            return None if f is None else {"exponent": f.exponent, "coef": f.coef, "ns": list(f.ns)}

        fits.append({
            "label": label, "dtype": dtype, "mode": mode,
            "time": fit([case_time(r.get("time")) for r in use]),
            "memory": fit([(r.get("memory") or {}).get("peak_bytes") for r in use]),
            "flops": fit([r["flops"] for r in use]),
        })
    return fits


# -- --stress ---------------------------------------------------------------------------

STRESS_KINDS = {
    "large-norm q": ("fp32", "queries scaled to norm ~ 100·sqrt(D): scores in the thousands"),
    "repeated tokens": ("fp32", "every key and value the same token: ties everywhere"),
    "all-masked rows": ("fp32", "B=2, every key of batch 1 masked (key-padding mask): its rows must be 0"),
    "fp16 near overflow": ("fp16", "fp16 |q|, |k| <= 60 (scaled scores up to ~3e4), |v| up to 6e4 (fp16 max 65504)"),
    "bf16 near overflow": ("bf16", "bf16 |q|, |k| <= 300 (scaled scores up to ~7e5), |v| up to 4e34: a sum of "
                                   "values over S overflows fp32"),
}


def _stress_inputs(kind: str, preset: Preset, n: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    b = 2 if kind == "all-masked rows" else preset.batch
    q = torch.randn(b, preset.hq, n, preset.d, generator=g)  # (B, Hq, N, D)
    k, v = (torch.randn(b, preset.hkv, n, preset.d, generator=g) for _ in range(2))  # (B, Hkv, N, D)
    mask = None
    dtype = torch.float32
    if kind == "large-norm q":
        q = q * 100
    elif kind == "repeated tokens":
        k, v = k[..., :1, :].expand_as(k).contiguous(), v[..., :1, :].expand_as(v).contiguous()
    elif kind == "all-masked rows":
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
        mask[1] = False
    elif kind == "fp16 near overflow":
        dtype = torch.float16
        q, k = q / q.abs().amax() * 60, k / k.abs().amax() * 60
        v = v.clamp(-4, 4) * 1.5e4
    elif kind == "bf16 near overflow":
        dtype = torch.bfloat16
        q, k = q / q.abs().amax() * 300, k / k.abs().amax() * 300
        v = v.clamp(-4, 4) * 1e34
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, (None if mask is None else mask.to(device))


def run_stress(cfg: Config, ns: list[int]) -> list[dict]:
    """Forward outputs on numerically hard inputs; counts NaN and inf per method (must be 0).

    ``cfg.time_budget_s`` bounds each call as in the sweep (projected from smaller N, skip listed).
    """
    import attnkit

    rows, hist = [], {}
    kinds = list(STRESS_KINDS)
    bar = _Progress(len(ns) * len(kinds) * len(cfg.methods), cfg.progress, "attnkit bench --stress")
    try:
        for n in sorted(ns):
            for kind in kinds:
                q, k, v, mask = _stress_inputs(kind, cfg.preset, n, cfg.device, cfg.seed)
                for method in cfg.methods:
                    row = {"kind": kind, "method": method, "n": n, "dtype": str(q.dtype).removeprefix("torch.")}
                    why = unsupported_reason(method, cfg.preset, n, "fp32", cfg.device)
                    if why is None and method not in BASELINES:
                        inp = prepare_inputs(q, k, v, mask, 0.0, False, None)
                        why = "; ".join(resolve(method).not_supported_reasons(inp)) or None
                    pts = hist.get((method, kind), [])
                    proj = project([p[0] for p in pts], [p[1] for p in pts], n)
                    if why is not None:
                        row.update(status="unsupported", reason=why)
                    elif proj is not None and proj[0] > cfg.time_budget_s:
                        row.update(status="skipped", reason=f"projected {_fmt_s(proj[0])} per call exceeds the time "
                                   f"budget {_fmt_s(cfg.time_budget_s)} (--time-budget-s)", projected_time_s=proj[0])
                    else:
                        try:
                            start = time.perf_counter()
                            with torch.no_grad():
                                if method in BASELINES:
                                    if mask is not None:
                                        import torch.nn.functional as F
                                        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask) \
                                            if method == "torch-sdpa" else _vanilla_masked(q, k, v, mask)
                                    else:
                                        out = attention_callable(method)(q, k, v)
                                else:
                                    out = attnkit.attention(q, k, v, attn_mask=mask, method=method)
                            wall = time.perf_counter() - start
                            hist.setdefault((method, kind), []).append((n, wall))
                            row.update(status="ok", nan=int(torch.isnan(out).sum()), inf=int(torch.isinf(out).sum()),
                                       time_s=wall)
                            if mask is not None:
                                row["masked_rows_nonzero"] = int((out[1] != 0).any(-1).sum())
                            del out
                        except Exception as e:  # reported, not raised
                            row.update(status="error", reason=f"{type(e).__name__}: {e}")
                    rows.append(row)
                    bar.step(f"{kind} N={n} {method}")
                del q, k, v, mask
                gc.collect()
    finally:
        bar.close()
    return rows


def _vanilla_masked(q, k, v, mask):
    from .cases import vanilla_attention  # noqa: F401  (same formula, with the mask added)

    groups = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


# -- --profile --------------------------------------------------------------------------


def run_profile(cfg: Config, method: str, n: int, out_dir, mode: str = "fwd_bwd", top: int = 15) -> tuple[str, str]:
    """Profile one case with ``torch.profiler``; writes a Chrome trace, returns (path, top-ops table)."""
    from torch.profiler import ProfilerActivity, profile

    case = Case(method, cfg.preset, n, cfg.dtypes[0], mode, cfg.device)
    why = unsupported_reason(method, cfg.preset, n, cfg.dtypes[0], cfg.device)
    if why is not None:
        raise ValueError(f"--profile {method} {n}: {why}")
    fn = make_call(case, cfg.seed)
    fn()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(cfg.device).type == "cuda" else [])
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        fn()
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_=" else "_" for c in method)
    path = out_dir / f"profile_{safe}_N{n}_{cfg.dtypes[0]}_{mode}.json"
    prof.export_chrome_trace(str(path))
    sort = "self_cuda_time_total" if torch.device(cfg.device).type == "cuda" else "self_cpu_time_total"
    return str(path), prof.key_averages().table(sort_by=sort, row_limit=top)


def replace_config(cfg: Config, **kw) -> Config:
    return replace(cfg, **kw)
