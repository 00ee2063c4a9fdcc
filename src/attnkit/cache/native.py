"""Small C kernels for the packed codes, compiled on first use.

Decoding reads every cached code once per token and layer with a handful of query rows.
In eager PyTorch that means converting every code to fp32 (as many bytes written as the
fp32 cache holds) and some 60 small operators per layer.  These kernels work from the
packed bytes instead, each row of codes unpacked into SIMD registers and multiplied there:

* :func:`dq_matmul` -- ``a @ (low + scale · codes)`` for per-row scales (key groups against
  query rows, probabilities against value rows), written into a strided view;
* :func:`plan_scores` -- a key plan's scores, every group in one call;
* :func:`dq_rowdot` -- the transposed product (value channels held apart, per channel over
  groups of tokens);
* :func:`quantize_rows` -- min-max quantization and packing, bit for bit as
  :func:`attnkit.cache.quant.quantize` + :func:`~attnkit.cache.quant.pack`.

They are built with the system's C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into
``$ATTNKIT_CACHE/kernels`` (default ``~/.cache/attnkit/kernels``) the first time they are
needed, keyed by a hash of the source, flags and CPU, and loaded with ctypes: no Python
headers, no build of torch extensions.  Where no compiler works, or with
``ATTNKIT_KERNELS=0``, :func:`available` is False and the cache keeps its PyTorch path
(:mod:`attnkit.cache.quant`); :func:`status` says which.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

__all__ = ["CODES_PER_ROW", "available", "code_matmul", "dq_matmul", "dq_rowdot", "plan_scores", "quantize_rows", "status"]

CODES_PER_ROW = (64, 128, 256)  # the row lengths the kernel is built for (group sizes / head dims)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* GCC/Clang vector extensions: 16 lanes, compiled to whatever SIMD -march allows. */
typedef float v16f __attribute__((vector_size(64)));
typedef float v16fu __attribute__((vector_size(64), aligned(4)));  /* unaligned stores */
typedef int32_t v16i __attribute__((vector_size(64)));

/* 16 bytes -> 16 int32 lanes (one vpmovzxbd where the machine has it). */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline v16i load16(const uint8_t *p) { return (v16i)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
#elif defined(__AVX2__)
#include <immintrin.h>
static inline v16i load16(const uint8_t *p) {
    __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    v16i r;
    memcpy(&r, &lo, 32);
    memcpy((char *)&r + 32, &hi, 32);
    return r;
}
#else
static inline v16i load16(const uint8_t *p) {
    v16i r;
    for (int i = 0; i < 16; i++) r[i] = p[i];
    return r;
}
#endif

/* A row of W bytes (W % 16 == 0) in attnkit.cache.quant.pack's planar layout (slot s of
   byte j is code s*W + j) -> its W*8/bits codes in code order, as W*8/bits/16 vectors.
   Inlined with constant w and bits in the kernels below, so the loops unroll. */
static inline void unpack_row(const uint8_t *row, int64_t w, int bits, v16f *c) {
    const v16i mask = (v16i){} + ((1 << bits) - 1);
    for (int64_t q = 0; q < w / 16; q++) {
        const v16i b = load16(row + 16 * q);
        for (int s = 0; s < 8 / bits; s++) c[(s * w) / 16 + q] = __builtin_convertvector((b >> (s * bits)) & mask, v16f);
    }
}

/* fp16 <-> fp32 in integer arithmetic (IEEE binary16, round to nearest even), so that the
   results match torch's conversions bit for bit on any compiler. */
static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (e == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalise */
            int shift = -1;
            do { shift++; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(112 - shift) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (e == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((e + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));  /* inf, nan */
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  /* >= 65520 rounds to inf */
    if (ax < 0x38800000) {  /* below 2^-14: a subnormal (or 0), in steps of 2^-24 */
        float af;
        memcpy(&af, &ax, 4);
        float q = af * 16777216.0f;  /* exact: a power of two */
        float r = (float)(int32_t)q, frac = q - r;  /* q < 1024 */
        if (frac > 0.5f || (frac == 0.5f && ((int32_t)r & 1))) r += 1.0f;
        return (uint16_t)(sign | (uint32_t)r);
    }
    uint32_t h = ((ax >> 23) - 112) << 10 | ((ax & 0x7fffff) >> 13);
    const uint32_t rest = ax & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;  /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
}

static inline uint16_t h_next(uint16_t h, int up) {  /* torch.nextafter(h, +-inf) in fp16 */
    if ((h & 0x7fff) > 0x7c00) return h;
    if ((h & 0x7fff) == 0) return up ? 0x0001 : 0x8001;
    if ((h & 0x7fff) == 0x7c00 && ((h >> 15) ^ up)) return h;  /* inf towards itself */
    return (uint16_t)((((h >> 15) & 1) ^ up) ? h + 1 : h - 1);
}

/* What one call multiplies: for each item n < N (the batch, flattened) and query row
   m < M,  out[n, m, c] = sum_{k0 <= k < K} a[n, m, k] * (low[n, k] + scale[n, k] * code(codes[n, k], c)),
   c < C = W*8/bits: ``a @ dequantize(codes)`` with the rows' scales and lows folded in.
   codes (N, K, W) uint8 in attnkit.cache.quant.pack's planar layout (slot s of byte j is
   code s*W + j), scale and low (N, K) fp16 or NULL (1 and 0), all contiguous.  a and out
   are strided views: item n starts at (n / div) * s0 + (n % div) * s1, row m m * sm
   further, K (a) and C (out) contiguous -- so the key groups of one head share its query
   rows, and their scores land side by side in token order. */
typedef struct {
    const float *a;
    int64_t a_s0, a_s1, a_m;
    const uint8_t *codes;
    const uint16_t *scale, *low;
    float *out;
    int64_t o_s0, o_s1, o_m;
    int64_t n, div, m, k, k0, w;
    int64_t bits;
} dq_args;

/* One kernel per (BITS, NV): rows of NV*16 codes (W = NV*2*BITS bytes), MB query rows
   accumulated in registers over all K code rows, each code row unpacked once per block of
   MB query rows and skipped where those rows' weights are all zero (the stacked key plan's
   rows of other heads). */
#define KERNEL(BITS, NV, MB)                                                                    \
static void kernel_##BITS##_##NV(const dq_args *p) {                                            \
    enum { W = NV * 2 * BITS };                                                                 \
    const int64_t m_ = p->m, k_ = p->k;                                                         \
    for (int64_t n = 0; n < p->n; n++) {                                                        \
        const uint8_t *cn = p->codes + n * k_ * W;                                              \
        const uint16_t *sn = p->scale ? p->scale + n * k_ : 0, *zn = p->low ? p->low + n * k_ : 0; \
        const float *an = p->a + (n / p->div) * p->a_s0 + (n % p->div) * p->a_s1;              \
        float *on = p->out + (n / p->div) * p->o_s0 + (n % p->div) * p->o_s1;                   \
        for (int64_t m0 = 0; m0 < m_; m0 += MB) {                                               \
            const int mb = (int)(m_ - m0 < MB ? m_ - m0 : MB);                                  \
            const float *am[MB];                                                                \
            for (int i = 0; i < MB; i++) am[i] = an + (m0 + (i < mb ? i : 0)) * p->a_m;         \
            v16f acc[MB][NV];                                                                   \
            float lsum[MB];                                                                     \
            for (int i = 0; i < MB; i++) {                                                      \
                lsum[i] = 0.0f;                                                                 \
                for (int v = 0; v < NV; v++) acc[i][v] = (v16f){};                              \
            }                                                                                   \
            for (int64_t k = p->k0; k < k_; k++) {                                              \
                float x[MB];                                                                    \
                int any = 0;                                                                    \
                for (int i = 0; i < MB; i++) { x[i] = i < mb ? am[i][k] : 0.0f; any |= x[i] != 0.0f; } \
                if (!any) continue;                                                             \
                const float s = sn ? h2f(sn[k]) : 1.0f, z = zn ? h2f(zn[k]) : 0.0f;             \
                for (int i = 0; i < MB; i++) { lsum[i] += x[i] * z; x[i] *= s; }                \
                const uint8_t *row = cn + k * W;                                                \
                v16f c[NV];                                                                     \
                unpack_row(row, W, BITS, c);                                                    \
                for (int i = 0; i < MB; i++)                                                    \
                    for (int v = 0; v < NV; v++) acc[i][v] += x[i] * c[v];                      \
            }                                                                                   \
            for (int i = 0; i < MB; i++)  /* constant indices: acc stays in registers */         \
                if (i < mb)                                                                     \
                    for (int v = 0; v < NV; v++)                                                \
                        ((v16fu *)(on + (m0 + i) * p->o_m))[v] = acc[i][v] + lsum[i];           \
        }                                                                                       \
    }                                                                                           \
}

KERNEL(2, 4, 4) KERNEL(4, 4, 4) KERNEL(8, 4, 4)
KERNEL(2, 8, 2) KERNEL(4, 8, 2) KERNEL(8, 8, 2)
KERNEL(2, 16, 1) KERNEL(4, 16, 1) KERNEL(8, 16, 1)

/* The transposed product, for value channels held apart (codes per channel over groups of
   C tokens): out[n, m, j] = sum over groups g < nG and positions c < C of token
   t = g*C + c >= t0 of  p[n, m, t - t0] * (low[n, g, j] + scale[n, g, j] * code(codes[n, g, j], c))
   (p's column 0 is token t0).
   codes (N, nG, J, W) uint8, scale and low (N, nG, J) fp16, all contiguous; p strided as a
   above (item n at (n / div) * s0 + (n % div) * s1, row m m * sm further, tokens
   contiguous); out (N, M, J) fp32 contiguous, overwritten.  Returns -1 for rows of other
   than 64, 128 or 256 codes. */
typedef struct {
    const float *p;
    int64_t p_s0, p_s1, p_m;
    const uint8_t *codes;
    const uint16_t *scale, *low;
    float *out;
    int64_t n, div, m, ng, j, t0, w;
    int64_t bits;
} rowdot_args;

int attnkit_dq_rowdot(const rowdot_args *a) {
    const int bits = (int)a->bits;
    const int64_t w = a->w, c_ = w * (8 / bits), nv = c_ / 16, jn = a->j;
    if (c_ % 16 || nv > 16 || w % 16 || w < 16) return -1;
    memset(a->out, 0, (size_t)(a->n * a->m * jn) * sizeof(float));
    for (int64_t n = 0; n < a->n; n++) {
        const float *pn = a->p + (n / a->div) * a->p_s0 + (n % a->div) * a->p_s1;
        for (int64_t g = 0; g < a->ng; g++) {
            for (int64_t j = 0; j < jn; j++) {
                const int64_t r = (n * a->ng + g) * jn + j;
                const uint8_t *row = a->codes + r * w;
                v16f c[16];
                unpack_row(row, w, bits, c);
                const float sc = h2f(a->scale[r]), z = h2f(a->low[r]);
                const int64_t first = a->t0 > g * c_ ? a->t0 - g * c_ : 0;  /* positions before t0 left out */
                if (first >= c_) continue;
                for (int64_t m = 0; m < a->m; m++) {
                    const float *pm = pn + m * a->p_m + (g * c_ + first - a->t0) - first;  /* column of position 0 */
                    float dot = 0.0f, sum = 0.0f;
                    if (first == 0) {
                        v16f d = (v16f){}, t = (v16f){};
                        for (int64_t v = 0; v < nv; v++) {
                            v16f x = *(const v16fu *)(pm + 16 * v);
                            d += c[v] * x;
                            t += x;
                        }
                        for (int l = 0; l < 16; l++) { dot += d[l]; sum += t[l]; }
                    } else {
                        const float *cf = (const float *)c;
                        const float *pf = pn + m * a->p_m + (g * c_ + first - a->t0);  /* column of position first */
                        for (int64_t i = first; i < c_; i++) { dot += cf[i] * pf[i - first]; sum += pf[i - first]; }
                    }
                    a->out[(n * a->m + m) * jn + j] += z * sum + sc * dot;
                }
            }
        }
    }
    return 0;
}

/* Scores of a key plan's groups (attnkit.cache.keyplan.KeyLayout), one call for every group:
   out[b, h, m, g*C + t] = sum over the digit rows k of head h of
       q[b, h, m, c_k] * 2^shift_k * (scale[b, g, e_k] * digit(codes[b, g, k], t) + [shift_k == 0] * low[b, g, e_k])
     + sum over the width-0 entries e of head h of q[b, h, m, c_e] * mean[b, g, e]
   where e_k = digit_chan[k] is the digit's channel entry and chan[e_k] = h*D + c_k (entries
   head-major).  q (B, H, M, D) fp32 contiguous; codes (B, nG, E_d, W); scale, low (B, nG,
   E_c) and mean (B, nG, E_0) fp16; out rows (h, m) at (h*M + m) * o_m, group g at g*C, batch
   b at b * o_s0. */
typedef struct {
    const float *q;
    const uint8_t *codes;
    const uint16_t *scale, *low, *mean;
    const int32_t *chan, *zero, *digit_chan;
    const uint8_t *digit_shift;
    float *out;
    int64_t o_s0, o_m;
    int64_t b, h, m, d, ng, ed, ec, e0, w;
    int64_t bits;
} plan_args;

#define PLAN_KERNEL(BITS, NV)                                                                   \
static void plan_##BITS##_##NV(const plan_args *p) {                                            \
    enum { W = NV * 2 * BITS, MB = 4 };                                                         \
    const int64_t m_ = p->m, d_ = p->d;                                                         \
    for (int64_t b = 0; b < p->b; b++)                                                          \
    for (int64_t g = 0; g < p->ng; g++) {                                                       \
        const int64_t bg = b * p->ng + g;                                                       \
        const uint8_t *cg = p->codes + bg * p->ed * W;                                          \
        const uint16_t *sg = p->scale + bg * p->ec, *zg = p->low + bg * p->ec, *mg = p->mean + bg * p->e0; \
        int64_t k = 0, z = 0;                                                                   \
        for (int64_t hh = 0; hh < p->h; hh++) {                                                 \
            int64_t k1 = k, z1 = z;  /* this head's digits [k, k1) and mean entries [z, z1) */  \
            while (k1 < p->ed && p->chan[p->digit_chan[k1]] / d_ == hh) k1++;                   \
            while (z1 < p->e0 && p->zero[z1] / d_ == hh) z1++;                                  \
            const float *qh = p->q + (b * p->h + hh) * m_ * d_;                                 \
            for (int64_t m0 = 0; m0 < m_; m0 += MB) {                                           \
                const int mb = (int)(m_ - m0 < MB ? m_ - m0 : MB);                              \
                const float *qm[MB];                                                            \
                for (int i = 0; i < MB; i++) qm[i] = qh + (m0 + (i < mb ? i : 0)) * d_;         \
                v16f acc[MB][NV];                                                               \
                float lsum[MB];                                                                 \
                for (int i = 0; i < MB; i++) {                                                  \
                    lsum[i] = 0.0f;                                                             \
                    for (int v = 0; v < NV; v++) acc[i][v] = (v16f){};                          \
                }                                                                               \
                for (int64_t e = z; e < z1; e++) {                                              \
                    const int64_t c = p->zero[e] % d_;                                          \
                    const float mv = h2f(mg[e]);                                                \
                    for (int i = 0; i < MB; i++) lsum[i] += qm[i][c] * mv;                      \
                }                                                                               \
                for (int64_t kk = k; kk < k1; kk++) {                                           \
                    const int64_t e = p->digit_chan[kk], c = p->chan[e] % d_;                   \
                    const int sh = p->digit_shift[kk];                                          \
                    const float s = h2f(sg[e]) * (float)(1 << sh), lo = sh ? 0.0f : h2f(zg[e]); \
                    float x[MB];                                                                \
                    for (int i = 0; i < MB; i++) { lsum[i] += qm[i][c] * lo; x[i] = qm[i][c] * s; } \
                    const uint8_t *row = cg + kk * W;                                           \
                    v16f cv[NV];                                                                \
                    unpack_row(row, W, BITS, cv);                                               \
                    for (int i = 0; i < MB; i++)                                                \
                        for (int v = 0; v < NV; v++) acc[i][v] += x[i] * cv[v];                 \
                }                                                                               \
                for (int i = 0; i < MB; i++)                                                    \
                    if (i < mb) {                                                               \
                        float *o = p->out + b * p->o_s0 + (hh * m_ + m0 + i) * p->o_m + g * NV * 16; \
                        for (int v = 0; v < NV; v++) ((v16fu *)o)[v] = acc[i][v] + lsum[i];     \
                    }                                                                           \
            }                                                                                   \
            k = k1;                                                                             \
            z = z1;                                                                             \
        }                                                                                       \
    }                                                                                           \
}

PLAN_KERNEL(2, 4) PLAN_KERNEL(4, 4) PLAN_KERNEL(8, 4)
PLAN_KERNEL(2, 8) PLAN_KERNEL(4, 8) PLAN_KERNEL(8, 8)
PLAN_KERNEL(2, 16) PLAN_KERNEL(4, 16) PLAN_KERNEL(8, 16)

int attnkit_plan_scores(const plan_args *p) {
    const int64_t c = p->w * (8 / p->bits);
#define CASE(B, NV) if (p->bits == B && c == NV * 16) { plan_##B##_##NV(p); return 0; }
    CASE(2, 4) CASE(4, 4) CASE(8, 4) CASE(2, 8) CASE(4, 8) CASE(8, 8) CASE(2, 16) CASE(4, 16) CASE(8, 16)
#undef CASE
    return -1;
}

/* Min-max quantization of rows, exactly as attnkit.cache.quant.quantize(x, bits, "minmax")
   followed by pack(): per row of G numbers, low = its min rounded down to fp16, scale =
   (max - low) / qmax (at least 2^-14) rounded up to fp16, codes round((x - low) / scale)
   clamped to [0, qmax], packed planar into W = ceil(G / per) bytes.  x (R, G) fp32, out
   (R, W) uint8, scale and low (R,) fp16. */
void attnkit_quantize_rows(const float *x, int64_t rows, int64_t g, int64_t bits, uint8_t *out,
                           uint16_t *scale, uint16_t *low) {
    const int per = 8 / (int)bits, qmax = (1 << bits) - 1;
    const int64_t w = (g + per - 1) / per;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * g;
        float lo = xr[0], hi = xr[0];
        for (int64_t i = 1; i < g; i++) {
            lo = xr[i] < lo ? xr[i] : lo;
            hi = xr[i] > hi ? xr[i] : hi;
        }
        uint16_t lh = f2h(lo);
        if (h2f(lh) > lo) lh = h_next(lh, 0);
        const float lowf = h2f(lh);
        float sc = (hi - lowf) / (float)qmax;
        if (sc < 6.103515625e-05f) sc = 6.103515625e-05f;
        uint16_t sh = f2h(sc);
        if (h2f(sh) < sc) sh = h_next(sh, 1);
        const float scf = h2f(sh);
        uint8_t *o = out + r * w;
        memset(o, 0, (size_t)w);
        for (int64_t i = 0; i < g; i++) {
            const float y = (xr[i] - lowf) / scf;
            float c = (float)(int32_t)y, frac = y - c;  /* round half to even, as torch.round; y >= -1 */
            if (y < 0.0f) { c = 0.0f; frac = 0.0f; }
            if (frac > 0.5f || (frac == 0.5f && ((int32_t)c & 1))) c += 1.0f;
            if (c > (float)qmax) c = (float)qmax;
            o[i % w] |= (uint8_t)((int)c << (bits * (i / w)));
        }
        scale[r] = sh;
        low[r] = lh;
    }
}

/* The kernel for rows of C = W*8/bits codes; returns -1 where none fits (C not 64, 128
   or 256). */
int attnkit_dq_matmul(const dq_args *p) {
    const int64_t c = p->w * (8 / p->bits);
#define CASE(B, NV) if (p->bits == B && c == NV * 16) { kernel_##B##_##NV(p); return 0; }
    CASE(2, 4) CASE(4, 4) CASE(8, 4) CASE(2, 8) CASE(4, 8) CASE(8, 8) CASE(2, 16) CASE(4, 16) CASE(8, 16)
#undef CASE
    return -1;
}
"""

class _Args(ctypes.Structure):
    """The C side's dq_args."""

    _fields_ = [("a", ctypes.c_void_p), ("a_s0", ctypes.c_int64), ("a_s1", ctypes.c_int64), ("a_m", ctypes.c_int64),
                ("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("low", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("o_s0", ctypes.c_int64), ("o_s1", ctypes.c_int64), ("o_m", ctypes.c_int64),
                ("n", ctypes.c_int64), ("div", ctypes.c_int64), ("m", ctypes.c_int64), ("k", ctypes.c_int64),
                ("k0", ctypes.c_int64), ("w", ctypes.c_int64), ("bits", ctypes.c_int64)]


class _RowArgs(ctypes.Structure):
    """The C side's rowdot_args."""

    _fields_ = [("p", ctypes.c_void_p), ("p_s0", ctypes.c_int64), ("p_s1", ctypes.c_int64), ("p_m", ctypes.c_int64),
                ("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("low", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("n", ctypes.c_int64), ("div", ctypes.c_int64), ("m", ctypes.c_int64),
                ("ng", ctypes.c_int64), ("j", ctypes.c_int64), ("t0", ctypes.c_int64), ("w", ctypes.c_int64),
                ("bits", ctypes.c_int64)]


class _PlanArgs(ctypes.Structure):
    """The C side's plan_args."""

    _fields_ = [("q", ctypes.c_void_p), ("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("low", ctypes.c_void_p), ("mean", ctypes.c_void_p), ("chan", ctypes.c_void_p),
                ("zero", ctypes.c_void_p), ("digit_chan", ctypes.c_void_p), ("digit_shift", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("o_s0", ctypes.c_int64), ("o_m", ctypes.c_int64)] + [
                (f, ctypes.c_int64) for f in ("b", "h", "m", "d", "ng", "ed", "ec", "e0", "w", "bits")]


_FLAGS = (["-O3", "-march=native"], ["-O3"])  # the first that compiles
_LIB: SimpleNamespace | None = None  # the C entry points, once built
_STATUS: str | None = None  # None: not tried yet


def _compiler() -> str | None:
    return os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _build() -> tuple[SimpleNamespace | None, str]:
    if os.environ.get("ATTNKIT_KERNELS", "1") == "0":
        return None, "disabled by ATTNKIT_KERNELS=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    from ..data import cache_dir

    folder = cache_dir() / "kernels"
    errors = []
    for flags in _FLAGS:
        key = hashlib.sha256("\0".join([_SOURCE, cc, *flags, platform.machine(), platform.processor(),
                                         _cpu_model()]).encode()).hexdigest()[:16]
        lib = folder / f"attnkit_codes_{key}.so"
        try:
            if not lib.exists():
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    src, so = Path(tmp) / "codes.c", Path(tmp) / "codes.so"
                    src.write_text(_SOURCE)
                    run = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(so), str(src)],
                                         capture_output=True, text=True, timeout=120)
                    if run.returncode:
                        errors.append(f"{cc} {' '.join(flags)}: {run.stderr.strip()[-300:]}")
                        continue
                    os.replace(so, lib)  # atomic: processes building at once each leave a whole file
            dll = ctypes.CDLL(str(lib))
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{cc} {' '.join(flags)}: {e}")
            continue
        fns = SimpleNamespace(matmul=dll.attnkit_dq_matmul, rowdot=dll.attnkit_dq_rowdot,
                              plan=dll.attnkit_plan_scores, quantize=dll.attnkit_quantize_rows)
        for f, args in ((fns.matmul, _Args), (fns.rowdot, _RowArgs), (fns.plan, _PlanArgs)):
            f.restype, f.argtypes = ctypes.c_int, [ctypes.POINTER(args)]
        fns.quantize.restype = None
        fns.quantize.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3
        return fns, f"built with {cc} {' '.join(flags)}: {lib}"
    return None, "the C kernel did not build: " + "; ".join(errors)


def _cpu_model() -> str:
    """The CPU's model name and feature flags (Linux), for the build's key: -march=native
    code must not be reused on another CPU sharing the cache folder."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(next((line for line in lines if line.startswith(k)), "") for k in ("model name", "flags"))


def _lib() -> SimpleNamespace | None:
    """The C entry points (matmul, rowdot, plan, quantize), built on the first call; None
    where they cannot be."""
    global _LIB, _STATUS
    if _STATUS is None:
        _LIB, _STATUS = _build()
    return _LIB


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _lib() is not None


def status() -> str:
    """How the kernel was built, or why it is not used."""
    _lib()
    return _STATUS


def dq_matmul(a: Tensor, packed: Tensor, bits: int, scale: Tensor | None = None, low: Tensor | None = None, *,
              out: Tensor | None = None, start: int = 0) -> Tensor:
    """``a @ (low + scale · codes)`` straight from the packed bytes, one product per item.

    Args:
        a: (..., M, K) fp32 on the CPU, K contiguous (any other strides).
        packed: (..., K, W) uint8 rows of :func:`attnkit.cache.quant.pack`, the same
            leading dims; rows of 64, 128 or 256 codes.
        bits: 2, 4 or 8.
        scale, low: (..., K) per-row fp16 scale and low (as the cache holds them), or None (1 and 0).
        out: (..., M, C) fp32 to write into, C contiguous (a view, e.g. a slice of a wider
            score tensor); default a new tensor.
        start: rows k < start are left out (as if a[..., k] were 0).

    Returns:
        ``out`` (..., M, C), C = W·8/bits codes: ``out[..., m, c] = Σ_k a[..., m, k] ·
        (low[..., k] + scale[..., k] · code(packed[..., k, :], c))``.

    Call only when :func:`available`; :func:`attnkit.cache.quant.fused` checks the rest.
    """
    lead = packed.shape[:-2]
    k, w = packed.shape[-2:]
    m = a.shape[-2]
    c = w * (8 // bits)
    if a.shape[:-2] != lead or a.shape[-1] != k:
        a = a.expand(*lead, m, k)
    if out is None:
        out = torch.empty(*lead, m, c, dtype=torch.float32)
    n = 1
    for x in lead:
        n *= x
    if n == 0 or m == 0:
        return out
    packed = packed.contiguous()
    sc = None if scale is None else _half(scale, "scale").expand(*lead, k).contiguous()
    lo = None if low is None else _half(low, "low").expand(*lead, k).contiguous()
    a = a if a.stride(-1) == 1 else a.contiguous()
    a_s, o_s = _item_strides(a), _item_strides(out)
    args = _Args(a.data_ptr(), a_s[0], a_s[1], a.stride(-2), packed.data_ptr(),
                 0 if sc is None else sc.data_ptr(), 0 if lo is None else lo.data_ptr(),
                 out.data_ptr(), o_s[0], o_s[1], out.stride(-2), n, a_s[2], m, k, start, w, bits)
    if out.stride(-1) != 1 or out.dtype != torch.float32 or _lib().matmul(ctypes.byref(args)):
        raise ValueError(f"dq_matmul: unsupported operands: rows of {c} codes (supported {CODES_PER_ROW}), out "
                         f"{out.dtype} with strides {out.stride()}")
    return out


def dq_rowdot(p: Tensor, packed: Tensor, bits: int, scale: Tensor, low: Tensor, *, start: int = 0) -> Tensor:
    """The transposed product, for channels quantized over groups of tokens: p (..., M, T)
    fp32, column 0 token ``start`` (T contiguous, T >= nG·C − start), packed (..., nG, J, W)
    uint8 rows of C = W·8/bits codes, scale and low (..., nG, J) fp16 -> (..., M, J) fp32 with
    ``out[..., m, j] = Σ_{start <= t < nG·C} p[..., m, t − start] · (low[..., t // C, j] +
    scale[..., t // C, j] · code(packed[..., t // C, j, :], t % C))``.  Call only when
    :func:`available`."""
    lead = packed.shape[:-3]
    ng, jn, w = packed.shape[-3:]
    m = p.shape[-2]
    c = w * (8 // bits)
    if p.shape[:-2] != lead or p.shape[-1] < ng * c - start or not 0 <= start <= ng * c:
        raise ValueError(f"dq_rowdot: p (..., M, T) = {tuple(p.shape)} does not cover packed {tuple(packed.shape)}")
    out = torch.empty(*lead, m, jn, dtype=torch.float32)
    n = out.numel() // max(1, m * jn)
    if out.numel() == 0 or ng == 0:
        return out.zero_()
    p = p if p.stride(-1) == 1 else p.contiguous()
    packed, sc, lo = packed.contiguous(), _half(scale, "scale").contiguous(), _half(low, "low").contiguous()
    p_s = _item_strides(p)
    args = _RowArgs(p.data_ptr(), p_s[0], p_s[1], p.stride(-2), packed.data_ptr(), sc.data_ptr(), lo.data_ptr(),
                    out.data_ptr(), n, p_s[2], m, ng, jn, start, w, bits)
    if _lib().rowdot(ctypes.byref(args)):
        raise ValueError(f"dq_rowdot: rows of {c} codes ({w} bytes) are not supported")
    return out


def plan_scores(layout, qs: Tensor, held: dict[str, Tensor], out: Tensor) -> None:
    """A key plan's scores of few rows, every group in one call, written into ``out``
    (B, H, M, nG·G): a view with the last dim contiguous and rows (h, m) evenly spaced (a
    slice of the score tensor).  ``layout`` is the layer's
    :class:`~attnkit.cache.keyplan.KeyLayout`, ``held`` its tensors.  Call only when
    :func:`available`."""
    b, h, m, d = qs.shape
    codes, scale, low, mean = (held[n].contiguous() for n in ("key_codes", "key_scale", "key_low", "key_mean"))
    ng, ed, w = codes.shape[1:]
    qs = qs.contiguous()
    if out.stride(-1) != 1 or out.stride(1) != m * out.stride(2) or out.shape != (b, h, m, ng * w * 8 // layout.bits):
        raise ValueError(f"plan_scores: out of shape {tuple(out.shape)} and strides {out.stride()} is not a "
                         f"(B, H, M, nG·G) score view")
    idx = [t.contiguous() for t in (layout.chan, layout.zero, layout.digit_chan, layout.digit_shift)]
    args = _PlanArgs(qs.data_ptr(), codes.data_ptr(), _half(scale, "scale").data_ptr(), _half(low, "low").data_ptr(),
                     _half(mean, "mean").data_ptr(), *(t.data_ptr() for t in idx), out.data_ptr(), out.stride(0),
                     out.stride(2), b, h, m, d, ng, ed, scale.shape[-1], mean.shape[-1], w, layout.bits)
    if ng and _lib().plan(ctypes.byref(args)):
        raise ValueError(f"plan_scores: rows of {w * 8 // layout.bits} codes are not supported")


def quantize_rows(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """``pack(*quantize(x, bits, "minmax"))`` in one pass, bit for bit the same: x (..., G)
    fp32 on the CPU -> packed codes (..., ceil(G·bits/8)), fp16 scale (...,), fp16 low (...,).
    Call only when :func:`available`."""
    per = 8 // bits
    g = x.shape[-1]
    x = x.contiguous()
    packed = torch.empty(*x.shape[:-1], -(-g // per), dtype=torch.uint8)
    scale = torch.empty(x.shape[:-1], dtype=torch.float16)
    low = torch.empty_like(scale)
    rows = scale.numel()
    if rows and g:
        _lib().quantize(x.data_ptr(), rows, g, bits, packed.data_ptr(), scale.data_ptr(), low.data_ptr())
    return packed, scale, low


def _half(t: Tensor, name: str) -> Tensor:
    if t.dtype != torch.float16:
        raise TypeError(f"argument {name!r}: expected the cache's fp16 scales and lows, got {t.dtype}")
    return t


def _item_strides(x: Tensor) -> tuple[int, int, int]:
    """(s0, s1, div) such that item n of x's flattened leading dims starts (n // div)·s0 +
    (n % div)·s1 elements in: leading dims that merge into at most two strided ones."""
    dims = [(size, stride) for size, stride in zip(x.shape[:-2], x.stride()[:-2]) if size != 1]
    merged: list[list[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if not merged:
        return 0, 0, 1
    if len(merged) == 1:
        return 0, merged[0][1], merged[0][0]
    if len(merged) == 2:
        return merged[0][1], merged[1][1], merged[1][0]
    raise ValueError(f"dq_matmul: leading dims of shape {tuple(x.shape[:-2])} and strides {x.stride()[:-2]} "
                     f"do not merge into two")


def code_matmul(a: Tensor, packed: Tensor, bits: int) -> Tensor:
    """``a @ codes`` straight from the packed bytes: a (..., M, K) fp32 on the CPU, packed
    (..., K, W) uint8 rows of :func:`attnkit.cache.quant.pack` with the same leading dims ->
    (..., M, W·8/bits) fp32, column c the product with code c of the rows (padding codes
    included): :func:`dq_matmul` without scales."""
    return dq_matmul(a, packed, bits)
