"""The benchmark runner behind `attnkit bench`: exponent fits and projections, budget
skips with their reasons, compare / fail-if-regression, and a tiny end-to-end run that
writes results.json, report.md and the plots."""

from __future__ import annotations

import json
import math
import multiprocessing
import platform
import statistics
import time

import pytest
import torch

from attnkit.bench.accuracy import reference_with_grads
from attnkit.bench.cases import Case, make_call, parse_preset
from attnkit.bench.flops import counted_flops
from attnkit.bench.main import main, parse_args
from attnkit.bench.memory import forkserver_context, measure_peak

from .test_bench_measure import alloc_free_case
from attnkit.bench.plots import pareto_front
from attnkit.bench.report import compare, ratio_agreement, seed_summary
from attnkit.bench.runner import Config, _Sampler, _Visits, pool_rounds, replace_config, run_stress, run_sweep
from attnkit.bench.scaling import break_even, fit_exponent, project
from attnkit.bench.timing import huge_pages
from attnkit.core.reference import reference_attention


@pytest.fixture(autouse=True)
def _own_huge_pages_setting(monkeypatch):
    """`attnkit bench` sets THP_MEM_ALLOC_ENABLE for the processes it starts; keep that to each test."""
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")

MiB = 2**20


# -- fits and projections ---------------------------------------------------------------


def test_exponent_fit_recovers_a_known_slope():
    ns = [512, 1024, 2048, 4096, 8192]
    g = torch.Generator().manual_seed(0)
    noise = (1 + 0.02 * torch.randn(len(ns), generator=g)).tolist()
    fit = fit_exponent(ns, [3e-9 * n**1.5 * e for n, e in zip(ns, noise)])
    assert fit.exponent == pytest.approx(1.5, abs=0.03)
    assert fit.at(16384) == pytest.approx(3e-9 * 16384**1.5, rel=0.1)
    assert fit_exponent(ns, [2.0 * n**2 for n in ns]).exponent == pytest.approx(2.0, abs=1e-9)
    assert fit_exponent([1024, 2048], [None, 1.0]) is None  # one usable point: no fit
    with pytest.raises(ValueError, match="lengths"):
        fit_exponent([1, 2], [1.0])


def test_projection_uses_the_fit_with_a_floor_and_a_default():
    cost, p = project([1024, 2048], [1.0, 4.0], 4096)
    assert (cost, p) == (pytest.approx(16.0), pytest.approx(2.0))
    cost, p = project([1024, 2048], [1.0, 1.1], 4096)  # flat (overhead-bound): at least linear
    assert p == 1.0 and cost == pytest.approx(2.2)
    cost, p = project([1024], [0.5], 4096)  # one point: quadratic
    assert p == 2.0 and cost == pytest.approx(8.0)
    assert project([], [], 4096) is None


def test_break_even_needs_every_larger_n_faster():
    ns = [1024, 2048, 4096, 8192]
    assert break_even(ns, {1024: 1.2, 2048: 0.9, 4096: 1.5, 8192: 3.0}) == 4096
    assert break_even(ns, {1024: 0.5, 2048: 0.9, 4096: 0.8, 8192: None}) is None


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 0.5, "a"), (2.0, 0.1, "b"), (3.0, 0.2, "c"), (0.5, 0.9, "d")]
    assert [p[2] for p in pareto_front(pts)] == ["d", "a", "b"]


# -- measuring pieces the runner adds ------------------------------------------------------


def test_forkserver_probe_sees_a_known_allocation():
    ctx = forkserver_context()
    for _ in range(2):  # the second case comes from the same server, still clean
        res = measure_peak(alloc_free_case, 32 * MiB, timeout=120, context=ctx, quiet=True)
        assert res.ok, res.error
        assert res.peak_bytes == pytest.approx(32 * MiB, rel=0.02)


def test_counted_flops_matches_matmuls_and_is_none_for_fused_sdpa():
    q = torch.randn(1, 2, 64, 16)  # (B, H, N, D)
    assert counted_flops(lambda: q @ q.transpose(-1, -2)) == 2 * 2 * 64 * 64 * 16
    fused = counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert fused is None or fused > 0  # never 0: None means "not counted"


def test_sdpa_float64_reference_agrees_with_the_materialised_one(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 40, 8, generator=g)  # (B, Hq, N, D)
    k, v = (torch.randn(1, 3, 40, 8, generator=g) for _ in range(2))  # GQA (B, Hkv, S, D)
    go = torch.randn(1, 6, 40, 8, generator=g)
    a = reference_with_grads(q, k, v, go)
    monkeypatch.setattr("attnkit.bench.accuracy.MATERIALISE_LIMIT", 0)
    b = reference_with_grads(q, k, v, go)
    for name in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a["out"], reference_attention(q.double(), k.double(), v.double()))


def test_make_call_builds_each_mode_and_gqa_preset():
    preset = parse_preset("smollm2")
    assert (preset.hq, preset.hkv, preset.d) == (9, 3, 64)
    for method in ("vanilla", "torch-sdpa", "performer:features=16"):
        for mode in ("fwd", "fwd_bwd"):
            make_call(Case(method, preset, 32, "bf16", mode))()
    with pytest.raises(ValueError, match="--preset"):
        parse_preset("gpt-17")


# -- budgets: skipped cases are listed, with reason and projection -----------------------------


def _tiny(**kw) -> Config:
    base = dict(methods=["vanilla", "performer:features=16"], preset=parse_preset("2x1x8"), ns=[32, 64, 128],
                dtypes=["fp32"], repeats=1, min_run_time=0.001, memory=False, accuracy=False, progress=False,
                flop_check_max_n=0)
    return Config(**{**base, **kw})


def test_each_case_is_timed_in_rounds_of_the_timing_process_and_rounds_pool():
    res = run_sweep(_tiny(ns=[32], rounds=3))
    for row in res["cases"]:
        t = row["time"]
        assert t["process"] == "timing" and len(t["rounds"]) == 3
        # one process times every round and keeps the case warm: no warm-up after the first
        assert [r["process_visit"] for r in t["rounds"]] == [1, 2, 3]
        assert t["rounds"][0]["warmup"] >= 1 and all(r["warmup"] == 0 for r in t["rounds"][1:])
        medians = sorted(r["median"] for r in t["rounds"])
        assert t["median"] == medians[0] and t["iqr"] == medians[2] - medians[0]
        assert len(t["times"]) == sum(len(r["times"]) for r in t["rounds"])
        assert t["best"] == min(t["times"]) and row["tokens_per_s"] == 32 / t["best"]
    assert pool_rounds([{"median": 1.0, "times": [1.0], "number_per_block": 1, "warmup": 1, "other_load": 0.0},
                        {"median": 3.0, "times": [3.0, 3.0], "number_per_block": 2, "warmup": 1, "other_load": 0.2}]
                       ) == {"best": 1.0, "median": 1.0, "iqr": 2.0, "times": [1.0, 3.0, 3.0], "number_per_block": 2, "warmup": 2,
                             "other_load": 0.2, "page_faults": None, "fresh_bytes": None, "process": "timing",
                             "rounds": [{"median": 1.0, "times": [1.0], "number_per_block": 1, "warmup": 1,
                                         "other_load": 0.0},
                                        {"median": 3.0, "times": [3.0, 3.0], "number_per_block": 2, "warmup": 1,
                                         "other_load": 0.2}]}


def test_visits_time_each_group_in_one_process_until_max_rounds_spread_by_the_gap():
    res = run_sweep(_tiny(ns=[32], rounds=2, max_rounds=4, visit_gap_s=0.3, visit_share=0.0))  # all after the sweep
    rows = res["cases"]
    for row in rows:
        rounds = row["time"]["rounds"]
        assert len(rounds) == 4 and "rounds_skipped" not in row["time"]
        assert rounds[0].get("cases_in_process", 1) == 1  # its own process first, with its memory
        # a visit times both methods of the row's (N, dtype, mode) in one process
        assert all(r["cases_in_process"] == 2 for r in rounds[1:])
        at = [r["at_s"] for r in rounds]
        assert at == sorted(at)
    for mode in ("fwd", "fwd_bwd"):
        a, b = (r["time"]["rounds"] for r in rows if r["mode"] == mode)
        assert [r["at_s"] for r in a[1:]] == [r["at_s"] for r in b[1:]]  # the same visits
    # the group with the fewest processes goes first: the two groups take turns
    fwd = next(r for r in rows if r["mode"] == "fwd")["time"]["rounds"]
    bwd = next(r for r in rows if r["mode"] == "fwd_bwd")["time"]["rounds"]
    turns = sorted([(r["at_s"], "fwd") for r in fwd[1:]] + [(r["at_s"], "bwd") for r in bwd[1:]])
    assert all(a[1] != b[1] for a, b in zip(turns, turns[1:]))


def test_a_visit_times_the_sdpa_baseline_first_and_last_as_one_round():
    res = run_sweep(_tiny(ns=[32], methods=["vanilla", "torch-sdpa"], modes=("fwd",), rounds=2, max_rounds=2,
                          min_run_time=0.05))
    base, other = (next(r for r in res["cases"] if r["method"] == m)["time"]["rounds"] for m in ("torch-sdpa", "vanilla"))
    assert len(base) == len(other) == 2 and base[1]["at_s"] == other[1]["at_s"]  # one visit
    assert base[1]["bracketed"] and "bracketed" not in other[1]
    # two timings of about 0.02 s each (a fast call's visit), joined: more blocks, all kept
    assert len(base[1]["times"]) >= 2 * 2 and base[1]["median"] == statistics.median(base[1]["times"])


def test_the_timing_process_keeps_cases_warm_and_a_new_one_follows_one_that_died():
    cfg = _tiny(ns=[32])
    case = Case("vanilla", cfg.preset, 32, "fp32", "fwd")
    sampler = _Sampler(forkserver_context(("attnkit.bench.runner",)), 0, 1)
    try:
        (a,), why = sampler.time([case], cfg, bracket=False, trim=True, timeout=120)
        (b,), _ = sampler.time([case], cfg, bracket=False, trim=False, timeout=120)
        assert why is None and (a["process_visit"], b["process_visit"]) == (1, 2)
        assert a["warmup"] >= 1 and b["warmup"] == 0  # warm: timed at once
        sampler.proc.kill()  # as the out-of-memory killer would
        got, why = sampler.time([case], cfg, bracket=False, trim=False, timeout=120)
        assert got is None and "exited with code -9" in why and "out-of-memory" in why
        (c,), why = sampler.time([case], cfg, bracket=False, trim=False, timeout=120)
        assert why is None and c["process_visit"] == 1 and c["warmup"] >= 1  # a new process, cold again
    finally:
        sampler.close()
    assert sampler.proc is None


def test_visits_stop_at_the_run_budget_and_say_which_cases_got_fewer_than_rounds():
    cfg = _tiny(ns=[32], rounds=1, max_rounds=1)
    res = run_sweep(cfg)  # no visits
    assert all(len(r["time"]["rounds"]) == 1 and "rounds_skipped" not in r["time"] for r in res["cases"])
    # the same rows, due two visits each, in a run whose budget ran out a second ago
    cfg = replace_config(cfg, rounds=3, max_rounds=3, run_budget_s=100.0)
    visits = _Visits(cfg, _Sampler(multiprocessing.get_context("spawn"), 0, 1), started=time.monotonic() - 101.0)
    for row in res["cases"]:
        visits.add(row, Case(row["method"], cfg.preset, row["n"], row["dtype"], row["mode"]))
    visits.to_the_end()
    for row in res["cases"]:
        assert len(row["time"]["rounds"]) == 1
        assert row["time"]["rounds_skipped"] == "1 of 3 rounds: not enough of the run budget left"


def test_cases_over_the_time_budget_are_skipped_with_the_projection():
    res = run_sweep(_tiny(time_budget_s=1e-12))
    rows = res["cases"]
    assert len(rows) == 2 * 3 * 2  # methods x N x modes: nothing silently dropped
    first = [r for r in rows if r["n"] == 32]
    assert all(r["status"] == "ok" for r in first)  # nothing to project from yet
    for r in (r for r in rows if r["n"] == 64):
        assert r["status"] == "skipped"
        assert "time budget" in r["reason"] and "projected" in r["reason"]
        assert r["projected"]["time_s"] > 1e-12 and r["projected"]["time_exponent"] >= 1
    for r in (r for r in rows if r["n"] == 128):
        assert r["status"] == "skipped" and r["projected"]["time_s"] > 0


def test_cases_over_the_memory_budget_are_skipped_by_formula_before_any_run():
    res = run_sweep(_tiny(methods=["vanilla"], ns=[64], mem_budget_bytes=1024))
    for r in res["cases"]:
        assert r["status"] == "skipped"
        assert "memory budget" in r["reason"] and "by formula" in r["reason"]
        assert r["projected"]["bytes"] >= 2 * 2 * 64 * 64 * 4  # the (B, Hq, N, S) scores and probabilities


def test_unavailable_baseline_and_run_budget_are_listed():
    res = run_sweep(_tiny(methods=["xformers", "vanilla"], ns=[32, 64], run_budget_s=0.0))
    xf = [r for r in res["cases"] if r["method"] == "xformers"]
    assert all(r["status"] == "unavailable" and "not available on CPU" in r["reason"] for r in xf)
    later = [r for r in res["cases"] if r["method"] == "vanilla" and r["n"] == 64]
    assert all(r["status"] == "skipped" and "run budget" in r["reason"] for r in later)


# -- compare / fail-if-regression ----------------------------------------------------------


def _report(time_s: float, mem: int, method: str = "tiled") -> dict:
    rows = [{"label": method, "method": method, "preset": "bert-base", "n": 2048, "dtype": "fp32", "mode": m,
             "status": "ok", "time": {"median": time_s, "iqr": 0.0}, "memory": {"peak_bytes": mem}}
            for m in ("fwd", "fwd_bwd")]
    return {"cases": rows}


def test_compare_reports_change_and_flags_regressions_over_pct():
    old, same, slower, fatter = _report(1.0, 100), _report(1.05, 100), _report(1.3, 100), _report(1.0, 150)
    lines, bad = compare(old, same, 10)
    assert len(lines) == 2 and "+5.0%" in lines[0] and not bad
    _, bad = compare(old, slower, 10)
    assert len(bad) == 2 and all("time +30.0%" in b for b in bad)
    _, bad = compare(old, fatter, 10)
    assert len(bad) == 2 and all("memory +50.0%" in b for b in bad)
    _, bad = compare(old, slower, None)  # no threshold: never a regression
    assert not bad


def test_ratio_agreement_compares_each_method_against_sdpa_of_its_own_run():
    def run(sdpa: float, tiled: float, n: int = 2048) -> dict:
        rows = _report(sdpa, 1, "torch-sdpa")["cases"] + _report(tiled, 1, "tiled")["cases"]
        return {"cases": [{**r, "n": n} for r in rows]}

    # the whole machine 30% slower: every ratio is unchanged
    agree = ratio_agreement(run(1.0, 2.0), run(1.3, 2.6))
    assert (agree["within"], agree["total"], agree["worst"]) == (2, 2, [])
    agree = ratio_agreement(run(1.0, 2.0), run(1.0, 2.5))  # tiled 25% slower against SDPA
    assert agree["within"] == 0 and agree["total"] == 2 and "2.000 -> 2.500 (+25.0%)" in agree["worst"][0]
    assert ratio_agreement(run(1.0, 2.0, n=512), run(1.0, 9.0, n=512))["total"] == 0  # below min_n
    lines, _ = compare(run(1.0, 2.0), run(1.0, 2.5))
    assert any("0 of 2 agree within 15%" in line for line in lines)


def test_fail_if_regression_sets_the_exit_status(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_report(1.0, 100)))
    new.write_text(json.dumps(_report(1.5, 100)))
    assert main(["--compare", str(old), "--against", str(new), "--fail-if-regression", "20"]) == 3
    assert "regression" in capsys.readouterr().out
    assert main(["--compare", str(old), "--against", str(new), "--fail-if-regression", "60"]) == 0
    with pytest.raises(SystemExit):
        parse_args(["--fail-if-regression", "5"])  # needs --compare


def test_seed_summary_states_change_against_vanilla_and_sdpa():
    rep = {"config": {"ns": [2048], "dtypes": ["fp32"], "preset": {"name": "bert-base"}}, "cases": []}
    for label, t, mem in (("vanilla", 1.0, 400), ("torch-sdpa", 0.5, 10), ("tiled", 0.75, 20)):
        rep["cases"] += [{**r, "label": label, "method": label} for r in _report(t, mem, label)["cases"]]
    text = "\n".join(seed_summary(rep))
    assert "N=2048" in text
    tiled = next(line for line in text.splitlines() if "tiled" in line)
    words = tiled.split()
    assert words[words.index("vanilla;") - 5:words.index("vanilla;")] == ["-95%", "/", "time", "-25%", "vs"]
    assert words[-6:] == ["+100%", "/", "time", "+50%", "vs", "SDPA"]


# -- end to end ------------------------------------------------------------------------------


def test_tiny_run_writes_report_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    status = main(["--n", "32", "64", "--preset", "2x1x16", "--dtypes", "fp32", "bf16", "--methods", "vanilla",
                   "torch-sdpa", "xformers", "performer:features=16", "--repeats", "1", "--min-run-time", "0.001",
                   "--threads", "1", "--no-progress", "--out", str(out)])
    assert status == 0
    rep = json.loads((out / "results.json").read_text())
    for key in ("cpu_model", "cpu_count", "torch", "torch_threads", "allocator"):
        assert key in rep["machine"]
    if platform.libc_ver()[0] == "glibc":  # the timing process's allocator is pinned (steady_allocator)
        assert rep["machine"]["allocator"].startswith("glibc malloc with mmap off")
    assert rep["machine"]["allocator"].endswith("; " + huge_pages(True))  # the default: huge pages where there are
    ok = [r for r in rep["cases"] if r["status"] == "ok"]
    assert len(ok) == 3 * 2 * 2 * 2  # 3 runnable methods x 2 N x 2 dtypes x 2 modes
    assert all(r["time"]["times"] and r["memory"]["peak_bytes"] > 0 for r in ok)  # raw samples, memory
    acc = [a for a in rep["accuracy"] if a["status"] == "ok"]
    assert all(math.isfinite(a["out_rel_fro"]) and math.isfinite(a["grad_rel_fro"]) for a in acc)
    assert any("prob_mse" in a for a in acc if a["method"].startswith("performer"))
    assert {f["label"] for f in rep["fits"]} >= {"vanilla", "torch-sdpa"}
    text = (out / "report.md").read_text()
    assert f"Allocator: {rep['machine']['allocator']}" in text
    for section in ("## How it is measured", "## Scaling", "## N = 64, bf16", "## FLOPs", "not available on CPU",
                    "## Skipped, unsupported and failed cases"):
        assert section in text
    for png in ("time_vs_n", "memory_vs_n", "pareto", "amp_throughput"):
        assert (out / f"{png}.png").stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_stress_counts_nan_and_inf_per_method():
    cfg = _tiny(methods=["torch-sdpa", "tiled", "performer:features=16"], preset=parse_preset("2x2x16"))
    rows = run_stress(cfg, [64])
    assert {r["kind"] for r in rows} >= {"large-norm q", "all-masked rows", "fp16 near overflow"}
    for r in rows:
        assert r["status"] in ("ok", "unsupported", "error"), r
        if r["status"] == "ok":
            assert isinstance(r["nan"], int) and isinstance(r["inf"], int)
    tiled = [r for r in rows if r["method"] == "tiled" and r["status"] == "ok"]
    assert tiled and all(r["nan"] == 0 and r["inf"] == 0 for r in tiled)
    masked = next(r for r in tiled if r["kind"] == "all-masked rows")
    assert masked["masked_rows_nonzero"] == 0


def test_legacy_entry_points_keep_their_flags(tmp_path):
    from attnkit.bench import approx

    args = approx.parse_args(["--quick", "--out", str(tmp_path)])
    assert args.quick and "performer:features=256" in args.methods and not args.errors
    args = approx.parse_args(["--errors", "--error-n", "256"])
    assert args.errors and args.error_n == 256
