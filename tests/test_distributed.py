"""attnkit.distributed: ring attention over gloo process groups on the CPU.

Each world size gets one pool of spawned worker processes (module-scoped), which hold a
gloo process group and run test tasks sent to them; starting processes once keeps each
test at a fraction of a second.  Every wait is bounded: the process group has a 30 s
timeout, each task a 60 s one, each test pytest-timeout's.  A task returns, per rank,
("ok", value) or ("error", exception type, message).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import tempfile

import pytest
import torch
import torch.distributed as dist

import attnkit
from attnkit.distributed import (
    RingAttention,
    context_parallel,
    ring_attention,
    ring_stats,
    shard,
    shard_positions,
    unshard,
)

from .helpers import GRAD_REL_TOL, LOWP_FACTOR, LOWP_FLOOR, REL_TOL, naive_attention

pytestmark = pytest.mark.timeout(180)

TASK_TIMEOUT = 60.0


# -- the worker pool ----------------------------------------------------------------------


def _serve(rank: int, world: int, path: str, tasks, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{path}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, "ok", fn(rank, world, *args)))
        except Exception as e:  # reported to the test, which checks it
            results.put((rank, "error", type(e).__name__, str(e)))
    # Every answer has been read by the parent; skip the teardown of gloo and torch (seconds).
    os._exit(0)


class Pool:
    """P spawned processes in one gloo group; ``run(fn, *args)`` calls fn(rank, P, *args) on each."""

    def __init__(self, world: int):
        ctx = multiprocessing.get_context("spawn")
        fd, self.path = tempfile.mkstemp(prefix="attnkit-ring-")
        os.close(fd)
        os.unlink(self.path)  # the file store creates it
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_serve, args=(r, world, self.path, self.tasks[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.broken = False

    def run(self, fn, *args) -> list[tuple]:
        if self.broken:
            pytest.fail("the worker pool broke in an earlier test")
        for t in self.tasks:
            t.put((fn, args))
        got = {}
        try:
            for _ in range(self.world):
                rank, *result = self.results.get(timeout=TASK_TIMEOUT)
                got[rank] = tuple(result)
        except queue.Empty:
            self.broken = True
            self.close()
            pytest.fail(f"ranks {sorted(set(range(self.world)) - set(got))} did not answer in {TASK_TIMEOUT} s (hang)")
        return [got[r] for r in range(self.world)]

    def values(self, fn, *args) -> list:
        """Run and require success on every rank."""
        results = self.run(fn, *args)
        errors = [f"rank {r}: {res[1]}: {res[2]}" for r, res in enumerate(results) if res[0] != "ok"]
        assert not errors, "\n".join(errors)
        return [res[1] for res in results]

    def close(self) -> None:
        for t in self.tasks:
            t.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        if os.path.exists(self.path):
            os.unlink(self.path)


@pytest.fixture(scope="module")
def pools():
    made: dict[int, Pool] = {}

    def get(world: int) -> Pool:
        if world not in made:
            made[world] = Pool(world)
        return made[world]

    yield get
    for p in made.values():
        p.close()


# -- tasks (run on every rank) --------------------------------------------------------------


def _inputs(n, hq, hkv, d, dv, dtype, batch=(2,), seed=0):
    """The full sequence, the same on every rank: q, k, v and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, hq, n, d, generator=g)
    k = torch.randn(*batch, hkv, n, d, generator=g)
    v = torch.randn(*batch, hkv, n, dv, generator=g)
    do = torch.randn(*batch, hq, n, dv, generator=g)
    return tuple(t.to(dtype) for t in (q, k, v, do))


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def task_against_reference(rank, world, n, hq, hkv, d, dv, dtype, causal, layout, batch):
    """Relative errors of out, dq, dk, dv (unsharded) against float64 reference attention."""
    q, k, v, do = _inputs(n, hq, hkv, d, dv, dtype, batch)
    full = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attnkit.reference_attention(*full, is_causal=causal)
    ref.backward(do.double())
    local = [shard(t, layout=layout).detach().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, is_causal=causal, layout=layout)
    assert out.dtype == dtype and out.shape == (*batch, hq, n // world, dv)
    out.backward(shard(do, layout=layout))
    errs = [_rel(unshard(out, layout=layout), ref)]
    errs += [_rel(unshard(t.grad, layout=layout), f.grad) for t, f in zip(local, full)]
    return errs


def task_lowp(rank, world, dtype, causal):
    """Ring error and plain same-dtype math error, both against the float64 reference."""
    q, k, v, _ = _inputs(8 * world, 4, 2, 40, 40, dtype)
    ref = attnkit.reference_attention(q, k, v, is_causal=causal)
    out = unshard(ring_attention(*(shard(t) for t in (q, k, v)), is_causal=causal))
    naive = naive_attention(q, k, v, is_causal=causal)
    scale = ref.abs().max().item()
    return (out.double() - ref).abs().max().item(), (naive.double() - ref).abs().max().item(), scale


class _ScatterReplicated(torch.autograd.Function):
    """full -> this rank's shard; backward gathers every rank's shard gradient (the full
    tensor is the same on all ranks, so its gradient is the sum of all ranks' paths)."""

    @staticmethod
    def forward(ctx, x):
        return shard(x)

    @staticmethod
    def backward(ctx, g):
        return unshard(g)


class _GatherReplicated(torch.autograd.Function):
    """this rank's shard -> full; the loss being the same on all ranks, backward takes its shard."""

    @staticmethod
    def forward(ctx, x):
        return unshard(x)

    @staticmethod
    def backward(ctx, g):
        return shard(g)


def task_gradcheck(rank, world, causal):
    """torch.autograd.gradcheck of the whole distributed function, all ranks in lockstep."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 4 * world, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 4 * world, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 4 * world, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        local = [_ScatterReplicated.apply(t) for t in (q, k, v)]
        return _GatherReplicated.apply(ring_attention(*local, is_causal=causal))

    return torch.autograd.gradcheck(f, (q, k, v))


def task_bad(rank, world, case):
    """A bad call (only on some ranks, for the cross-rank cases), then a good one."""
    q, k, v, _ = _inputs(4 * world, 2, 2, 8, 8, torch.float32)
    q, k, v = (shard(t) for t in (q, k, v))
    kwargs = {}
    if case == "length" and rank == 1:
        q, k, v = (t[..., :-2, :] for t in (q, k, v))
    elif case == "dtype" and rank == 1:
        q, k, v = q.double(), k.double(), v.double()
    elif case == "heads" and rank == 1:
        k, v = (t[:, :1].expand(-1, 3, -1, -1) for t in (k, v))  # 2 query heads, 3 key/value heads
    elif case == "odd":  # zig-zag causal needs an even chunk on every rank
        q, k, v = (t[..., :-1, :] for t in (q, k, v))
        kwargs["is_causal"] = True
    elif case == "causal":
        kwargs["is_causal"] = rank == 0
    elif case == "grad" and rank == 0:
        q.requires_grad_()
    elif case == "group":
        kwargs["group"] = "world"
    elif case == "layout":
        kwargs["layout"] = "stripes"
    try:
        ring_attention(q, k, v, **kwargs)
        failure = None
    except Exception as e:
        failure = (type(e).__name__, str(e))
    q, k, v, _ = _inputs(4 * world, 2, 2, 8, 8, torch.float32)
    out = ring_attention(*(shard(t) for t in (q, k, v)), is_causal=True)  # the group still works
    ok = _rel(unshard(out), attnkit.reference_attention(q, k, v, is_causal=True)) < REL_TOL[torch.float32]
    return failure, ok


def task_shard_errors(rank, world):
    x = torch.zeros(1, 2, 6 * world + 1, 8)
    errors = []
    for layout in ("zigzag", "contiguous"):
        try:
            shard(x, layout=layout)
        except attnkit.AttentionInputError as e:
            errors.append(str(e))
    return errors


def task_not_member(rank, world):
    sub = dist.new_group([0])
    q, k, v, _ = _inputs(8, 2, 2, 8, 8, torch.float32)
    try:
        out = ring_attention(q, k, v, group=sub, is_causal=True)  # rank 0: a ring of one
        return "ok", _rel(out, attnkit.reference_attention(q, k, v, is_causal=True))
    except attnkit.AttentionInputError as e:
        return "error", str(e)


def task_subgroups(rank, world):
    """Two rings at once, {0, 1} and {2, 3}: peers are mapped to global ranks."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    q, k, v, do = _inputs(16, 4, 2, 24, 24, torch.float32, seed=rank // 2)
    local = [shard(t, group=mine).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, group=mine, is_causal=True)
    out.backward(shard(do, group=mine))
    full = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attnkit.reference_attention(*full, is_causal=True)
    ref.backward(do.double())
    errs = [_rel(unshard(out, group=mine), ref)]
    return errs + [_rel(unshard(t.grad, group=mine), f.grad) for t, f in zip(local, full)]


def task_stats(rank, world):
    q, k, v, do = _inputs(8 * world, 4, 2, 16, 8, torch.float32)
    local = [shard(t).requires_grad_() for t in (q, k, v)]
    with ring_stats() as prof:
        ring_attention(*local, is_causal=True).backward(shard(do))
    kv_bytes = (local[1].numel() + local[2].numel()) * 4
    return prof.forward.as_dict(), prof.backward.as_dict(), kv_bytes


def task_positions(rank, world):
    return shard_positions(4 * world).tolist(), shard_positions(2 * world, layout="contiguous").tolist()


def task_module(rank, world, causal):
    """attnkit.patch-style use: a Transformer layer run context-parallel, outputs and
    parameter gradients (summed over ranks) equal to the single-process model's."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(24, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 8 * world, 24)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if causal else None
    ref = layer(x, src_mask=mask, is_causal=causal)
    w = torch.randn(ref.shape)  # a loss whose gradient does not cancel (sum of squares after LayerNorm would)
    (ref * w).sum().backward()
    want = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    with context_parallel(layer) as handle:
        assert isinstance(next(m for _, m in handle.modules()).method, RingAttention)
        out = layer(shard(x, dim=1), is_causal=causal) if causal else layer(shard(x, dim=1))
        (out * shard(w, dim=1)).sum().backward()
    errs = [_rel(unshard(out.detach(), dim=1), ref)]
    for name, p in layer.named_parameters():
        dist.all_reduce(p.grad)
        errs.append(_rel(p.grad, want[name]))
    return max(errs)


# -- tests ---------------------------------------------------------------------------------------

CASES = [
    # (batch, Hq, Hkv, chunk per rank, D, Dv, causal, layout)
    ((2,), 2, 2, 6, 24, 24, False, "zigzag"),
    ((2,), 4, 2, 6, 40, 40, True, "zigzag"),
    ((1,), 6, 2, 5, 24, 16, True, "contiguous"),
    ((), 3, 1, 4, 40, 24, True, "zigzag"),
    ((2, 3), 2, 1, 4, 8, 8, False, "contiguous"),
]


def _case_id(c):
    batch, hq, hkv, chunk, d, dv, causal, layout = c
    b = "x".join(map(str, batch)) or "none"
    h = f"{hq}x{hkv}" if hq != hkv else str(hq)
    return f"B{b}-H{h}-C{chunk}-D{d}-Dv{dv}" + (f"-causal-{layout}" if causal else "")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference(pools, world, case, dtype):
    batch, hq, hkv, chunk, d, dv, causal, layout = case
    results = pools(world).values(task_against_reference, chunk * world, hq, hkv, d, dv, dtype, causal, layout, batch)
    for errs in results:  # every rank unshards the same full tensors
        assert errs[0] <= REL_TOL[dtype], f"out: {errs[0]:.2e}"
        for name, e in zip(("dq", "dk", "dv"), errs[1:]):
            assert e <= GRAD_REL_TOL[dtype], f"{name}: {e:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_low_precision(pools, dtype, causal):
    for err, naive, scale in pools(2).values(task_lowp, dtype, causal):
        assert err <= LOWP_FACTOR * naive + LOWP_FLOOR * scale


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck(pools, causal):
    assert all(pools(2).values(task_gradcheck, causal))


BAD = {
    # case: (what the message must say, the argument it names)
    "length": ("differs across ranks", "argument 'q'"),
    "dtype": ("differs across ranks", "argument 'q'"),
    "heads": ("on rank 1", "k.shape[-3]"),
    "odd": ("divisible by 2P = 4", "argument 'q'"),
    "causal": ("differs across ranks", "is_causal"),
    "grad": ("differs across ranks", "gradient"),
    "group": ("ProcessGroup", "argument 'group'"),
    "layout": ("['zigzag', 'contiguous']", "argument 'layout'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_setup_fails_alike_on_every_rank(pools, case):
    results = pools(2).values(task_bad, case)
    failures = [failure for failure, _ in results]
    assert all(f is not None for f in failures), failures
    assert len(set(failures)) == 1, failures  # the same error on every rank
    kind, message = failures[0]
    assert kind == "AttentionInputError"
    for words in BAD[case]:
        assert words in message, message
    assert all(ok for _, ok in results)  # and nothing hangs or breaks afterwards


def test_shard_needs_divisible_length(pools):
    for errors in pools(2).values(task_shard_errors):
        assert len(errors) == 2
        assert "argument 'x' has 13 positions" in errors[0] and "4 equal chunks" in errors[0]
        assert "2 equal chunks" in errors[1]


def test_group_not_member(pools):
    (status0, err0), (status1, msg1) = pools(2).values(task_not_member)
    assert status0 == "ok" and err0 <= REL_TOL[torch.float32]
    assert status1 == "error" and "argument 'group'" in msg1 and "not a member" in msg1


def test_two_rings_in_subgroups(pools):
    for errs in pools(4).values(task_subgroups):
        assert max(errs) <= GRAD_REL_TOL[torch.float32]


def test_stats_count_bytes_and_waits(pools):
    for fwd, bwd, kv_bytes in pools(2).values(task_stats):
        assert fwd["calls"] == bwd["calls"] == 1 and fwd["steps"] == bwd["steps"] == 2
        assert fwd["bytes_sent"] == kv_bytes  # P - 1 = 1 transfer of k and v
        assert bwd["bytes_sent"] == kv_bytes + 2 * kv_bytes  # k, v once; fp32 dk, dv twice
        assert 0 <= fwd["wait_s"] <= fwd["total_s"] and 0 < fwd["compute_s"] <= fwd["total_s"]


def test_shard_unshard_orders():
    x = torch.arange(8)
    assert shard(x, dim=0, rank=0, world_size=2).tolist() == [0, 1, 6, 7]
    assert shard(x, dim=0, rank=1, world_size=2).tolist() == [2, 3, 4, 5]
    assert shard(x, dim=0, rank=1, world_size=2, layout="contiguous").tolist() == [4, 5, 6, 7]
    with pytest.raises(attnkit.AttentionInputError, match="argument 'rank'"):
        shard(x, dim=0, rank=2, world_size=2)


def test_positions(pools):
    assert pools(2).values(task_positions) == [([0, 1, 6, 7], [0, 1]), ([2, 3, 4, 5], [2, 3])]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_context_parallel_module(pools, causal):
    assert max(pools(2).values(task_module, causal)) <= 1e-4


def test_without_process_group():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(attnkit.AttentionInputError, match="argument 'group': torch.distributed is not initialized"):
        ring_attention(q, q, q)


def test_method_refuses_masks_and_kv_cache():
    from attnkit.core.inputs import prepare_inputs

    m = RingAttention()
    q = torch.zeros(1, 2, 4, 8)
    assert any("attn_mask" in r for r in m.not_supported_reasons(prepare_inputs(q, q, q, torch.ones(4, 4, dtype=torch.bool))))
    assert any("N=4 queries but S=6" in r for r in m.not_supported_reasons(prepare_inputs(q, torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8))))
    assert m.spec() == "ring:layout=zigzag"
    with pytest.raises(ValueError, match="layout"):
        RingAttention(layout="stripes")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_sequence(pools, causal):
    for errs in pools(4).values(task_against_reference, 1024, 4, 2, 64, 64, torch.float32, causal, "zigzag", (1,)):
        assert errs[0] <= REL_TOL[torch.float32] and max(errs[1:]) <= GRAD_REL_TOL[torch.float32]

