"""Triton kernels for WKV7: chunked forward, chunked backward, and a step-by-step forward.

Chunked form (derivation in chunk_torch.py's docstring). Per chunk of C steps from state S0 [V, K], with
g = inclusive cumsum of w over the chunk (per key), gx = g - w, g_C = g at the chunk's last step:
    a_d = a e^{gx}, r_d = r e^{g}, b_u = b e^{-g}, k_u = k e^{-g}, b_e = b e^{g_C - g}, k_e = k e^{g_C - g}
    L_ab = strict_lower(a_d b_u^T), L_ak = strict_lower(a_d k_u^T)        [C, C]
    M_rb = lower(r_d b_u^T),        M_rk = lower(r_d k_u^T)                [C, C]
    U = (I - L_ab)^{-1} (a_d S0^T + L_ak V)                                 [C, V]  (u_t = S_{t-1} a_t)
    Y = r_d S0^T + M_rb U + M_rk V
    S_C = S0 diag(e^{g_C}) + U^T b_e + V^T k_e
(I - L_ab)^{-1} = (I + L)(I + L^2)(I + L^4)... since L is nilpotent: log2(C) small matmuls; the kernels keep
Q = (I - L_ab)^{-1} - I (strictly lower) and add the identity's part exactly (U = Q Z + Z).
The factorisation e^{gx_t - g_s} = e^{gx_t} e^{-g_s} needs |g| over a chunk well inside float32 range:
for the model's w >= -0.6065 and C <= 64, |g| <= 39 (e^39 ~ 1e17).

Training path, four kernels per forward + backward:
1. chunk_cc_kernel, parallel over (chunk, head): the [C, C] matrices Q, L_ak, M_rb, M_rk, which
   do not depend on the carried state, for every chunk (kept for the backward's state pass).
2. chunk_fwd_kernel, sequential over chunks, a program per head and block of BV state rows (rows of S evolve
   independently): loads those matrices instead of spending ~10 small dependent products per serial step on them,
   with the next chunk's inputs prefetched one step ahead; stores each chunk's start state.
3. chunk_bwd_dstate_kernel, sequential in reverse, the same layout: carries dS (the gradient of the state at
   a chunk's end), stores it per chunk, and ends with the initial state's gradient:
       dU = M_rb^T dY + b_e dS_C^T;  dZ = (I - L_ab)^{-T} dU;  dS0 = dY^T r_d + dZ^T a_d + dS_C diag(e^{g_C})
4. chunk_bwd_grads_kernel, parallel over (chunk, head): from the chunk's start state and dS it recomputes the
   chunk's terms, the [C, C] matrices included (faster than loading them on the H200), and produces all
   gradients:
       dL_ab = strict_lower(dZ U^T), dL_ak = strict_lower(dZ V^T), dM_rb = lower(dY U^T), dM_rk = lower(dY V^T)
       dV = M_rk^T dY + L_ak^T dZ + k_e dS_C^T
   and the chain rule through the exponentials to r, w, k, a, b (dw by reverse cumsums of dg and dgx).
   On NVIDIA GPUs that fit it, gluon_kernels.chunk_bwd_grads_gluon (the same math with explicit layouts,
   ~1.9x faster on the H200) runs instead; this kernel is its reference (chunk.WKV7KernelConfig.grads_kernel).
Decoding: recurrent_fwd_kernel, one step at a time (its backward is the chunked one).
Precision: every product goes through _dot / _dotn / _dot_big / _dot_split with a PREC per kernel
(chunk.WKV7KernelConfig): tf32 tensor-core products with their operands rounded ("tf32r") or their truncation
bias compensated ("tf32c"), or "bf16x3" (three bf16 tensor-core products on hi + lo halves, near float32).
The measurements behind these choices, and the variants tried and removed: bench/results/wkv7.md.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETER: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
"""The Triton interpreter (CPU tests) computes bf16 dots wrongly (triton 3.9: garbage values), so under it
_dot_bf16x3 multiplies the same bf16 halves as float32 values."""


@triton.jit
def _round_tf32(x):
    """Round float32 to tf32 (10-bit mantissa) to nearest. Fed float32, the tensor cores truncate, which
    biases the products: y's error on the benchmark check was 2.0e-3 truncated, 1.70e-3 rounded (H200)."""
    i = x.to(tl.int32, bitcast=True)
    i = (i + 0x1000) & -8192
    return i.to(tl.float32, bitcast=True)


@triton.jit
def _dot_bf16x3(a, b):
    """a @ b for float32 a, b on bf16 tensor cores: each operand split as hi + lo (hi = bf16(x), lo =
    bf16(x - hi): ~16 of float32's 24 mantissa bits), a_hi b_hi + a_hi b_lo + a_lo b_hi accumulated in float32
    (relative error ~1e-5 per product, vs tf32's ~5e-4). Three MMAs instead of one, but 16-bit operands:
    H200 (run 26), the [C, C] kernel 10% faster than with "tf32r" operands, the sequential kernels 5-9% faster
    with more programs than multiprocessors and 3-11% slower with fewer, the gradient kernel 1.54x slower when
    every product uses it, 1.03x when only the [C, C]-sized ones do ("bf16x3k")."""
    a_hi = a.to(tl.bfloat16)
    a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
    b_hi = b.to(tl.bfloat16)
    b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
    if INTERPRETER:
        a_hi, a_lo, b_hi, b_lo = a_hi.to(tl.float32), a_lo.to(tl.float32), b_hi.to(tl.float32), b_lo.to(tl.float32)
        return (tl.dot(a_lo, b_hi, input_precision="ieee") + tl.dot(a_hi, b_lo, input_precision="ieee")
                + tl.dot(a_hi, b_hi, input_precision="ieee"))
    acc = tl.dot(a_lo, b_hi)
    acc = tl.dot(a_hi, b_lo, acc)
    return tl.dot(a_hi, b_hi, acc)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """PREC: "tf32r" (operands rounded to tf32, then tensor cores), "bf16x3" (_dot_bf16x3), or a tl.dot
    input_precision."""
    if PREC == "tf32r":
        return tl.dot(_round_tf32(a), _round_tf32(b), input_precision="tf32")
    elif PREC == "bf16x3":
        return _dot_bf16x3(a, b)
    else:
        return tl.dot(a, b, input_precision=PREC)


TF32_TRUNCATION_BIAS = 3.52e-4
"""Mean relative error of a float32 operand truncated to tf32 (10-bit mantissa), as the tensor cores read it:
-3.52e-4 over normal and exponentially distributed values, -3.38e-4 over uniform [0, 1) ones."""


@triton.jit
def _dotn(a, b, PREC: tl.constexpr, NT: tl.constexpr, BIAS: tl.constexpr):
    """_dot with two more precisions. "bf16x3k": _dot_bf16x3 (with _dot_big keeping the gradient kernel's
    seven largest products at "tf32c"). "tf32c": tensor cores on truncated operands, the product scaled by
    1 + NT * BIAS, where NT (0-2) counts the operands truncation changes (float32 values computed here; bf16
    inputs are exact in tf32) and BIAS is one operand's mean relative truncation error. That removes the
    truncation's bias (every product too small by ~7e-4, coherently over long sums) and leaves an error
    spread like rounding's (2.2e-4 vs 2.1e-4 RMS per operand), for one multiply per output element instead of
    rounding every operand ("tf32r", which nearly doubled the gradient kernel's time). BIAS is 0 under the
    interpreter, whose dots do not truncate."""
    if PREC == "tf32c":
        return tl.dot(a, b, input_precision="tf32") * (1.0 + NT * BIAS)
    elif PREC == "bf16x3k":
        return _dot_bf16x3(a, b)
    else:
        return _dot(a, b, PREC)


@triton.jit
def _dot_big(a, b, PREC: tl.constexpr, NT: tl.constexpr, BIAS: tl.constexpr):
    """The gradient kernel's seven [C, N] x [N, N] products with the state or its gradient (a_d S^T, b_e dS^T,
    k_e dS^T, dY S, dZ S, U dS, V dS): "tf32c" under "bf16x3k", else _dotn. Measured on the H200 (run 26):
    carrying the other ~28 products, all [C, C]-sized or with C-long sums, as bf16x3 takes the gradients' errors
    from 1.68-1.75e-3 to 1.657-1.672e-3 (the official kernel's: 1.649-1.661e-3) for +3% of this kernel's
    time; these seven as bf16x3 too would cost +54% for the last ~1%."""
    if PREC == "bf16x3k":
        return tl.dot(a, b, input_precision="tf32") * (1.0 + NT * BIAS)
    else:
        return _dotn(a, b, PREC, NT, BIAS)


@triton.jit
def _dot_split(a, b, PREC: tl.constexpr, B_EXACT: tl.constexpr, BIAS: tl.constexpr):
    """a @ b at about float32 accuracy on tf32 tensor cores for the tf32 precisions: each operand carried as
    hi + lo (hi = a rounded to tf32, lo = a - hi), a_hi b_hi + a_hi b_lo + a_lo b_hi; B_EXACT (b from bf16/fp16
    inputs, exact in tf32): a_hi b + a_lo b. Used for M_rk = lower(r_d k_u^T) and M_rk V, whose diagonal
    carries the current step's (r_t . k_t) v_t: emulating the forward's rounding on the CPU, these two products
    alone took y's error from 1.697e-3 to 1.660e-3 against the same reference (bf16's own rounding of y:
    1.656e-3). Other precisions: _dotn."""
    if PREC == "tf32r" or PREC == "tf32c":
        a_hi = _round_tf32(a)
        if B_EXACT:
            return tl.dot(a_hi, b, input_precision="tf32") + tl.dot(a - a_hi, b, input_precision="tf32")
        b_hi = _round_tf32(b)
        return (tl.dot(a_hi, b_hi, input_precision="tf32") + tl.dot(a_hi, b - b_hi, input_precision="tf32")
                + tl.dot(a - a_hi, b_hi, input_precision="tf32"))
    else:
        return _dotn(a, b, PREC, 2 - B_EXACT, BIAS)


@triton.jit
def _inv_unit_lower(L, LOG2C: tl.constexpr, PREC: tl.constexpr, BIAS: tl.constexpr):
    """Q = (I - L)^{-1} - I for strictly lower-triangular L [C, C], C = 2**LOG2C, by doubling:
    (I - L)^{-1} = (I + L)(I + L^2)(I + L^4)..., so Q <- Q + L^k + Q L^k. Q is strictly lower like L, and
    products with it count both operands as truncated ("tf32c"); the exact identity part is added where Q is
    used (U = Q Z + Z), not passed through a tf32 product."""
    Q = L
    Lp = L
    for _ in tl.static_range(LOG2C - 1):
        Lp = _dotn(Lp, Lp, PREC, 2, BIAS)
        Q = Q + Lp + _dotn(Q, Lp, PREC, 2, BIAS)
    return Q


@triton.jit
def _chunk_terms(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, pk, mk, tri_s, tri_i,
                 LOG2C: tl.constexpr, PREC: tl.constexpr, BIAS: tl.constexpr):
    """Loads one chunk ([C, N] at offsets pk, masked by mk) and builds its decayed vectors and [C, C] matrices."""
    rr = tl.load(r_ptr + pk, mask=mk, other=0.).to(tl.float32)
    ww = tl.load(w_ptr + pk, mask=mk, other=0.).to(tl.float32)
    kk = tl.load(k_ptr + pk, mask=mk, other=0.).to(tl.float32)
    aa = tl.load(a_ptr + pk, mask=mk, other=0.).to(tl.float32)
    bb = tl.load(b_ptr + pk, mask=mk, other=0.).to(tl.float32)
    vv = tl.load(v_ptr + pk, mask=mk, other=0.).to(tl.float32)
    g = tl.cumsum(ww, axis=0)                       # [C, N]
    gx = g - ww
    gC = tl.sum(ww, axis=0)                         # [N]
    a_d = aa * tl.exp(gx)
    r_d = rr * tl.exp(g)
    e_neg = tl.exp(-g)
    b_u = bb * e_neg
    k_u = kk * e_neg
    e_end = tl.exp(gC[None, :] - g)
    b_e = bb * e_end
    k_e = kk * e_end
    L_ab = tl.where(tri_s, _dotn(a_d, tl.trans(b_u), PREC, 2, BIAS), 0.)
    L_ak = tl.where(tri_s, _dotn(a_d, tl.trans(k_u), PREC, 2, BIAS), 0.)
    M_rb = tl.where(tri_i, _dotn(r_d, tl.trans(b_u), PREC, 2, BIAS), 0.)
    M_rk = tl.where(tri_i, _dotn(r_d, tl.trans(k_u), PREC, 2, BIAS), 0.)
    Q = _inv_unit_lower(L_ab, LOG2C, PREC, BIAS)
    return (vv, g, gx, gC, a_d, r_d, b_u, k_u, b_e, k_e, L_ab, L_ak, M_rb, M_rk, Q)


@triton.jit
def _ld(ptr, n, T, H, i_b, i_h, offs_t, offs_x, N: tl.constexpr, C: tl.constexpr):
    """Chunk n of one head of a [B, T, H, N] tensor, columns offs_x: [C, len(offs_x)], zero past T (and for
    n >= NC, so a prefetch one chunk past the end is harmless). Raw dtype: convert where used, so the load's
    latency is not waited for at the load."""
    t = n * C + offs_t
    p = (((i_b * T + t) * H + i_h) * N)[:, None] + offs_x[None, :]
    return tl.load(ptr + p, mask=(t < T)[:, None], other=0.)


@triton.jit
def _ldc(cc_ptr, i_bh, NC, n, j: tl.constexpr, offs_cc, C: tl.constexpr):
    """Matrix j (0: Q = (I - L_ab)^{-1} - I, 1: L_ak, 2: M_rb, 3: M_rk) of chunk n from cc [B*H, NC, 4, C, C]."""
    return tl.load(cc_ptr + ((i_bh * NC + n) * 4 + j) * C * C + offs_cc, mask=offs_cc < (NC - n) * C * C, other=0.)


@triton.jit
def chunk_cc_kernel(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, cc_ptr, T, NC, H, N: tl.constexpr, C: tl.constexpr,
                    LOG2C: tl.constexpr, PREC: tl.constexpr, BIAS: tl.constexpr):
    """Parallel, grid (NC * B*H,): each chunk's [C, C] matrices Q = (I - L_ab)^{-1} - I, L_ak, M_rb, M_rk into
    cc [B*H, NC, 4, C, C] fp32. They do not depend on the carried state, so the sequential kernels (and the
    backward's) load them instead of spending their serial steps on ~10 small dependent products."""
    n = tl.program_id(0) % NC      # one-dimensional grid (chunks x heads): its second dimension stops at 65535
    i_bh = tl.program_id(0) // NC
    i_b = i_bh // H
    i_h = i_bh % H
    offs_t = tl.arange(0, C)
    offs_k = tl.arange(0, N)
    offs_cc = offs_t[:, None] * C + offs_t[None, :]
    tri_s = offs_t[:, None] > offs_t[None, :]
    tri_i = offs_t[:, None] >= offs_t[None, :]
    rr = _ld(r_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C).to(tl.float32)
    ww = _ld(w_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C).to(tl.float32)
    kk = _ld(k_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C).to(tl.float32)
    aa = _ld(a_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C).to(tl.float32)
    bb = _ld(b_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C).to(tl.float32)
    g = tl.cumsum(ww, axis=0)
    a_d = aa * tl.exp(g - ww)
    r_d = rr * tl.exp(g)
    e_neg = tl.exp(-g)
    b_u = bb * e_neg
    k_u = kk * e_neg
    L_ab = tl.where(tri_s, _dotn(a_d, tl.trans(b_u), PREC, 2, BIAS), 0.)
    L_ak = tl.where(tri_s, _dotn(a_d, tl.trans(k_u), PREC, 2, BIAS), 0.)
    M_rb = tl.where(tri_i, _dotn(r_d, tl.trans(b_u), PREC, 2, BIAS), 0.)
    M_rk = tl.where(tri_i, _dot_split(r_d, tl.trans(k_u), PREC, False, BIAS), 0.)
    Q = _inv_unit_lower(L_ab, LOG2C, PREC, BIAS)
    base = (i_bh * NC + n) * 4 * C * C
    tl.store(cc_ptr + base + offs_cc, Q)
    tl.store(cc_ptr + base + C * C + offs_cc, L_ak)
    tl.store(cc_ptr + base + 2 * C * C + offs_cc, M_rb)
    tl.store(cc_ptr + base + 3 * C * C + offs_cc, M_rk)


@triton.jit
def chunk_fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, cc_ptr, s0_ptr, y_ptr, sT_ptr, st_ptr,
                     T, NC, H, N: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                     HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_STATES: tl.constexpr,
                     PREFETCH: tl.constexpr, PREC: tl.constexpr, IO_V: tl.constexpr, BIAS: tl.constexpr):
    """Sequential forward on the precomputed [C, C] matrices (chunk_cc_kernel), grid (B*H, N/BV): carries
    the state rows [BV, N] over the chunks, writes y [B, T, H, N], the chunk-start states st [B, H, NC, N, N]
    (STORE_STATES) and the final state sT [B, H, N, N] (STORE_FINAL). PREFETCH: chunk n+1's inputs are loaded
    while chunk n is computed. IO_V: 1 when v is float32 (see chunk_bwd_grads_kernel), else 0."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_t = tl.arange(0, C)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs_cc = offs_t[:, None] * C + offs_t[None, :]
    p_s = offs_v[:, None] * N + offs_k[None, :]     # [BV, N] within one state
    if HAS_S0:
        S = tl.load(s0_ptr + i_bh * N * N + p_s).to(tl.float32)
    else:
        S = tl.zeros([BV, N], dtype=tl.float32)
    if PREFETCH:
        rr = _ld(r_ptr, 0, T, H, i_b, i_h, offs_t, offs_k, N, C)
        ww = _ld(w_ptr, 0, T, H, i_b, i_h, offs_t, offs_k, N, C)
        kk = _ld(k_ptr, 0, T, H, i_b, i_h, offs_t, offs_k, N, C)
        aa = _ld(a_ptr, 0, T, H, i_b, i_h, offs_t, offs_k, N, C)
        bb = _ld(b_ptr, 0, T, H, i_b, i_h, offs_t, offs_k, N, C)
        vv = _ld(v_ptr, 0, T, H, i_b, i_h, offs_t, offs_v, N, C)
        Q = _ldc(cc_ptr, i_bh, NC, 0, 0, offs_cc, C)
        L_ak = _ldc(cc_ptr, i_bh, NC, 0, 1, offs_cc, C)
        M_rb = _ldc(cc_ptr, i_bh, NC, 0, 2, offs_cc, C)
        M_rk = _ldc(cc_ptr, i_bh, NC, 0, 3, offs_cc, C)
    for n in range(NC):
        if PREFETCH:
            rr_n = _ld(r_ptr, n + 1, T, H, i_b, i_h, offs_t, offs_k, N, C)
            ww_n = _ld(w_ptr, n + 1, T, H, i_b, i_h, offs_t, offs_k, N, C)
            kk_n = _ld(k_ptr, n + 1, T, H, i_b, i_h, offs_t, offs_k, N, C)
            aa_n = _ld(a_ptr, n + 1, T, H, i_b, i_h, offs_t, offs_k, N, C)
            bb_n = _ld(b_ptr, n + 1, T, H, i_b, i_h, offs_t, offs_k, N, C)
            vv_n = _ld(v_ptr, n + 1, T, H, i_b, i_h, offs_t, offs_v, N, C)
            Q_n = _ldc(cc_ptr, i_bh, NC, n + 1, 0, offs_cc, C)
            L_ak_n = _ldc(cc_ptr, i_bh, NC, n + 1, 1, offs_cc, C)
            M_rb_n = _ldc(cc_ptr, i_bh, NC, n + 1, 2, offs_cc, C)
            M_rk_n = _ldc(cc_ptr, i_bh, NC, n + 1, 3, offs_cc, C)
        else:
            rr = _ld(r_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C)
            ww = _ld(w_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C)
            kk = _ld(k_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C)
            aa = _ld(a_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C)
            bb = _ld(b_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C)
            vv = _ld(v_ptr, n, T, H, i_b, i_h, offs_t, offs_v, N, C)
            Q = _ldc(cc_ptr, i_bh, NC, n, 0, offs_cc, C)
            L_ak = _ldc(cc_ptr, i_bh, NC, n, 1, offs_cc, C)
            M_rb = _ldc(cc_ptr, i_bh, NC, n, 2, offs_cc, C)
            M_rk = _ldc(cc_ptr, i_bh, NC, n, 3, offs_cc, C)
        if STORE_STATES:
            tl.store(st_ptr + (i_bh * NC + n) * N * N + p_s, S)
        w32 = ww.to(tl.float32)
        v32 = vv.to(tl.float32)
        g = tl.cumsum(w32, axis=0)                  # [C, N]
        gC = tl.sum(w32, axis=0)                    # [N]
        e_end = tl.exp(gC[None, :] - g)
        St = tl.trans(S)                            # [N, BV]
        Z = _dotn(aa.to(tl.float32) * tl.exp(g - w32), St, PREC, 2, BIAS) + _dotn(L_ak, v32, PREC, 1 + IO_V, BIAS)
        U = _dotn(Q, Z, PREC, 2, BIAS) + Z          # [C, BV] = (I - L_ab)^{-1} Z
        Y = (_dotn(rr.to(tl.float32) * tl.exp(g), St, PREC, 2, BIAS) + _dotn(M_rb, U, PREC, 2, BIAS)
             + _dot_split(M_rk, v32, PREC, IO_V == 0, BIAS))
        t = n * C + offs_t
        p_y = (((i_b * T + t) * H + i_h) * N)[:, None] + offs_v[None, :]
        tl.store(y_ptr + p_y, Y.to(y_ptr.dtype.element_ty), mask=(t < T)[:, None])
        S = (S * tl.exp(gC)[None, :] + _dotn(tl.trans(U), bb.to(tl.float32) * e_end, PREC, 2, BIAS)
             + _dotn(tl.trans(v32), kk.to(tl.float32) * e_end, PREC, IO_V + 1, BIAS))
        if PREFETCH:
            rr, ww, kk, aa, bb, vv = rr_n, ww_n, kk_n, aa_n, bb_n, vv_n
            Q, L_ak, M_rb, M_rk = Q_n, L_ak_n, M_rb_n, M_rk_n
    if STORE_FINAL:
        tl.store(sT_ptr + i_bh * N * N + p_s, S)


@triton.jit
def chunk_bwd_dstate_kernel(r_ptr, w_ptr, a_ptr, b_ptr, cc_ptr, dy_ptr, dsT_ptr, dst_ptr, ds0_ptr,
                            T, NC, H, N: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                            HAS_DST: tl.constexpr, PREFETCH: tl.constexpr, PREC: tl.constexpr,
                            IO_DY: tl.constexpr, BIAS: tl.constexpr):
    """Sequential pass of the backward, grid (B*H, N/BV): walks the chunks in reverse carrying dS, on the
    precomputed Q = (I - L_ab)^{-1} - I and M_rb, and stores dst[n] = dL/dS at the end of chunk n [B, H, NC, N, N];
    ds0 = dL/d(initial state) [B, H, N, N]. PREFETCH: chunk n-1's inputs are loaded while chunk n is computed.
    IO_DY: 1 when dy is float32 (see chunk_bwd_grads_kernel), else 0."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_t = tl.arange(0, C)
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs_cc = offs_t[:, None] * C + offs_t[None, :]
    p_s = offs_v[:, None] * N + offs_k[None, :]
    if HAS_DST:
        dS = tl.load(dsT_ptr + i_bh * N * N + p_s).to(tl.float32)
    else:
        dS = tl.zeros([BV, N], dtype=tl.float32)
    if PREFETCH:
        rr = _ld(r_ptr, NC - 1, T, H, i_b, i_h, offs_t, offs_k, N, C)
        ww = _ld(w_ptr, NC - 1, T, H, i_b, i_h, offs_t, offs_k, N, C)
        aa = _ld(a_ptr, NC - 1, T, H, i_b, i_h, offs_t, offs_k, N, C)
        bb = _ld(b_ptr, NC - 1, T, H, i_b, i_h, offs_t, offs_k, N, C)
        dY = _ld(dy_ptr, NC - 1, T, H, i_b, i_h, offs_t, offs_v, N, C)
        Q = _ldc(cc_ptr, i_bh, NC, NC - 1, 0, offs_cc, C)
        M_rb = _ldc(cc_ptr, i_bh, NC, NC - 1, 2, offs_cc, C)
    for i in range(NC):
        n = NC - 1 - i
        if PREFETCH:   # chunk n-1; at n = 0 that is chunk -1: every t < 0, so clamp to a masked-out chunk
            m = tl.where(n > 0, n - 1, NC)
            rr_n = _ld(r_ptr, m, T, H, i_b, i_h, offs_t, offs_k, N, C)
            ww_n = _ld(w_ptr, m, T, H, i_b, i_h, offs_t, offs_k, N, C)
            aa_n = _ld(a_ptr, m, T, H, i_b, i_h, offs_t, offs_k, N, C)
            bb_n = _ld(b_ptr, m, T, H, i_b, i_h, offs_t, offs_k, N, C)
            dY_n = _ld(dy_ptr, m, T, H, i_b, i_h, offs_t, offs_v, N, C)
            Q_n = _ldc(cc_ptr, i_bh, NC, m, 0, offs_cc, C)
            M_rb_n = _ldc(cc_ptr, i_bh, NC, m, 2, offs_cc, C)
        else:
            rr = _ld(r_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C)
            ww = _ld(w_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C)
            aa = _ld(a_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C)
            bb = _ld(b_ptr, n, T, H, i_b, i_h, offs_t, offs_k, N, C)
            dY = _ld(dy_ptr, n, T, H, i_b, i_h, offs_t, offs_v, N, C)
            Q = _ldc(cc_ptr, i_bh, NC, n, 0, offs_cc, C)
            M_rb = _ldc(cc_ptr, i_bh, NC, n, 2, offs_cc, C)
        tl.store(dst_ptr + (i_bh * NC + n) * N * N + p_s, dS)
        w32 = ww.to(tl.float32)
        dY32 = dY.to(tl.float32)                    # [C, BV]
        g = tl.cumsum(w32, axis=0)
        gC = tl.sum(w32, axis=0)
        b_e = bb.to(tl.float32) * tl.exp(gC[None, :] - g)
        dU = _dotn(tl.trans(M_rb), dY32, PREC, 1 + IO_DY, BIAS) + _dotn(b_e, tl.trans(dS), PREC, 2, BIAS)
        dZ = _dotn(tl.trans(Q), dU, PREC, 2, BIAS) + dU      # (I - L_ab)^{-T} dU
        dS = (_dotn(tl.trans(dY32), rr.to(tl.float32) * tl.exp(g), PREC, IO_DY + 1, BIAS)
              + _dotn(tl.trans(dZ), aa.to(tl.float32) * tl.exp(g - w32), PREC, 2, BIAS)
              + dS * tl.exp(gC)[None, :])
        if PREFETCH:
            rr, ww, aa, bb, dY, Q, M_rb = rr_n, ww_n, aa_n, bb_n, dY_n, Q_n, M_rb_n
    tl.store(ds0_ptr + i_bh * N * N + p_s, dS)


@triton.jit
def chunk_bwd_grads_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, st_ptr, dst_ptr, dy_ptr,
                           dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr,
                           T, NC, H, N: tl.constexpr, C: tl.constexpr, LOG2C: tl.constexpr,
                           PREC: tl.constexpr, IO_DY: tl.constexpr, IO_V: tl.constexpr, BIAS: tl.constexpr):
    """Parallel pass of the backward, grid (NC * B*H,): one chunk each, from its start state st[n] and the
    gradient dst[n] of its end state; writes the chunk's dr, dw, dk, dv, da, db [B, T, H, N]. It recomputes
    the chunk's [C, C] matrices (_chunk_terms) rather than loading chunk_cc_kernel's: measured faster on the
    H200, where this kernel runs many programs at once. IO_DY / IO_V: 1 when dy / v is float32 (then "tf32c"
    counts it as a truncated operand; bf16/fp16 values are exact in tf32), else 0."""
    n = tl.program_id(0) % NC      # one-dimensional grid (chunks x heads): its second dimension stops at 65535
    i_bh = tl.program_id(0) // NC
    i_b = i_bh // H
    i_h = i_bh % H
    offs_t = tl.arange(0, C)
    offs_k = tl.arange(0, N)
    p_s = offs_k[:, None] * N + offs_k[None, :]
    tri_s = offs_t[:, None] > offs_t[None, :]
    tri_i = offs_t[:, None] >= offs_t[None, :]
    t = n * C + offs_t
    mk = (t < T)[:, None]
    base = ((i_b * T + t) * H + i_h) * N
    pk = base[:, None] + offs_k[None, :]
    S = tl.load(st_ptr + (i_bh * NC + n) * N * N + p_s)            # [V, K] chunk-start state
    dS = tl.load(dst_ptr + (i_bh * NC + n) * N * N + p_s)          # [V, K] gradient of the chunk-end state
    dY = tl.load(dy_ptr + pk, mask=mk, other=0.).to(tl.float32)    # [C, V]
    (vv, g, gx, gC, a_d, r_d, b_u, k_u, b_e, k_e, L_ab, L_ak, M_rb, M_rk,
     Q) = _chunk_terms(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, pk, mk, tri_s, tri_i, LOG2C, PREC, BIAS)
    # _dotn's third argument: how many of the two operands are float32 values truncation changes
    Z = _dot_big(a_d, tl.trans(S), PREC, 2, BIAS) + _dotn(L_ak, vv, PREC, 1 + IO_V, BIAS)
    U = _dotn(Q, Z, PREC, 2, BIAS) + Z     # [C, V] = (I - L_ab)^{-1} Z
    dSt = tl.trans(dS)                              # [K, V]
    dU = _dotn(tl.trans(M_rb), dY, PREC, 1 + IO_DY, BIAS) + _dot_big(b_e, dSt, PREC, 2, BIAS)
    dZ = _dotn(tl.trans(Q), dU, PREC, 2, BIAS) + dU
    dL_ab = tl.where(tri_s, _dotn(dZ, tl.trans(U), PREC, 2, BIAS), 0.)
    dL_ak = tl.where(tri_s, _dotn(dZ, tl.trans(vv), PREC, 1 + IO_V, BIAS), 0.)
    dM_rb = tl.where(tri_i, _dotn(dY, tl.trans(U), PREC, 1 + IO_DY, BIAS), 0.)
    dM_rk = tl.where(tri_i, _dotn(dY, tl.trans(vv), PREC, IO_DY + IO_V, BIAS), 0.)
    dV = (_dotn(tl.trans(M_rk), dY, PREC, 1 + IO_DY, BIAS) + _dotn(tl.trans(L_ak), dZ, PREC, 2, BIAS)
          + _dot_big(k_e, dSt, PREC, 2, BIAS))
    dR_d = (_dot_big(dY, S, PREC, 1 + IO_DY, BIAS) + _dotn(dM_rb, b_u, PREC, 2, BIAS)
            + _dotn(dM_rk, k_u, PREC, 2, BIAS))
    dA_d = (_dot_big(dZ, S, PREC, 2, BIAS) + _dotn(dL_ab, b_u, PREC, 2, BIAS)
            + _dotn(dL_ak, k_u, PREC, 2, BIAS))
    dB_u = _dotn(tl.trans(dM_rb), r_d, PREC, 2, BIAS) + _dotn(tl.trans(dL_ab), a_d, PREC, 2, BIAS)
    dK_u = _dotn(tl.trans(dM_rk), r_d, PREC, 2, BIAS) + _dotn(tl.trans(dL_ak), a_d, PREC, 2, BIAS)
    dB_e = _dot_big(U, dS, PREC, 2, BIAS)      # [C, K]
    dK_e = _dot_big(vv, dS, PREC, 1 + IO_V, BIAS)
    egC = tl.exp(gC)
    dgC = tl.sum(dS * S, axis=0) * egC + tl.sum(dB_e * b_e + dK_e * k_e, axis=0)   # [K]
    e_neg = tl.exp(-g)
    e_end = tl.exp(gC[None, :] - g)
    dg = dR_d * r_d - dB_u * b_u - dB_e * b_e - dK_u * k_u - dK_e * k_e
    dgx = dA_d * a_d
    dw = tl.cumsum(dg, axis=0, reverse=True) + tl.cumsum(dgx, axis=0, reverse=True) - dgx + dgC[None, :]
    tl.store(dr_ptr + pk, (dR_d * tl.exp(g)).to(dr_ptr.dtype.element_ty), mask=mk)
    tl.store(dw_ptr + pk, dw.to(dw_ptr.dtype.element_ty), mask=mk)
    tl.store(dk_ptr + pk, (dK_u * e_neg + dK_e * e_end).to(dk_ptr.dtype.element_ty), mask=mk)
    tl.store(dv_ptr + pk, dV.to(dv_ptr.dtype.element_ty), mask=mk)
    tl.store(da_ptr + pk, (dA_d * tl.exp(gx)).to(da_ptr.dtype.element_ty), mask=mk)
    tl.store(db_ptr + pk, (dB_u * e_neg + dB_e * e_end).to(db_ptr.dtype.element_ty), mask=mk)


@triton.jit
def recurrent_fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, sT_ptr,
                         T, H, N: tl.constexpr, BV: tl.constexpr,
                         HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr):
    """grid (B*H, N/BV): one step at a time, state block [BV, N] in registers."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_k = tl.arange(0, N)
    offs_v = i_v * BV + tl.arange(0, BV)
    p_s = offs_v[:, None] * N + offs_k[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + i_bh * N * N + p_s).to(tl.float32)
    else:
        S = tl.zeros([BV, N], dtype=tl.float32)
    for t in range(T):
        base = ((i_b * T + t) * H + i_h) * N
        rr = tl.load(r_ptr + base + offs_k).to(tl.float32)
        ww = tl.load(w_ptr + base + offs_k).to(tl.float32)
        kk = tl.load(k_ptr + base + offs_k).to(tl.float32)
        aa = tl.load(a_ptr + base + offs_k).to(tl.float32)
        bb = tl.load(b_ptr + base + offs_k).to(tl.float32)
        vv = tl.load(v_ptr + base + offs_v).to(tl.float32)
        sa = tl.sum(S * aa[None, :], axis=1)        # [BV]
        S = S * tl.exp(ww)[None, :] + sa[:, None] * bb[None, :] + vv[:, None] * kk[None, :]
        y = tl.sum(S * rr[None, :], axis=1)
        tl.store(y_ptr + base + offs_v, y.to(y_ptr.dtype.element_ty))
    if STORE_FINAL:
        tl.store(sT_ptr + i_bh * N * N + p_s, S)
