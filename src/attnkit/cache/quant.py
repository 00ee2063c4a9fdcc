"""Group-wise asymmetric integer quantization with really packed codes.

A group of G numbers ``x`` (the last dim) is stored as ``bits``-bit codes ``c`` plus one
fp16 ``scale`` and one fp16 ``low`` (the zero point, kept as the value that code 0
means), and read back as ``x̂ = low + c·scale``:

    low   = fp16(lo), rounded down so that low <= lo
    scale = fp16((hi − low) / (2^bits − 1)), rounded up so that hi <= low + qmax·scale
    c     = clamp(round((x − low) / scale), 0, qmax)

With min-max scaling ``[lo, hi] = [min x, max x]``, so every x lies in the representable
range and ``|x − x̂| <= scale/2`` (up to fp32 rounding).  Why an fp16 low and not an
integer zero point: KV channels carry offsets far from 0 (a key channel may hold values in
[5, 6] for a whole group), and an integer zero point in code units must keep 0 inside
the range, or else overflow its integer type -- an fp16 low has neither problem, for
2 bytes.

``scale="search"`` (adaptive) clips the range: it tries ``lo' = lo + a·(hi − lo)``,
``hi' = hi − b·(hi − lo)`` for a, b in {0, 0.05, …, 0.25} (so the range shrinks from 1.0
down to 0.5 of min-max's, at either end independently: an outlier on one side is cut
without moving the other) and keeps, per group, the pair with the least squared error
of the group.  (a, b) = (0, 0) is min-max itself, so the search's error is never larger.

Codes are packed along the last dim, ``8 // bits`` per byte, "planar": a row of L codes
is padded with zeros to ``L' = k·ceil(L/k)`` and byte j holds codes j, j + L'/k, …, in
bit slots 0, bits, 2·bits, …; :func:`unpack_bytes` takes every byte's slots apart in
whole-tensor passes (byte-major order), which the fast paths multiply as they are and
:func:`unpack` puts back in code order (:func:`code_order`).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from . import native

__all__ = ["BITS", "SCALES", "code_matmul", "code_order", "dequantize", "fused", "quantize_packed", "pack", "quantize", "unpack", "unpack_bytes"]

BITS = (2, 4, 8)
SCALES = ("minmax", "search")
_CLIP = tuple(i * 0.05 for i in range(6))  # fraction of the range cut at each end
_FP16_MIN_SCALE = 2.0**-14  # smallest normal fp16: a constant group still gets a finite scale


def _check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"argument 'bits': expected one of {BITS}, got {bits!r}")
    return 8 // bits


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in [0, 2^bits) along the last dim, ``8 // bits`` codes per byte.

    Args:
        codes: (..., L) uint8, every entry < 2^bits.
        bits: 2, 4 or 8.

    Returns:
        (..., ceil(L·bits/8)) uint8 (planar layout: see the module docstring).
    """
    per = _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"argument 'codes': expected uint8 codes, got {codes.dtype}")
    if per == 1:
        return codes.contiguous()
    length = codes.shape[-1]
    row = -(-length // per)
    if row * per != length:
        codes = torch.nn.functional.pad(codes, (0, row * per - length))
    parts = codes.split(row, dim=-1)  # per × (..., row)
    out = parts[0].clone()
    for slot in range(1, per):
        out |= parts[slot] << (bits * slot)
    return out


def unpack(packed: Tensor, bits: int, length: int, dtype: torch.dtype = torch.uint8) -> Tensor:
    """Inverse of :func:`pack`: (..., ceil(length·bits/8)) uint8 -> (..., length) codes in ``dtype``."""
    per = _check_bits(bits)
    if per == 1:
        out = packed[..., :length]
        return out if dtype == torch.uint8 else out.to(dtype)
    return code_order(unpack_bytes(packed, bits, dtype).flatten(-2), per)[..., :length]


def _words(packed: Tensor) -> Tensor | None:
    """packed (..., W) uint8 viewed as (..., W/4) int32 words, byte b of a word its bits
    8b..8b+7; None where the rows do not allow it (W not a multiple of 4, storage not
    4-byte aligned, a big-endian machine)."""
    if sys.byteorder != "little" or packed.shape[-1] % 4:
        return None
    try:
        return packed.view(torch.int32)
    except RuntimeError:  # not aligned to 4 bytes
        return None


def unpack_bytes(packed: Tensor, bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Every code of :func:`pack`'s layout, byte by byte: (..., W) uint8 -> (..., W, k) in
    ``dtype`` (k = 8 // bits), where [..., j, i] is slot i of byte j, i.e. code i·W + j of
    the row.  A few whole-tensor passes over int32 words where the row allows (a broadcast
    shift, a mask and a conversion; for 4 bits two masked copies and a stack), uint8
    shifts otherwise; the fast paths multiply these as they are and reorder the (much
    smaller) products, so that the codes are never concatenated or transposed.
    """
    per = _check_bits(bits)
    if per == 1:
        return packed[..., None].to(dtype)
    mask = (1 << bits) - 1
    words = _words(packed)  # four bytes at a time: int32 shifts vectorise, uint8 ones do not
    if words is None:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (k,)
        return ((packed[..., None] >> shifts) & mask).to(dtype)
    if per == 2:  # two slots: two masked copies of the words are cheaper than a broadcast over 8 shifts
        low, high = words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F
        return torch.stack([low.view(torch.uint8), high.view(torch.uint8)], dim=-1).to(dtype)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)  # (4k,): byte-major slots
    return ((words[..., None] >> shifts) & mask).to(dtype).view(*packed.shape, per)


def code_order(x: Tensor, per: int) -> Tensor:
    """(..., W·k) in :func:`unpack_bytes`' byte-major order -> (..., k·W) in code order."""
    return x.unflatten(-1, (-1, per)).transpose(-1, -2).flatten(-2)


def code_matmul(a: Tensor, packed: Tensor, bits: int) -> Tensor:
    """``a @ codes`` without materialising the codes in code order: a (..., M, K) float,
    packed (..., K, W) uint8 rows of :func:`pack` -> (..., M, W·k) in ``a``'s dtype, column
    c the product with code c of the rows (padding codes included).

    The planar layout puts codes [i·W, (i+1)·W) in bit slot i of the W bytes, so each slot
    plane is multiplied as it lies and the k products laid side by side are in code
    order.  4 bits: the two nibble planes (a mask and a shift of the bytes), one product
    each.  2 bits: the int32 words shifted by 0, 2, 4, 6 along a new leading dim (so the
    shift and the mask run over whole contiguous tensors) leave each plane's codes in
    bytes; one batched product, the (small) products moved side by side.  Measured per
    decode block with its product (3 x 16 x 64 x 32 bytes at 4 bits, x 16 at 2): 56 us
    against 85 us + product for :func:`unpack_bytes`' int32 words and stack at 4 bits; 71
    us against 95 us at 2 bits (value blocks: 66-81 against 115-125 us).

    Where :func:`fused` holds (few fp32 rows on the CPU, the C kernel built) the product
    is :func:`attnkit.cache.native.code_matmul` instead: no code converted in memory.
    """
    per = _check_bits(bits)
    if fused(a, packed, bits):
        return native.code_matmul(a, packed, bits)
    if per == 1:
        return torch.matmul(a, packed.to(a.dtype))
    if per == 2:
        low, high = (packed & 0x0F).to(a.dtype), (packed >> 4).to(a.dtype)
        return torch.cat([torch.matmul(a, low), torch.matmul(a, high)], dim=-1)
    words = _words(packed)  # (..., K, W/4)
    if words is None:
        return code_order(torch.matmul(a, unpack_bytes(packed, bits, a.dtype).flatten(-2)), per)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device).view(per, *[1] * words.dim())
    planes = (words >> shifts).bitwise_and_(((1 << bits) - 1) * 0x01010101).view(torch.uint8)  # (k, ..., K, W)
    return torch.matmul(a, planes.to(a.dtype)).movedim(0, -2).flatten(-2)  # (k, ..., M, W) -> (..., M, k·W)


FUSED_MAX_ROWS = 64  # query rows up to which code_matmul takes the C kernel (more: MKL on converted codes wins)


def fused(a: Tensor, packed: Tensor, bits: int) -> bool:
    """Whether :func:`code_matmul` takes the compiled kernel (:mod:`attnkit.cache.native`)
    for these operands: fp32 rows on the CPU, at most FUSED_MAX_ROWS of them, no autograd,
    rows of 64, 128 or 256 codes, and the kernel built."""
    return (packed.device.type == "cpu" and a.shape[-2] <= FUSED_MAX_ROWS
            and packed.shape[-1] * (8 // bits) in native.CODES_PER_ROW and _kernel_takes(a))


def _kernel_takes(x: Tensor) -> bool:
    """What every C kernel needs of its float operand: fp32 on the CPU, no autograd, and
    the kernels built."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())
            and native.available())


def _round_down_fp16(x: Tensor) -> Tensor:
    """fp16 values <= x (x fp32), the nearest such."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, torch.nextafter(h, h.new_tensor(float("-inf"))), h)


def _round_up_fp16(x: Tensor) -> Tensor:
    """fp16 values >= x (x fp32, finite, >= smallest normal), the nearest such."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, h.new_tensor(float("inf"))), h)


def _params(lo: Tensor, hi: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """fp16 (scale, low) covering [lo, hi] with ``qmax`` steps."""
    low = _round_down_fp16(lo)
    scale = _round_up_fp16(((hi - low.float()) / qmax).clamp_min(_FP16_MIN_SCALE))
    return scale, low


def _codes(x: Tensor, scale: Tensor, low: Tensor, qmax: int) -> Tensor:
    """fp32 codes (integers in [0, qmax]) of x (..., G) for per-group scale, low (..., 1)."""
    return torch.round((x - low.float()) / scale.float()).clamp_(0, qmax)


def quantize(x: Tensor, bits: int, scale: str = "minmax") -> tuple[Tensor, Tensor, Tensor]:
    """Quantize groups along the last dim.

    Args:
        x: (..., G) float; each row along the last dim is one group.
        bits: 2, 4 or 8.
        scale: ``"minmax"`` (the range of the group) or ``"search"`` (the clipped range
            with the least squared error, see the module docstring).

    Returns:
        codes (..., G) uint8 (not packed), scale (...,) fp16, low (...,) fp16, so that
        ``x ≈ low[..., None] + codes * scale[..., None]``.

    Equivalent to (min-max)::

        low = x.amin(-1); scale = (x.amax(-1) - low) / (2**bits - 1)
        codes = round((x - low) / scale)
    """
    _check_bits(bits)
    if scale not in SCALES:
        raise ValueError(f"argument 'scale': expected one of {SCALES}, got {scale!r}")
    qmax = (1 << bits) - 1
    x = x.float()
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)  # (..., 1)
    if scale == "minmax" or x.shape[-1] == 0:
        s, low = _params(lo, hi, qmax)
        return _codes(x, s, low, qmax).to(torch.uint8), s[..., 0], low[..., 0]
    width = hi - lo
    clip = torch.tensor(_CLIP, device=x.device)
    a, b = torch.meshgrid(clip, clip, indexing="ij")  # (C, C)
    a, b = a.reshape(-1), b.reshape(-1)  # (K,) candidates; index 0 is (0, 0) = min-max
    lo_k = lo + a * width  # (..., K)
    hi_k = hi - b * width  # (..., K)
    s_k, low_k = _params(lo_k, hi_k, qmax)  # (..., K)
    c = _codes(x[..., None, :], s_k[..., None], low_k[..., None], qmax)  # (..., K, G)
    err = (low_k.float()[..., None] + c * s_k.float()[..., None] - x[..., None, :]).pow_(2).sum(-1)  # (..., K)
    best = err.argmin(dim=-1, keepdim=True)  # (..., 1): the first minimum, so ties keep min-max
    s, low = s_k.gather(-1, best), low_k.gather(-1, best)  # (..., 1)
    return _codes(x, s, low, qmax).to(torch.uint8), s[..., 0], low[..., 0]


def quantize_packed(x: Tensor, bits: int, scale: str = "minmax") -> tuple[Tensor, Tensor, Tensor]:
    """``pack(codes, bits), scale, low`` of :func:`quantize`, in one pass of the C kernel for
    min-max groups of fp32 on the CPU (bit for bit the same codes, scales and lows;
    :func:`attnkit.cache.native.quantize_rows`), else through :func:`quantize` and :func:`pack`."""
    if scale == "minmax" and x.shape[-1] and _kernel_takes(x):
        return native.quantize_rows(x, bits)
    codes, s, low = quantize(x, bits, scale)
    return pack(codes, bits), s, low


def dequantize(codes: Tensor, scale: Tensor, low: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``low + codes·scale`` in ``dtype``: codes (..., G), scale and low (...,)."""
    return torch.addcmul(low.to(dtype)[..., None], codes.to(dtype), scale.to(dtype)[..., None])
