"""Value channels held apart from a :class:`~attnkit.cache.QuantizedCache`'s per-token value groups.

Values are quantized per token over groups of Gv channels: the group's range, set by its
two extreme channels, fixes the step of all the others (range / 3 at 2 bits), and the
squared error grows with the squared range.  The channels that most often set the range
are few and fixed per (layer, kv head), as key outlier channels are:
:func:`attnkit.cache.key_bit_plan` (``value_channels=k``) picks each kv head's k channels
whose removal most shrinks the mean squared range of the per-token groups over the
calibration tokens (greedily, :func:`range_channels`).  The cache holds them apart, as
4-bit codes per channel over groups of G value rows with an fp16 scale and low each (as
keys are quantized), and quantizes the rest per token with those channels' slots set
inside the rest's range, so that the groups' ranges shrink.  The slots stay in the packed
rows (a placeholder code: the layout and the products stay as they are; with Gv = 64 at 2
bits, 63 codes take the same 16 bytes as 64), and every read of the values overwrites
their columns with the held-apart ones.  Cost: k·(4 + 32/G) bits per kv head and token,
4.5 bits (0.035 bits per cached number for D = Dv = 64) for k = 1 and G = 64.

Development checks on SmolLM2 (2-bit cache with the key plan, sinks=4, Mansfield Park at
8192 tokens, the key widths paying for the channels; benchmarks/results/cache_cpu.md): the
channel of largest max |v| (the first rule tried) shrinks the calibration's mean squared
range by 8%, the greedy rule's by 13%; perplexity +5.25% against +4.67% (8-bit codes both;
+6.01% with no channel apart); 4-bit codes +4.58% (their error per number is 5% of a 2-bit
per-token group's), +4.44% with the key widths not paying (:func:`key_bit_plan`'s default);
the channel kept exact instead of 8-bit +5.21% against +5.25%.

Held per layer (B batch, H kv heads, k channels, G group, Lv packed value rows, nA =
floor(Lv/G) groups apart): ``value_apart_codes`` (B, H, nA, k, G/2) uint8 (two 4-bit codes
a byte), ``value_apart_scale``/``value_apart_low`` (B, H, nA, k) fp16,
``value_apart_residual`` (B, H, Lv − nA·G, k) in the model's dtype (the rows still waiting
for their group).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native
from .quant import dequantize, fused, quantize_packed, unpack

__all__ = ["APART_BITS", "ValueChannels", "range_channels"]

APART_BITS = 4
INF = float("inf")


def range_channels(v: Tensor, count: int, group: int) -> Tensor:
    """Each kv head's ``count`` value channels whose removal most shrinks the per-token
    value groups' ranges: v (H, T, Dv) -> (H, count) long, ascending.

    Greedy: each step takes the channel minimising the mean over tokens of Σ_groups range²
    of the channels not yet taken, groups of Gv = min(group, Dv) channels as the cache
    forms them.  A channel changes its group's range only where it is the maximum or the
    minimum, so each step needs the two largest and two smallest of each group.

    Equivalent to (one step)::

        cost[c] = mean_t Σ_groups (max − min over the group's channels not in taken ∪ {c})²
    """
    h, _, dv = v.shape
    gv = min(group, dv)
    pad = -dv % gv
    x = torch.nn.functional.pad(v.float(), (0, pad))  # (H, T, ng·Gv)
    taken = torch.zeros(h, dv, dtype=torch.bool, device=v.device)
    for _ in range(count):
        out = torch.nn.functional.pad(taken, (0, pad), value=True)[:, None]  # (H, 1, ng·Gv): taken and padding
        # one ±inf column more per group, so that two largest / smallest always exist
        hi = torch.nn.functional.pad(x.masked_fill(out, -INF).unflatten(-1, (-1, gv)), (0, 1), value=-INF)
        lo = torch.nn.functional.pad(x.masked_fill(out, INF).unflatten(-1, (-1, gv)), (0, 1), value=INF)
        top, bot = hi.topk(2, dim=-1), lo.topk(2, dim=-1, largest=False)  # (H, T, ng, 2)
        hi_without = top.values[..., :1].expand_as(hi).scatter(-1, top.indices[..., :1], top.values[..., 1:])
        lo_without = bot.values[..., :1].expand_as(lo).scatter(-1, bot.indices[..., :1], bot.values[..., 1:])
        now = _finite(top.values[..., :1] - bot.values[..., :1])  # (H, T, ng, 1); a group with no channel: 0
        gain = (_finite(hi_without - lo_without).pow(2) - now.pow(2)).mean(1)  # (H, ng, Gv+1)
        gain = gain[..., :gv].flatten(-2)[:, :dv].masked_fill(taken, INF)  # (H, Dv)
        taken[torch.arange(h), gain.argmin(-1)] = True
    return taken.nonzero()[:, 1].view(h, count)


def _finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


class ValueChannels:
    """How one layer holds its value channels apart: ``channels`` (H, k) distinct channel
    indices per kv head."""

    _NAMES = ("value_apart_codes", "value_apart_scale", "value_apart_low", "value_apart_residual")

    def __init__(self, channels: Tensor, group: int):
        if channels.dim() != 2 or channels.shape[1] == 0 or bool((channels < 0).any()) or any(
                len(set(row)) != len(row) for row in channels.tolist()):
            raise ValueError(
                f"QuantizedCache: argument 'key_bits': each layer's 'value_channels' must be (kv heads, k) distinct "
                f"channel indices >= 0, k >= 1, got shape {tuple(channels.shape)}: {channels.tolist()}")
        self.index = channels.long()  # (H, k): int64, as scatter takes it; counted by nbytes()
        self.heads, self.count = channels.shape
        self.group = group

    def names(self) -> list[str]:
        return list(self._NAMES)

    def nbytes(self) -> int:
        return self.index.nbytes

    def empty(self, like: Tensor) -> dict[str, Tensor]:
        """The held tensors, empty, for values like ``like`` (B, H, ·, Dv)."""
        b, h, _, dv = like.shape
        if h != self.heads or int(self.index.max()) >= dv:
            raise ValueError(
                f"QuantizedCache: argument 'key_bits': its 'value_channels' were fitted for {self.heads} kv heads "
                f"(channels up to {int(self.index.max())}), but this layer's values have {h} heads of dim {dv}: fit a "
                f"plan for this model (attnkit.cache.key_bit_plan)")
        kw = {"device": like.device}
        width = -(-self.group * APART_BITS // 8)
        return {"value_apart_codes": torch.empty(b, h, 0, self.count, width, dtype=torch.uint8, **kw),
                "value_apart_scale": torch.empty(b, h, 0, self.count, dtype=torch.float16, **kw),
                "value_apart_low": torch.empty(b, h, 0, self.count, dtype=torch.float16, **kw),
                "value_apart_residual": like.new_empty(b, h, 0, self.count)}

    def _gather_index(self, x: Tensor) -> Tensor:
        """The channel indices broadcast to x (B, H, L, ·): (B, H, L, k)."""
        return self.index.to(x.device)[None, :, None].expand(*x.shape[:-1], self.count)

    def exclude(self, v: Tensor, gv: int) -> Tensor:
        """v (B, H, L, Dv) with the held-apart channels set to the least of the other
        channels of their value group (code 0 of its range; 0 where a group has no other)."""
        dv = v.shape[-1]
        apart = self._mask(dv, v.device)  # (H, 1, Dv), broadcast over batch and rows
        rest = v.masked_fill(apart, INF)
        if dv == gv:  # one group per token (decoding's common case): no padding, no repeat
            return torch.where(apart, _finite(rest.amin(-1, keepdim=True)), v)
        lo = torch.nn.functional.pad(rest, (0, -dv % gv), value=INF).unflatten(-1, (-1, gv)).amin(-1)  # (B, H, L, ng)
        lo = _finite(lo).repeat_interleave(gv, dim=-1)[..., :dv]
        return torch.where(apart, lo, v)

    def _mask(self, dv: int, device) -> Tensor:
        """(H, 1, Dv) bool, True at the held-apart channels (made per call: not held)."""
        m = torch.zeros(self.heads, dv, dtype=torch.bool, device=device)
        return m.scatter_(-1, self.index.to(device), True)[:, None]

    def append(self, held: dict[str, Tensor], v: Tensor) -> dict[str, Tensor]:
        """The held tensors that change when value rows v (B, H, L, Dv) are added: their
        channels join the residual, and every full group of G rows there is quantized."""
        res = held["value_apart_residual"]
        res = torch.cat([res, v.gather(-1, self._gather_index(v)).to(res.dtype)], dim=-2)  # (B, H, ·, k)
        n = res.shape[-2] // self.group
        out = {"value_apart_residual": res}
        if n:
            x = res[:, :, : n * self.group].float().unflatten(2, (n, self.group)).transpose(-1, -2)  # (B, H, n, k, G)
            codes, s, low = quantize_packed(x, APART_BITS)
            for name, t in (("value_apart_codes", codes), ("value_apart_scale", s), ("value_apart_low", low)):
                out[name] = torch.cat([held[name], t], dim=2)
            out["value_apart_residual"] = res[:, :, n * self.group :].clone()  # clone: free the old storage
        return out

    def rows(self, held: dict[str, Tensor], t0: int, t1: int) -> Tensor:
        """The held-apart channels of value rows [t0, t1): (B, H, t1−t0, k) fp32, only the
        groups those rows touch dequantized."""
        g = self.group
        na = held["value_apart_codes"].shape[2] * g
        parts = []
        if t0 < na:
            g0, g1 = t0 // g, -(-min(t1, na) // g)
            codes = unpack(held["value_apart_codes"][:, :, g0:g1], APART_BITS, g)
            x = dequantize(codes, held["value_apart_scale"][:, :, g0:g1], held["value_apart_low"][:, :, g0:g1])  # (B, H, ·, k, G)
            parts.append(x.transpose(-1, -2).flatten(2, 3)[:, :, t0 - g0 * g : min(t1, na) - g0 * g])
        if t1 > na or not parts:
            parts.append(held["value_apart_residual"][:, :, max(t0, na) - na : max(t1 - na, 0)].float())
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def product(self, held: dict[str, Tensor], p: Tensor, t0: int, t1: int) -> Tensor:
        """p (B, H, M, t1−t0) times the held-apart channels of value rows [t0, t1): (B, H, M, k).
        Where the rows reach the packed groups' end and the C kernel fits (decoding), straight
        from the codes (:func:`attnkit.cache.native.dq_rowdot`) plus the waiting rows; else
        ``p @`` :meth:`rows`."""
        codes = held["value_apart_codes"]
        na = codes.shape[2] * self.group
        if t0 <= na <= t1 and fused(p, codes, APART_BITS):
            out = native.dq_rowdot(p, codes, APART_BITS, held["value_apart_scale"], held["value_apart_low"], start=t0)
            if t1 > na:
                out += torch.matmul(p[..., na - t0 :], held["value_apart_residual"][:, :, : t1 - na].float())
            return out
        return torch.matmul(p, self.rows(held, t0, t1))

    def put(self, out: Tensor, x: Tensor) -> Tensor:
        """out (B, H, M, Dv) with the held-apart channels' columns replaced by x (B, H, M, k)."""
        return out.scatter(-1, self._gather_index(out), x)
