"""Exact ring attention over ``torch.distributed``: context parallelism, forward and backward.

When one sequence no longer fits one device, each of P ranks holds a chunk of it (queries,
keys and values of N/P positions).  Keys and values then travel round the ring: at step t
rank r holds the key/value chunk of rank (r - t) mod P, computes the attention of its
queries to it with attnkit's tiled kernel (:func:`attnkit.ops.tiled.partial_attention`),
and merges the partial result into its running output through the log-sum-exp, in fp32
-- the online softmax of FlashAttention one level up.  The transfer of the next chunk
(``torch.distributed.batch_isend_irecv``) runs while the current one is computed.

Backward is the same ring again (Liu et al.'s Ring Attention; the FlashAttention-2
backward per step): the key/value chunks travel as in forward, and with each goes the
fp32 gradient accumulator of its keys and values, which every rank adds its share to and
passes on; after P steps it is back at its owner, complete.  Probabilities are recomputed
from the saved log-sum-exp, so each rank keeps O(N/P) memory: its chunk, its output and
lse, and two chunks in flight.

Causal attention with contiguous chunks gives rank P-1 P times the work of rank 0.  The
``"zigzag"`` layout balances it: the sequence is cut into 2P chunks and rank r holds
chunks r and 2P-1-r, so at every step every rank does the same half-chunk work and no
block wholly in the future is ever computed.  :func:`shard` cuts a sequence in either
layout, :func:`shard_positions` gives the global positions a rank holds (for rotary
embeddings), :func:`unshard` reassembles it.

Every call first checks, with one ``all_gather`` of a small descriptor, that all ranks
pass consistent arguments; a bad setup raises the same :class:`AttentionInputError` on
every rank, before any point-to-point transfer (so it cannot hang in one).

Shape legend: B... batch dims, Hq query heads, Hkv key/value heads (Hq % Hkv == 0),
C = N/P positions per rank, D head dim, Dv value head dim.

References:
    Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite
    Context", 2023.  Brandon et al., "Striped Attention", 2023 (load balancing);
    the zig-zag order is that of ring-flash-attention and Llama 3's context parallelism.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .core.capabilities import Capabilities, Method
from .core.inputs import AttentionInputError, AttentionInputs, prepare_inputs
from .ops.tiled import TileParams, choose_blocks, compute_dtype, partial_attention, partial_attention_backward

__all__ = [
    "LAYOUTS",
    "RingAttention",
    "RingProfile",
    "RingStats",
    "context_parallel",
    "ring_attention",
    "ring_stats",
    "shard",
    "shard_positions",
    "unshard",
]

LAYOUTS = ("zigzag", "contiguous")
NEG_INF = float("-inf")


# -- the group ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ring:
    """This rank's place in the ring: ``send_to`` / ``recv_from`` are global ranks."""

    group: object
    rank: int
    size: int
    send_to: int
    recv_from: int


def _ring(group: object) -> _Ring:
    """Validate ``group`` (locally: a broken group cannot be checked collectively)."""
    if not dist.is_available() or not dist.is_initialized():
        raise AttentionInputError(
            "argument 'group': torch.distributed is not initialized. Launch with torchrun and "
            "call torch.distributed.init_process_group('gloo' on CPU, 'nccl' on GPU) first."
        )
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise AttentionInputError(
            f"argument 'group': this process (global rank {dist.get_rank()}) is not a member of the "
            f"group (dist.new_group returned NON_GROUP_MEMBER); call this only on the group's ranks."
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise AttentionInputError(
            f"argument 'group' must be a torch.distributed ProcessGroup (e.g. from dist.new_group) or "
            f"None for the default group, got {type(group).__name__}."
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise AttentionInputError(
            f"argument 'group': this process (global rank {dist.get_rank()}) is not a member of the "
            f"group; call this only on the group's ranks."
        )
    size = dist.get_world_size(group)
    g = group if group is not None else dist.group.WORLD
    return _Ring(
        group, rank, size, dist.get_global_rank(g, (rank + 1) % size), dist.get_global_rank(g, (rank - 1) % size)
    )


def _check_layout(layout: object) -> None:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise AttentionInputError(f"argument 'layout' must be one of {list(LAYOUTS)}, got {layout!r}.")


# -- statistics (for benchmarks) --------------------------------------------------------


@dataclass
class RingStats:
    """What the ring did in one direction (forward or backward), summed over calls.

    Attributes:
        calls: ring passes.
        steps: ring steps (P per pass).
        bytes_sent: bytes this rank sent point-to-point (it receives as many).
        compute_s: seconds computing attention pieces (and merging them).
        wait_s: seconds blocked waiting for transfers: the communication that did
            *not* overlap with compute.
        total_s: seconds in the pass, from the first transfer to the result.
    """

    calls: int = 0
    steps: int = 0
    bytes_sent: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0
    total_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "calls": self.calls, "steps": self.steps, "bytes_sent": self.bytes_sent,
            "compute_s": self.compute_s, "wait_s": self.wait_s, "total_s": self.total_s,
        }


@dataclass
class RingProfile:
    """Forward and backward :class:`RingStats` of the calls inside :func:`ring_stats`."""

    forward: RingStats = field(default_factory=RingStats)
    backward: RingStats = field(default_factory=RingStats)


_PROFILE: RingProfile | None = None


@contextlib.contextmanager
def ring_stats() -> Iterator[RingProfile]:
    """Record transfer volume and wait time of the ring passes run inside the block.

    Example::

        with attnkit.distributed.ring_stats() as prof:
            ring_attention(q, k, v, is_causal=True).sum().backward()
        prof.forward.wait_s / prof.forward.total_s   # share of the pass spent waiting
    """
    global _PROFILE
    outer, _PROFILE = _PROFILE, RingProfile()
    try:
        yield _PROFILE
    finally:
        _PROFILE = outer


# -- collective validation ----------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_DIMS = 8
_TENSOR_FIELDS = 3 + _MAX_DIMS  # ndim, dtype, device type, shape
_MSG_CHARS = 480


def _describe_tensor(t: object) -> list[float]:
    if not isinstance(t, Tensor) or t.dim() > _MAX_DIMS:
        return [-1.0] * _TENSOR_FIELDS
    dtype = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)
    shape = list(t.shape) + [0] * (_MAX_DIMS - t.dim())
    return [float(t.dim()), float(dtype), float(t.device.type == "cuda"), *map(float, shape)]


def _tensor_text(row: list[float]) -> str:
    ndim, dtype, cuda = int(row[0]), int(row[1]), int(row[2])
    if ndim < 0:
        return "no tensor of at most 8 dims"
    name = str(_DTYPES[dtype]).removeprefix("torch.") if dtype < len(_DTYPES) else "a non-float dtype"
    return f"shape {tuple(int(x) for x in row[3:3 + ndim])} {name} on {'cuda' if cuda else 'cpu'}"


def _gather_rows(ring: _Ring, row: list[float], problem: str | None, device: torch.device) -> list[tuple[list[float], str]]:
    """all_gather every rank's descriptor and local problem (text, truncated)."""
    text = (problem or "").encode()[:_MSG_CHARS]
    msg = [float(len(text)), *map(float, text), *[0.0] * (_MSG_CHARS - len(text))]
    mine = torch.tensor(row + msg, dtype=torch.float64, device=device)
    rows = [torch.empty_like(mine) for _ in range(ring.size)]
    dist.all_gather(rows, mine, group=ring.group)
    out = []
    for t in rows:
        values = t.tolist()
        body, msg = values[: len(row)], values[len(row):]
        out.append((body, bytes(int(c) for c in msg[1:1 + int(msg[0])]).decode(errors="replace")))
    return out


def _comm_device(ring: _Ring) -> torch.device:
    if dist.get_backend(ring.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(ring: _Ring, fn: str, names: tuple[str, ...], tensors: tuple, flags: dict[str, object], problem: str | None):
    """Raise the same AttentionInputError on every rank unless all ranks agree.

    ``names``/``tensors``: arguments whose shape, dtype and device must match across
    ranks; ``flags``: other arguments that must match (numbers or bools, None allowed).
    """
    row = [v for t in tensors for v in _describe_tensor(t)]
    row += [math.nan if x is None else float(x) for x in flags.values()]
    gathered = _gather_rows(ring, row, problem, _comm_device(ring))
    for r, (_, text) in enumerate(gathered):
        if text:
            raise AttentionInputError(f"{fn}: on rank {r}: {text}")
    first = gathered[0][0]
    for r, (body, _) in enumerate(gathered[1:], start=1):
        for i, name in enumerate(names):
            a = first[i * _TENSOR_FIELDS:(i + 1) * _TENSOR_FIELDS]
            b = body[i * _TENSOR_FIELDS:(i + 1) * _TENSOR_FIELDS]
            if a != b:
                raise AttentionInputError(
                    f"{fn}: argument '{name}' differs across ranks: rank 0 passed {_tensor_text(a)}, rank {r} "
                    f"passed {_tensor_text(b)}. Every rank must pass its equal-size chunk of one sequence; "
                    f"cut it with attnkit.distributed.shard(x, group=group)."
                )
        base = len(names) * _TENSOR_FIELDS
        for j, key in enumerate(flags):
            a, b = first[base + j], body[base + j]
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                show = lambda x: "None" if math.isnan(x) else repr(x)
                raise AttentionInputError(
                    f"{fn}: {key} differs across ranks: rank 0 {show(a)}, rank {r} {show(b)}; every rank "
                    f"must make the same call."
                )


# -- the ring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """Everything about a ring call that is not a tensor (one object for autograd)."""

    ring: _Ring
    is_causal: bool
    layout: str
    scale: float

    def blocks(self, src: int, n: int) -> list[tuple[slice, slice, bool]]:
        """(query rows, key rows, causal) pieces this rank computes against ``src``'s chunk.

        Zig-zag: rank r holds chunks (r, 2P-1-r) of 2P.  Against its own keys the local
        causal mask is exact (chunk r precedes chunk 2P-1-r); an earlier rank's chunks
        (s, 2P-1-s) with s < r: chunk s is wholly past for both query chunks, 2P-1-s wholly
        future; a later rank's (s > r): only query chunk 2P-1-r sees them, both wholly.
        """
        rows = slice(0, n)
        if not self.is_causal:
            return [(rows, rows, False)]
        rank = self.ring.rank
        if src == rank:
            return [(rows, rows, True)]
        if self.layout == "contiguous":
            return [(rows, rows, False)] if src < rank else []  # a later chunk is wholly future
        half = n // 2
        if src < rank:
            return [(rows, slice(0, half), False)]
        return [(slice(half, n), rows, False)]

    def tile(self, qs: Tensor, nk: int, causal: bool) -> TileParams:
        lead = math.prod(qs.shape[:-2])
        block_q, block_k = choose_blocks(lead, qs.shape[-2], nk, None, None)
        return TileParams(self.scale, causal, 0.0, 0, block_q, block_k)


def _exchange(ring: _Ring, sends: tuple[Tensor, ...], recvs: tuple[Tensor, ...], stats: RingStats | None) -> list:
    """Send ``sends`` to the next rank and receive ``recvs`` from the previous one, async."""
    ops = [dist.P2POp(dist.isend, t, ring.send_to, ring.group) for t in sends]
    ops += [dist.P2POp(dist.irecv, t, ring.recv_from, ring.group) for t in recvs]
    if stats is not None:
        stats.bytes_sent += sum(t.numel() * t.element_size() for t in sends)
    return dist.batch_isend_irecv(ops)


def _wait(works: list, stats: RingStats | None) -> None:
    t0 = time.perf_counter()
    for w in works:
        w.wait()
    if stats is not None:
        stats.wait_s += time.perf_counter() - t0


class _Buffers:
    """Two receive buffers used in turn.  The caller's k, v are sent but never received
    into; the buffer received at step t is sent at step t+1 and, that send being complete
    by the end of step t+1, receives again at step t+2."""

    def __init__(self, k: Tensor, v: Tensor):
        self._k, self._v = k, v
        self._pairs: list[tuple[Tensor, Tensor]] = []
        self._turn = 0

    def next(self) -> tuple[Tensor, Tensor]:
        if len(self._pairs) < 2:
            self._pairs.append((torch.empty(self._k.shape, dtype=self._k.dtype, device=self._k.device),
                                torch.empty(self._v.shape, dtype=self._v.dtype, device=self._v.device)))
        self._turn += 1
        return self._pairs[(self._turn - 1) % 2]


def _merge(out: Tensor, lse: Tensor, o: Tensor, l: Tensor, rows: slice) -> None:
    """Fold a partial (o, l) over ``rows`` into the running (out, lse), in place, fp32."""
    out_r, lse_r = out[..., rows, :], lse[..., rows]  # views
    new = torch.logaddexp(lse_r, l)
    shift = new.masked_fill(new == NEG_INF, 0.0)  # rows with no key yet stay at zero
    out_r.mul_(torch.exp(lse_r - shift).unsqueeze(-1)).add_(o * torch.exp(l - shift).unsqueeze(-1))
    lse_r.copy_(new)


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, call: _Call) -> tuple[Tensor, Tensor]:
    """q (*b, Hkv, G, C, D), k (*b, Hkv, C, D), v (*b, Hkv, C, Dv) -> out (..., C, Dv), lse fp32."""
    ring, stats = call.ring, (_PROFILE.forward if _PROFILE is not None else None)
    t_start = time.perf_counter()
    acc = compute_dtype(q.dtype)
    qs = q.to(acc) * call.scale
    n = q.shape[-2]
    out = qs.new_zeros((*qs.shape[:-1], v.shape[-1]))
    lse = qs.new_full(qs.shape[:-1], NEG_INF)
    kv, buffers = (k.contiguous(), v.contiguous()), _Buffers(k, v)
    for step in range(ring.size):
        works, incoming = [], None
        if step + 1 < ring.size:
            incoming = buffers.next()
            works = _exchange(ring, kv, incoming, stats)
        t0 = time.perf_counter()
        for rows, cols, causal in call.blocks((ring.rank - step) % ring.size, n):
            k_c = kv[0][..., cols, :].unsqueeze(-3).to(acc)  # (*b, Hkv, 1, C', D)
            v_c = kv[1][..., cols, :].unsqueeze(-3).to(acc)
            o, l = partial_attention(qs[..., rows, :], k_c, v_c, call.tile(qs, k_c.shape[-2], causal))
            _merge(out, lse, o, l, rows)
        if stats is not None:
            stats.compute_s += time.perf_counter() - t0
            stats.steps += 1
        if works:
            _wait(works, stats)
            kv = incoming
    if stats is not None:
        stats.calls += 1
        stats.total_s += time.perf_counter() - t_start
    return out, lse


def _ring_backward(q, k, v, out, lse, dout, call: _Call) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient ring.  Same shapes as :func:`_ring_forward`; out, lse are the merged ones."""
    ring, stats = call.ring, (_PROFILE.backward if _PROFILE is not None else None)
    t_start = time.perf_counter()
    acc = compute_dtype(q.dtype)
    qs, do = q.to(acc) * call.scale, dout.to(acc)
    n = q.shape[-2]
    dq = torch.zeros_like(qs)
    kv, buffers = (k.contiguous(), v.contiguous()), _Buffers(k, v)
    dkv_works, dkv_sent, dkv_recv = [], None, None
    for step in range(ring.size):
        kv_works, incoming = [], None
        if step + 1 < ring.size:
            incoming = buffers.next()
            kv_works = _exchange(ring, kv, incoming, stats)
        t0 = time.perf_counter()
        dk = dv = None  # this step's share of dk, dv of the chunk held (*b, Hkv, 1, C, D), fp32
        for rows, cols, causal in call.blocks((ring.rank - step) % ring.size, n):
            k_c = kv[0][..., cols, :].unsqueeze(-3).to(acc)
            v_c = kv[1][..., cols, :].unsqueeze(-3).to(acc)
            dq_b, dk_b, dv_b = partial_attention_backward(
                qs[..., rows, :], k_c, v_c, out[..., rows, :], lse[..., rows], do[..., rows, :],
                call.tile(qs, k_c.shape[-2], causal),
            )
            dq[..., rows, :] += dq_b
            if dk is None and k_c.shape[-2] == n:  # the block's own result serves: no extra buffer
                dk, dv = dk_b, dv_b
                continue
            if dk is None:
                dk = torch.zeros((*k_c.shape[:-2], n, k_c.shape[-1]), dtype=acc, device=q.device)
                dv = torch.zeros((*v_c.shape[:-2], n, v_c.shape[-1]), dtype=acc, device=q.device)
            dk[..., cols, :] += dk_b
            dv[..., cols, :] += dv_b
        if dk is None:  # contiguous causal: a later chunk, wholly in the future
            dk = torch.zeros(kv[0].shape, dtype=acc, device=q.device).unsqueeze(-3)
            dv = torch.zeros(kv[1].shape, dtype=acc, device=q.device).unsqueeze(-3)
        if stats is not None:
            stats.compute_s += time.perf_counter() - t0
            stats.steps += 1
        if dkv_works:  # the accumulators of this chunk, from the previous rank
            _wait(dkv_works, stats)
            dk += dkv_recv[0]
            dv += dkv_recv[1]
        if ring.size > 1:  # pass them on; after the last step they reach their owner
            free = dkv_sent  # its send is complete (waited above): receive into it
            dkv_sent = (dk.contiguous(), dv.contiguous())
            dkv_recv = free if free is not None else tuple(torch.empty_like(t) for t in dkv_sent)
            dkv_works = _exchange(ring, dkv_sent, dkv_recv, stats)
        else:
            dkv_recv = (dk, dv)
        if kv_works:
            _wait(kv_works, stats)
            kv = incoming
    _wait(dkv_works, stats)
    del dkv_sent
    if stats is not None:
        stats.calls += 1
        stats.total_s += time.perf_counter() - t_start
    return dq, dkv_recv[0].squeeze(-3), dkv_recv[1].squeeze(-3)


class _RingAttention(torch.autograd.Function):
    """q (*b, Hkv, G, C, D), k (*b, Hkv, C, D), v (*b, Hkv, C, Dv) -> out (*b, Hkv, G, C, Dv)."""

    @staticmethod
    def forward(ctx, q, k, v, call: _Call):
        out, lse = _ring_forward(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, out, lse, dout, ctx.call)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
) -> Tensor:
    """Exact attention over a sequence split across the ranks of ``group`` (ring attention).

    Every rank of ``group`` calls this with its chunk of the sequence, cut by
    :func:`shard` (``layout`` must match); the result is this rank's chunk of
    ``attention(q_full, k_full, v_full, is_causal=is_causal)`` over the whole sequence.
    Differentiable (the gradient ring); every rank must then call backward.

    Args:
        q: (B..., Hq, C, D) this rank's queries, C = N/P.
        k: (B..., Hkv, C, D) this rank's keys (Hq % Hkv == 0: GQA sends only Hkv heads).
        v: (B..., Hkv, C, Dv) this rank's values.
        group: the process group forming the ring (None: the default group).
        is_causal: position i attends position j only if j <= i, in *global* positions.
        scale: softmax scale; default 1/sqrt(D).
        layout: how the sequence was cut, for causal attention: "zigzag" (rank r holds
            chunks r and 2P-1-r of 2P, balanced; C must be even) or "contiguous" (rank r
            holds chunk r of P).  Irrelevant when not causal.

    Returns:
        (B..., Hq, C, Dv) in q's dtype: this rank's rows of the exact attention.

    Raises:
        AttentionInputError: on every rank alike, when any rank's arguments are invalid
            or the ranks disagree (shapes, dtypes, is_causal, scale, layout, whether a
            gradient is needed); the message names the argument and the rank.  A broken
            ``group`` (wrong type, not a member, no process group) raises locally.

    Equivalent to (``unshard`` then ``shard`` around single-process attention)::

        full = [unshard(t, group=group, layout=layout) for t in (q, k, v)]
        out = shard(attnkit.attention(*full, is_causal=is_causal, scale=scale), group=group, layout=layout)
    """
    ring = _ring(group)
    problem = None
    try:
        _check_layout(layout)
        inp = prepare_inputs(q, k, v, None, 0.0, is_causal, scale)
        if k.shape[-2] != q.shape[-2]:
            raise AttentionInputError(
                f"argument 'k' has {k.shape[-2]} positions (k.shape[-2]) but 'q' has {q.shape[-2]}; ring "
                f"attention takes each rank's chunk of one sequence for queries, keys and values alike."
            )
        if is_causal and layout == "zigzag" and q.shape[-2] % 2:
            raise AttentionInputError(
                f"argument 'q' has {q.shape[-2]} positions per rank (q.shape[-2]); causal zig-zag holds two "
                f"equal chunks per rank, so the sequence length must be divisible by 2P = {2 * ring.size}. "
                f"Pad the sequence, or cut it with layout='contiguous'."
            )
    except AttentionInputError as e:
        problem = str(e)
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (q, k, v))
    flags = {
        "is_causal": is_causal if isinstance(is_causal, bool) else None,
        "scale": scale if isinstance(scale, (int, float)) else None,
        "layout": LAYOUTS.index(layout) if layout in LAYOUTS else None,
        "whether a gradient is needed (requires_grad and grad mode)": needs_grad,
    }
    _agree(ring, "ring_attention", ("q", "k", "v"), (q, k, v), flags, problem)
    hkv = k.shape[-3]
    qg = q.unflatten(-3, (hkv, q.shape[-3] // hkv))  # (B..., Hkv, G, C, D)
    out = _RingAttention.apply(qg, k, v, _Call(ring, is_causal, layout, inp.scale))
    return out.flatten(-4, -3)  # (B..., Hq, C, Dv)


# -- sharding helpers ------------------------------------------------------------------------


def _chunk_ids(rank: int, size: int, layout: str) -> tuple[int, ...]:
    return (rank, 2 * size - 1 - rank) if layout == "zigzag" else (rank,)


def _where(group, rank, world_size) -> tuple[int, int]:
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise AttentionInputError("arguments 'rank' and 'world_size' go together: give both, or neither.")
        if not 0 <= rank < world_size:
            raise AttentionInputError(f"argument 'rank' must be in [0, world_size={world_size}), got {rank}.")
        return rank, world_size
    ring = _ring(group)
    return ring.rank, ring.size


def shard(
    x: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    dim: int = -2,
    layout: str = "zigzag",
    rank: int | None = None,
    world_size: int | None = None,
) -> Tensor:
    """This rank's part of a full sequence, in the order :func:`ring_attention` expects.

    Local (no communication); differentiable.  ``rank``/``world_size`` override the
    group's (to shard without a process group, e.g. in data preparation).

    Args:
        x: (..., N, ...) the full sequence along ``dim`` (q, k, v: dim -2; token ids
            (B, N): dim -1).
        layout: "zigzag": cut into 2P chunks, rank r takes chunks r and 2P-1-r (N % 2P
            == 0); "contiguous": cut into P chunks, rank r takes chunk r (N % P == 0).

    Returns:
        x with N/P positions along ``dim`` (a view for "contiguous", a copy for "zigzag").

    Raises:
        AttentionInputError: N is not divisible by 2P (zigzag) or P, or a bad argument.
    """
    _check_layout(layout)
    r, p = _where(group, rank, world_size)
    if not isinstance(x, Tensor):
        raise AttentionInputError(f"argument 'x' must be a torch.Tensor, got {type(x).__name__}.")
    parts = 2 * p if layout == "zigzag" else p
    n = x.shape[dim]
    if n % parts:
        raise AttentionInputError(
            f"argument 'x' has {n} positions along dim {dim}, which the {layout} layout cannot cut into "
            f"{parts} equal chunks ({'2P' if layout == 'zigzag' else 'P'}, P = {p}). Pad the sequence to "
            f"a multiple of {parts}."
        )
    c = n // parts
    pieces = [x.narrow(dim, i * c, c) for i in _chunk_ids(r, p, layout)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def shard_positions(
    n: int, *, group: dist.ProcessGroup | None = None, layout: str = "zigzag",
    rank: int | None = None, world_size: int | None = None, device: torch.device | str | None = None,
) -> Tensor:
    """The global positions (N/P,) int64 this rank holds: position ids for rotary embeddings."""
    return shard(torch.arange(n, device=device), group=group, dim=0, layout=layout, rank=rank, world_size=world_size)


@torch.no_grad()
def unshard(x: Tensor, *, group: dist.ProcessGroup | None = None, dim: int = -2, layout: str = "zigzag") -> Tensor:
    """Reassemble the full sequence from every rank's part (collective: all ranks call it).

    The inverse of :func:`shard`.  Not differentiable (the result is detached): train on
    the local chunks, the loss being the sum over ranks of each rank's loss.

    Args:
        x: this rank's part, N/P positions along ``dim``.

    Returns:
        the full (..., N, ...) tensor, the same on every rank.

    Raises:
        AttentionInputError: on every rank alike, if the ranks' parts differ in shape,
            dtype or device, or ``layout`` differs.
    """
    ring = _ring(group)
    problem = None
    try:
        _check_layout(layout)
        if not isinstance(x, Tensor):
            raise AttentionInputError(f"argument 'x' must be a torch.Tensor, got {type(x).__name__}.")
        if layout == "zigzag" and x.shape[dim] % 2:
            raise AttentionInputError(
                f"argument 'x' has {x.shape[dim]} positions along dim {dim}; a zig-zag part holds two equal "
                f"chunks, so it must be even."
            )
    except (AttentionInputError, IndexError) as e:
        problem = str(e)
    flags = {"layout": LAYOUTS.index(layout) if layout in LAYOUTS else None, "dim": dim if isinstance(dim, int) else None}
    _agree(ring, "unshard", ("x",), (x,), flags, problem)
    parts = [torch.empty_like(x) for _ in range(ring.size)]
    dist.all_gather(parts, x.contiguous(), group=ring.group)
    if layout == "contiguous":
        return torch.cat(parts, dim=dim)
    c = x.shape[dim] // 2
    chunks: list[Tensor | None] = [None] * (2 * ring.size)
    for r, part in enumerate(parts):
        for j, i in enumerate(_chunk_ids(r, ring.size, layout)):
            chunks[i] = part.narrow(dim, j * c, c)
    return torch.cat(chunks, dim=dim)


# -- as an attention method (for attnkit.patch) ------------------------------------------------


@dataclass(frozen=True)
class RingAttention(Method):
    """Context-parallel exact attention as a method config, for modules and :func:`attnkit.patch`.

    Each rank runs the model on its chunk of the sequence (cut with :func:`shard`, and
    position ids from :func:`shard_positions`); every attention layer becomes
    :func:`ring_attention` over ``group``.  Not in the registry (``method="auto"`` never
    picks it): pass the object, e.g. ``attnkit.patch(model, RingAttention(group))``.

    Args:
        group: the process group (None: the default group).
        layout: "zigzag" or "contiguous", as the inputs were cut.
    """

    group: object = None
    layout: str = "zigzag"

    name: ClassVar[str] = "ring"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=True, mask_kinds=(), causal_with_mask=False, dropout=False, returns_weights=False
    )

    def __post_init__(self):
        self.check_choice("layout", LAYOUTS)
        if self.group is not None and not isinstance(self.group, dist.ProcessGroup):
            raise ValueError(
                f"RingAttention(group={self.group!r}): group must be a torch.distributed ProcessGroup or None"
            )

    def not_supported_reasons(self, inp: AttentionInputs, *, need_weights: bool = False) -> list[str]:
        reasons = super().not_supported_reasons(inp, need_weights=need_weights)
        if inp.n != inp.s:
            reasons.append(
                f"N={inp.n} queries but S={inp.s} keys: context parallelism splits one sequence, so each "
                f"rank's queries and keys are the same positions (no KV cache, no cross-attention)"
            )
        return reasons

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        out = ring_attention(inp.q, inp.k, inp.v, group=self.group, is_causal=inp.is_causal, scale=inp.scale, layout=self.layout)
        return out, None

    def spec(self) -> str:
        return f"ring:layout={self.layout}"  # a process group has no command-line form


def context_parallel(model: torch.nn.Module, group: dist.ProcessGroup | None = None, *, layout: str = "zigzag", layers=None):
    """Run every attention layer of ``model`` context-parallel over ``group``.

    Same as ``attnkit.patch(model, RingAttention(group, layout), layers=layers)``; the
    returned handle undoes it.  Feed each rank its :func:`shard` of the inputs (and
    :func:`shard_positions` as position ids); outputs are this rank's chunk.
    """
    from .patch import patch  # patch imports the modules; keep this module light to import

    if layout == "zigzag":
        return patch(model, "auto", layers=layers, context_parallel="world" if group is None else group)
    return patch(model, RingAttention(group=group, layout=layout), layers=layers)
