"""The measuring pieces of attnkit.bench: memory probe, timing, FLOPs, and the exact
benchmark's handling of skipped cases."""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnkit.bench import attention_flops, forward_backward_closure, forward_closure, measure_peak, peak_memory_here
from attnkit.bench.timing import time_callable

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]


# -- factories for the fresh-process probe (module level: the child imports them) ------


def alloc_free_case(nbytes: int):
    def run():
        block = torch.empty(nbytes, dtype=torch.uint8)
        block.fill_(1)
        del block

    return run


def two_overlapping_case(nbytes: int):
    """Peak is 1.5x nbytes: a lives while b (half) is allocated, then both go."""

    def run():
        a = torch.ones(nbytes // 4, dtype=torch.float32)
        b = torch.ones(nbytes // 8, dtype=torch.float32)
        del a, b
        c = torch.ones(nbytes // 8, dtype=torch.float32)  # below the earlier peak
        del c

    return run


def keep_case(nbytes: int):
    """Retains what it allocates (a cache the call keeps alive)."""
    kept = []

    def run():
        kept.append(torch.ones(nbytes, dtype=torch.uint8))

    return run


def raising_case():
    raise RuntimeError("factory failed on purpose")


def dying_case():
    os._exit(3)


# -- memory ---------------------------------------------------------------------------------


def test_fresh_process_probe_sees_a_known_allocation():
    res = measure_peak(alloc_free_case, 64 * MiB, timeout=120)
    assert res.ok, res.error
    assert res.probe == "profiler"
    assert res.peak_bytes == pytest.approx(64 * MiB, rel=0.02)
    assert abs(res.retained_bytes) < MiB


def test_probe_takes_the_high_water_mark_not_the_sum():
    res = measure_peak(two_overlapping_case, 64 * MiB, timeout=120)
    assert res.ok, res.error
    assert res.peak_bytes == pytest.approx(96 * MiB, rel=0.02)


def test_in_process_probe_counts_retained_memory_and_not_inputs():
    x = torch.randn(4 * MiB)  # an input: allocated before, must not count
    res = peak_memory_here(forward_closure(lambda q, k, v: q * 2, x, x, x))
    assert res.peak_bytes == pytest.approx(x.nbytes, rel=0.02)  # the output only
    kept = peak_memory_here(keep_case(8 * MiB))
    assert kept.retained_bytes == pytest.approx(8 * MiB, rel=0.02)


def test_fresh_process_failures_are_reported_not_raised():
    raised = measure_peak(raising_case, timeout=120)
    assert not raised.ok and raised.peak_bytes is None
    assert "factory failed on purpose" in raised.error
    died = measure_peak(dying_case, timeout=120)
    assert not died.ok and "exited with code 3" in died.error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the rss probe reads /proc")
def test_rss_fallback_sees_a_known_allocation():
    res = measure_peak(alloc_free_case, 64 * MiB, probe="rss", timeout=120)
    assert res.ok, res.error
    assert 0.95 * 64 * MiB <= res.peak_bytes <= 1.25 * 64 * MiB  # page rounding, malloc overhead


# -- timing -----------------------------------------------------------------------------------


def test_timing_returns_positive_median_and_iqr():
    t = time_callable(lambda: torch.randn(256, 256) @ torch.randn(256, 256), warmup=1, repeats=3, min_run_time=0.05)
    assert t.median > 0 and t.iqr >= 0
    assert len(t.times) >= 3 and t.number_per_block >= 1
    assert t.other_load is None or 0.0 <= t.other_load <= 1.0


def _faulting_call(fault_on: set[int], slow_s: float = 0.06):
    """A slow call that writes 16 MiB of fresh memory (page faults) on the listed calls; the
    blocks are kept, so that no allocator can hand the same pages back."""
    calls, kept = [0], []

    def run() -> None:
        calls[0] += 1
        if calls[0] in fault_on:
            block = mmap.mmap(-1, 16 * MiB)  # fresh pages from the kernel, whatever malloc holds
            ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(block)), 1, 16 * MiB)  # every page written
            kept.append(block)
        time.sleep(slow_s)

    return run, calls


@pytest.mark.skipif(importlib.util.find_spec("resource") is None, reason="page faults are counted with resource")
def test_timing_settles_after_faulting_warmups_and_retakes_faulting_blocks():
    # calls 1-2: warm-up faults, so a third warm-up call is made; calls 4 and 6 fault while
    # measured, so those two blocks are re-taken and three clean ones remain
    run, calls = _faulting_call({1, 2, 4, 6})
    t = time_callable(run, warmup=1, repeats=3, min_run_time=0.0)
    assert t.warmup == 3
    assert len(t.faulted_blocks) == 2 and len(t.times) == 3 and t.number_per_block == 1
    assert t.page_faults is not None and t.page_faults < 256
    assert t.fresh_bytes is None if not sys.platform.startswith("linux") else t.fresh_bytes < MiB
    assert calls[0] == 3 + 5  # warm-up and settling, then 3 kept + 2 re-taken blocks


def test_pool_keeps_every_block_and_the_largest_known_disturbance():
    from attnkit.bench.timing import Timing, pool

    a = Timing(median=1.0, iqr=0.0, times=(1.0, 1.0), number_per_block=1, warmup=1, other_load=0.1,
               page_faults=None, faulted_blocks=(5.0,), fresh_bytes=10.0)
    b = Timing(median=3.0, iqr=0.0, times=(2.0, 3.0), number_per_block=2, warmup=2, other_load=None,
               page_faults=7.0, faulted_blocks=(), fresh_bytes=4.0)
    t = pool([a, b])
    assert t.times == (1.0, 1.0, 2.0, 3.0) and t.median == 1.5 and t.number_per_block == 2 and t.warmup == 3
    assert (t.other_load, t.page_faults, t.fresh_bytes, t.faulted_blocks) == (0.1, 7.0, 10.0, (5.0,))


def test_a_slow_call_gets_exactly_repeats_blocks_when_the_run_time_is_met():
    # what a visit asks for: one settled block of a call slower than SLOW_CALL_S
    t = time_callable(lambda: time.sleep(0.06), warmup=1, repeats=1, min_run_time=0.0)
    assert len(t.times) == 1 and t.times[0] >= 0.06 and t.number_per_block == 1


def test_timing_takes_at_least_repeats_blocks_when_one_block_fills_the_run_time(monkeypatch):
    from attnkit.bench import timing

    class OneBlock(timing.Timer):  # as when the first block was disturbed for longer than min_run_time
        def blocked_autorange(self, *args, **kwargs):
            return self.timeit(1)

    monkeypatch.setattr(timing, "Timer", OneBlock)
    t = time_callable(lambda: time.sleep(0.001), warmup=1, repeats=3, min_run_time=0.05)
    assert len(t.times) == 3 and t.number_per_block == 1


@pytest.mark.skipif(importlib.util.find_spec("resource") is None, reason="page faults are counted with resource")
def test_timing_that_never_settles_reports_every_block():
    run, _ = _faulting_call(set(range(1, 100)))
    t = time_callable(run, warmup=1, repeats=3, min_run_time=0.0, settle=2)
    assert t.warmup == 3  # 1 + settle
    assert len(t.times) == 3 and t.faulted_blocks == t.times  # no clean block: all kept and flagged
    assert t.page_faults is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim and the steady allocator are glibc's")
def test_release_heap_gives_back_what_the_steady_allocator_keeps():
    # in a process of its own: the steady allocator is never undone
    code = """
import torch
from attnkit.bench.timing import release_heap, steady_allocator
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
steady_allocator()
base = rss()
x = torch.ones(256 * 2**20, dtype=torch.uint8)
del x
kept = rss() - base
assert release_heap()
print(kept, rss() - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kept, after = map(int, out.stdout.split())
    assert kept > 200 * MiB  # freed, but kept by the heap (no trimming)
    assert after < 32 * MiB  # given back


@pytest.mark.parametrize("enable", [True, False])
def test_huge_pages_reach_a_process_started_after_it(enable, monkeypatch):
    # the setting is an environment variable that torch reads at a process's first allocation,
    # so it is checked where the sweep uses it: in a process started after the call
    from attnkit.bench.timing import huge_pages, thp_mode

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "unset")  # restored after the test
    line = huge_pages(enable)
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == ("1" if enable else "0")
    code = """
import torch
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
print(sum(int(l.split()[1]) for l in open('/proc/self/smaps') if l.startswith('AnonHugePages:')))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    mode = thp_mode()
    if not enable:
        assert line.startswith("4 KiB pages (--no-huge-pages)")
    elif mode in (None, "never"):
        assert line.startswith("4 KiB pages (") and "huge pages" in line
    else:
        assert line.startswith("transparent huge pages for tensors of 2 MiB and more (THP_MEM_ALLOC_ENABLE=1")
    if mode == "madvise":  # only torch's madvise asks for huge pages; "always" gives them regardless
        assert out.returncode == 0, out.stderr
        huge_kib = int(out.stdout)
        assert (huge_kib > 0) if enable else (huge_kib == 0)  # any huge page at all: the madvise arrived


def test_forward_backward_closure_runs_backward_and_drops_grads():
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))  # (B, H, N, D)
    seen = []

    def attn(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.register_hook(lambda g: seen.append(g.shape))
        return out

    forward_backward_closure(attn, q, k, v, torch.ones(1, 2, 8, 4))()
    assert seen == [torch.Size([1, 2, 8, 4])]
    assert q.grad is None and k.grad is None and v.grad is None
    with pytest.raises(ValueError, match="requires grad"):
        forward_backward_closure(attn, *(t.detach() for t in (q, k, v)), torch.ones(1, 2, 8, 4))


# -- FLOPs ------------------------------------------------------------------------------------


def test_flops_formula():
    fwd = attention_flops(2, 3, 5, 7, 11)
    assert fwd == 4 * 2 * 3 * 5 * 7 * 11
    assert attention_flops(2, 3, 5, 7, 11, causal=True) == fwd / 2
    assert attention_flops(2, 3, 5, 7, 11, mode="bwd") == 2.5 * fwd
    assert attention_flops(2, 3, 5, 7, 11, mode="fwd_bwd") == 3.5 * fwd
    assert attention_flops(1, 1, 4, 4, 8, dv=16) == 2 * 4 * 4 * (8 + 16)
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 1, 1, 1, mode="backward")


# -- the exact benchmark's skipped cases ---------------------------------------------------


def _load_bench_script():
    spec = importlib.util.spec_from_file_location("bench_exact", ROOT / "benchmarks" / "bench_exact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cases_over_the_memory_budget_are_listed_as_skipped_with_the_projection(tmp_path):
    bench = _load_bench_script()
    budget_gib = 1e-4  # ~100 KiB: every case is over it, so nothing is run
    assert bench.main(["--n", "1024", "--methods", "naive", "tiled", "--mem-budget-gib", str(budget_gib),
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "exact_cpu.json").read_text())
    rows = report["results"]
    assert len(rows) == 4  # 2 methods x (fwd, fwd_bwd): none silently dropped
    for row in rows:
        assert row["status"] == "skipped"
        assert row["projected_bytes"] > budget_gib * 2**30
        assert "projected peak" in row["reason"] and "budget" in row["reason"]
    naive_fb = next(r for r in rows if (r["method"], r["mode"]) == ("naive", "fwd_bwd"))
    assert naive_fb["projected_bytes"] >= 3 * 8 * 1024 * 1024 * 4  # three (H, N, N) fp32 matrices
    text = (tmp_path / "exact_cpu.md").read_text()
    assert "naive fwd_bwd N=1024: skipped: projected peak" in text
    assert all(t["met"] is None for t in report["targets"])  # nothing measured, nothing claimed


def test_a_call_is_settled_by_few_faults_or_faults_that_cost_under_a_percent():
    from attnkit.bench.timing import FAULT_S, SETTLED_FAULTS, settled

    assert settled(SETTLED_FAULTS, 1e-4) and not settled(SETTLED_FAULTS + 1, 1e-4)
    faults = 12_000  # torch SDPA forward+backward at N=4096 fp32, every call
    assert settled(faults, 1.2 * (faults * FAULT_S / 0.01))
    assert not settled(faults, 0.9 * (faults * FAULT_S / 0.01))


def test_a_call_is_settled_only_if_its_fresh_memory_also_costs_under_a_percent():
    from attnkit.bench.timing import FRESH_S_PER_GIB, SETTLED_BYTES, settled

    assert settled(0, 1e-4, SETTLED_BYTES) and not settled(0, 1e-4, SETTLED_BYTES + 1)
    fresh = 1500 * 2 * MiB  # 1,500 faults of 2 MiB huge pages: few faults, much memory
    cost = fresh / 2**30 * FRESH_S_PER_GIB
    assert settled(1500, 1.2 * cost / 0.01, fresh) and not settled(1500, 0.9 * cost / 0.01, fresh)
    assert settled(1500, 3.3, None)  # where the resident set is unknown, the faults decide


def _host_drift():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "host_drift.py"
    spec = importlib.util.spec_from_file_location("host_drift", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_drift_resample_tells_a_steady_ratio_from_one_that_moved():
    drift = _host_drift()
    # a sample every 5 s for 840 s: SDPA 1.0 at best, a method 2.0 at best, both slowed at random
    # by up to 2x; in the "moved" watch the method's floor is 50% higher in the second window
    import random

    rng = random.Random(1)
    names = ["torch-sdpa fwd N=1024 bf16", "steady fwd N=1024 bf16", "moved fwd N=1024 bf16", "lone fwd N=2048 fp32"]
    samples = []
    for k in range(169):
        t = 5.0 * k
        slow = [1 + rng.random() for _ in range(4)]
        samples.append([t, 1.0 * slow[0], 2.0 * slow[1], (2.0 if t < 420 else 3.0) * slow[2], slow[3]])
    assert [len(w) for w in drift._windows(samples, 420.0)] == [84, 84]  # the sample at 840 s starts a third: dropped
    assert [name for name, _, _ in drift._ratio_columns(names)] == names[1:3]  # no SDPA at N=2048: no ratio
    rows = {(r["case"], r["k"]): r for r in drift.resample({"cases": names, "samples": samples}, 420.0, [3, 40],
                                                           draws=300)}
    assert rows["moved fwd N=1024 bf16", 40]["p_miss"] == 1.0
    assert rows["steady fwd N=1024 bf16", 40]["p_miss"] == 0.0
    # with few samples a run's best lands well above the floor: a steady ratio moves too
    assert rows["steady fwd N=1024 bf16", 3]["p_miss"] > 0.05
    assert rows["steady fwd N=1024 bf16", 3]["p95"] > rows["steady fwd N=1024 bf16", 40]["p95"]
