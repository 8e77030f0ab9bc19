"""WKV7's backward gradient kernel in Gluon (Triton's explicit-layout dialect): the same math as
triton_kernels.chunk_bwd_grads_kernel for C = 16, N = 64, 4 warps and precision_bwd "bf16x3k" or "bf16x3".
The Triton kernel stays the reference (it also runs in the CPU interpreter, which Gluon does not) and the
path for every other configuration; tests/test_wkv7.py compares the two on the GPU.

Why: the Triton kernel lets the compiler route every product's operands through shared memory (~99 CTA
barriers, ~0.9 KB of register spills per program, 4,440 SASS instructions; offline, triton 3.6), and Nsight
showed this kernel bound by the L1/shared-memory pipe. Here each tile is staged in shared memory once, in a
bank-conflict-free swizzle (gl.bank_conflicts), the states and the inputs arrive by cp.async (16-byte
coalesced copies that take no registers), and ~29 barriers remain: 2,408 SASS instructions, no spills
("bf16x3k"; with BIG_X3: 2,744, 16 bytes of stack). It needs ~102 KiB of shared memory per block (H100 / H200 /
A100; chunk._launch_grads falls back to the Triton kernel where it does not fit or compile).
H200, session 6 (bench/results/wkv7.md, runs 35 and 38): 2.16-2.18 vs 4.08 ms on B8-T4096-H32, 0.22 vs 0.39 ms on
B16-T512-H12, the same errors.

Layout plan: every [C, N] tile is "column-owned" (the MMA accumulator layout with warps_per_cta [1, 4]: warp w
holds columns 16w..16w+15 of all 16 rows), so elementwise work, column sums and cumsums stay inside a warp.
Products:
  (i)   [C, C] x [C, N] -> [C, N]: A = a [C, C] matrix (every warp reads all of it), B = a [C, N] tile (each
        warp reads its own columns), both from shared memory;
  (ii)  [C, N] x [N, C] -> [C, C] (contraction over N): both operands from shared memory (all columns);
  (iii) [C, N] x [N, N] with S / dS: A from shared memory (all columns), B = the warp's 16 columns of S, S^T,
        dS or dS^T, read from the states' shared copies (S and dS never sit whole in registers).
Precision: (i) and (ii) as bf16x3 (hi + lo bf16 halves, three MMAs); (iii) as tf32c ("bf16x3k") or, with
BIG_X3 ("bf16x3"), as bf16x3 on hi / lo copies of S and dS. Products are named as in
triton_kernels.chunk_bwd_grads_kernel, whose docstring has the equations.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8]))
A16 = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
B16 = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
A32 = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1))
B32 = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=1))
ROW = gl.constexpr(gl.SliceLayout(1, MMA))
COL = gl.constexpr(gl.SliceLayout(0, MMA))
SCAN = gl.constexpr(gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[2, 16], warps_per_cta=[1, 4],
                                     order=[0, 1]))
"""For cumsums over the C rows (scans do not take MMA layouts): also column-owned, so the conversions stay
inside a warp."""
SMEM_CN = gl.constexpr(gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]))
SMEM_CC = gl.constexpr(gl.SwizzledSharedLayout(vec=8, per_phase=4, max_phase=2, order=[1, 0]))
SMEM_32 = gl.constexpr(gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0]))
"""Swizzles with no bank conflicts (gl.bank_conflicts, triton 3.6) for bf16 [C, N], [N, N] and [C, C] tiles
in the layouts they are loaded into (transposed too), and for float32 tiles and states as A / B operands of
tf32 products (at most one extra wavefront on some stores); unswizzled, some accesses had 7."""
COPY = gl.constexpr(gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                     order=[1, 0]))
COPY16 = gl.constexpr(gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                       order=[1, 0]))
COPY32 = gl.constexpr(gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[2, 16], warps_per_cta=[4, 1],
                                       order=[1, 0]))
"""cp.async layouts: 16 bytes per thread for a float32 [N, N] state (COPY) and for a [C, N] input chunk
in 16-bit (COPY16) or float32 (COPY32)."""


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _cumsum(x, REVERSE: gl.constexpr):
    """Cumulative sum over the rows of a column-owned [C, N] tile (inclusive; from the end when REVERSE)."""
    return gl.convert_layout(gl.associative_scan(gl.convert_layout(x, SCAN), 0, _add, reverse=REVERSE), MMA)


@gluon.jit
def _split(x):
    hi = x.to(gl.bfloat16)
    lo = (x - hi.to(gl.float32)).to(gl.bfloat16)
    return hi, lo


@gluon.jit
def _x3(a_hi, a_lo, b_hi, b_lo, acc, A_LO: gl.constexpr, B_LO: gl.constexpr):
    """acc + a b as bf16x3 (operands already in A16 / B16). A_LO / B_LO: False where that operand is exact in
    bf16 (a bf16 input: its lo half is zero), which skips the product with it."""
    if A_LO:
        acc = mma_v2(a_lo, b_hi, acc)
    if B_LO:
        acc = mma_v2(a_hi, b_lo, acc)
    return mma_v2(a_hi, b_hi, acc)


@gluon.jit
def _buf(R: gl.constexpr, K: gl.constexpr):
    """A staging slot: separate shared allocations for the hi and lo halves of an [R, K] tile (one
    allocation per tile, so the barrier analysis sees that different tiles do not overlap)."""
    if R == K:
        return (gl.allocate_shared_memory(gl.bfloat16, [R, K], SMEM_CC),
                gl.allocate_shared_memory(gl.bfloat16, [R, K], SMEM_CC))
    else:
        return (gl.allocate_shared_memory(gl.bfloat16, [R, K], SMEM_CN),
                gl.allocate_shared_memory(gl.bfloat16, [R, K], SMEM_CN))


@gluon.jit
def _stage(slot, x, LO: gl.constexpr):
    """Store the hi and lo halves of x into slot (the hi half alone where LO is False: x is exact in bf16)."""
    hi, lo = _split(x)
    slot[0].store(hi)
    if LO:
        slot[1].store(lo)


@gluon.jit
def _opnd(slot, LAYOUT: gl.constexpr, TRANS: gl.constexpr, LO: gl.constexpr):
    """The hi and lo halves of a staged tile, loaded in LAYOUT (transposed when TRANS); without LO the lo half
    is not loaded (the hi half stands in for it, unused)."""
    if TRANS:
        hi = slot[0].permute((1, 0)).load(LAYOUT)
        lo = slot[1].permute((1, 0)).load(LAYOUT) if LO else hi
    else:
        hi = slot[0].load(LAYOUT)
        lo = slot[1].load(LAYOUT) if LO else hi
    return hi, lo


@gluon.jit
def _buf32(R: gl.constexpr, K: gl.constexpr):
    """A float32 staging slot (A operands of the tf32 products with S / dS)."""
    return gl.allocate_shared_memory(gl.float32, [R, K], SMEM_32)


@gluon.jit
def _mm_cs(m, TRANS: gl.constexpr, x, acc, X_LO: gl.constexpr):
    """(i): acc + M X, M a staged [C, C] matrix (M^T when TRANS), X a staged [C, N] tile (each warp reads its
    own columns; X_LO: False where X is exact in bf16)."""
    m_hi, m_lo = _opnd(m, A16, TRANS, True)
    x_hi, x_lo = _opnd(x, B16, False, X_LO)
    return _x3(m_hi, m_lo, x_hi, x_lo, acc, True, X_LO)


@gluon.jit
def _mm(x, y, TRANS: gl.constexpr, acc, X_LO: gl.constexpr, Y_LO: gl.constexpr):
    """acc + X Y (X Y^T when TRANS) as bf16x3, X and Y staged tiles read as A and B operands: (ii), X Y^T
    with [C, N] tiles -> [C, C]; (iii) with a split state Y [N, N] (BIG_X3). X_LO / Y_LO: False where that
    tile is exact in bf16."""
    x_hi, x_lo = _opnd(x, A16, False, X_LO)
    y_hi, y_lo = _opnd(y, B16, TRANS, Y_LO)
    return _x3(x_hi, x_lo, y_hi, y_lo, acc, X_LO, Y_LO)


@gluon.jit
def _copy_state(ptr, N: gl.constexpr):
    """Start the asynchronous copy of one [N, N] float32 state into a new shared buffer."""
    buf = gl.allocate_shared_memory(gl.float32, [N, N], SMEM_32)
    rows = gl.arange(0, N, layout=gl.SliceLayout(1, COPY))
    cols = gl.arange(0, N, layout=gl.SliceLayout(0, COPY))
    async_copy.async_copy_global_to_shared(buf, ptr + rows[:, None] * N + cols[None, :])
    return buf


@gluon.jit
def _split_states(s_S, s_dS, N: gl.constexpr):
    """The hi and lo bf16 halves of the staged float32 states S and dS [N, N] in new shared buffers (for the
    bf16x3 products with them), and sum_v S[v, k] dS[v, k] [N] (for dw)."""
    x = s_S.load(COPY)
    y = s_dS.load(COPY)
    hS = (gl.allocate_shared_memory(gl.bfloat16, [N, N], SMEM_CN), gl.allocate_shared_memory(gl.bfloat16, [N, N], SMEM_CN))
    hdS = (gl.allocate_shared_memory(gl.bfloat16, [N, N], SMEM_CN), gl.allocate_shared_memory(gl.bfloat16, [N, N], SMEM_CN))
    _stage(hS, x, True)
    _stage(hdS, y, True)
    return hS, hdS, gl.convert_layout(gl.sum(x * y, axis=0), COL)


@gluon.jit
def _copy_chunk(ptr, n, T, H, i_b, i_h, C: gl.constexpr, N: gl.constexpr):
    """Start the asynchronous copy of chunk n of one head of a [B, T, H, N] input (bf16/fp16 or fp32) into a
    new shared buffer; rows past T are zero-filled."""
    if ptr.dtype.element_ty == gl.float32:
        buf = gl.allocate_shared_memory(gl.float32, [C, N], SMEM_32)
        t = n * C + gl.arange(0, C, layout=gl.SliceLayout(1, COPY32))
        cols = gl.arange(0, N, layout=gl.SliceLayout(0, COPY32))
    else:
        buf = gl.allocate_shared_memory(ptr.dtype.element_ty, [C, N], SMEM_CN)
        t = n * C + gl.arange(0, C, layout=gl.SliceLayout(1, COPY16))
        cols = gl.arange(0, N, layout=gl.SliceLayout(0, COPY16))
    p = ptr + (((i_b * T + t) * H + i_h) * N)[:, None] + cols[None, :]
    async_copy.async_copy_global_to_shared(buf, p, mask=(t < T)[:, None])
    return buf


@gluon.jit
def chunk_bwd_grads_gluon(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, st_ptr, dst_ptr, dy_ptr,
                          dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr,
                          T, NC, H, N: gl.constexpr, C: gl.constexpr, LOG2C: gl.constexpr,
                          IO_DY: gl.constexpr, IO_V: gl.constexpr, BIAS: gl.constexpr, BIG_X3: gl.constexpr,
                          LO_DY: gl.constexpr, LO_V: gl.constexpr):
    """Grid (NC * B*H,), 4 warps, C = 16, N = 64: chunk n of head (b, h), from its start state st[n] and the
    gradient dst[n] of its end state; writes the chunk's dr, dw, dk, dv, da, db [B, T, H, N]. IO_DY / IO_V:
    1 when dy / v is float32 (its truncation to tf32 is then compensated), else 0. BIG_X3: the seven products
    with S / dS as bf16x3 ("bf16x3") instead of tf32c ("bf16x3k"). LO_DY / LO_V: False when dy / v is bf16,
    so exact in one bf16 half: the products' terms with their (zero) lo halves are skipped."""
    n = gl.program_id(0) % NC
    i_bh = gl.program_id(0) // NC
    i_b = i_bh // H
    i_h = i_bh % H
    offs_t = gl.arange(0, C, layout=ROW)
    offs_k = gl.arange(0, N, layout=COL)
    t = n * C + offs_t
    mk = (t < T)[:, None] & (offs_k < N)[None, :]
    pk = (((i_b * T + t) * H + i_h) * N)[:, None] + offs_k[None, :]         # [C, N] column-owned
    tj = gl.arange(0, C, layout=COL)
    tri_s = offs_t[:, None] > tj[None, :]
    tri_i = offs_t[:, None] >= tj[None, :]
    ps = st_ptr + (i_bh * NC + n) * N * N
    pds = dst_ptr + (i_bh * NC + n) * N * N

    x_r = _copy_chunk(r_ptr, n, T, H, i_b, i_h, C, N)
    x_w = _copy_chunk(w_ptr, n, T, H, i_b, i_h, C, N)
    x_k = _copy_chunk(k_ptr, n, T, H, i_b, i_h, C, N)
    x_v = _copy_chunk(v_ptr, n, T, H, i_b, i_h, C, N)
    x_a = _copy_chunk(a_ptr, n, T, H, i_b, i_h, C, N)
    x_b = _copy_chunk(b_ptr, n, T, H, i_b, i_h, C, N)
    x_dy = _copy_chunk(dy_ptr, n, T, H, i_b, i_h, C, N)
    async_copy.commit_group()
    s_S = _copy_state(ps, N)                    # [V, K]
    s_dS = _copy_state(pds, N)
    async_copy.commit_group()
    async_copy.wait_group(1)                    # the inputs are in (the states may still be on their way)
    gl.thread_barrier()
    rr = x_r.load(MMA).to(gl.float32)
    ww = x_w.load(MMA).to(gl.float32)
    kk = x_k.load(MMA).to(gl.float32)
    vv = x_v.load(MMA).to(gl.float32)
    aa = x_a.load(MMA).to(gl.float32)
    bb = x_b.load(MMA).to(gl.float32)
    dY = x_dy.load(MMA).to(gl.float32)

    ww_s = x_w.load(SCAN).to(gl.float32)
    g = gl.convert_layout(gl.associative_scan(ww_s, 0, _add), MMA)    # [C, N] inclusive cumsum of w
    gx = g - ww
    gC = gl.sum(ww, axis=0)                     # [N]
    a_d = aa * gl.exp(gx)
    r_d = rr * gl.exp(g)
    e_neg = gl.exp(-g)
    b_u = bb * e_neg
    k_u = kk * e_neg
    e_end = gl.exp(gC[None, :] - g)
    b_e = bb * e_end
    k_e = kk * e_end

    s_ad = _buf(C, N)
    s_rd = _buf(C, N)
    s_bu = _buf(C, N)
    s_ku = _buf(C, N)
    s_dy = _buf(C, N)
    s_v = _buf(C, N)
    s_u = _buf(C, N)
    s_dz = _buf(C, N)
    s_z = _buf(C, N)
    s_du = _buf(C, N)
    s_q = _buf(C, C)
    s_lak = _buf(C, C)
    s_mrb = _buf(C, C)
    s_mrk = _buf(C, C)
    s_dlab = _buf(C, C)
    s_dlak = _buf(C, C)
    s_dmrb = _buf(C, C)
    s_dmrk = _buf(C, C)
    _stage(s_ad, a_d, True)
    _stage(s_rd, r_d, True)
    _stage(s_bu, b_u, True)
    _stage(s_ku, k_u, True)
    if BIG_X3:
        s_be = _buf(C, N)
        s_ke = _buf(C, N)
        _stage(s_be, b_e, True)
        _stage(s_ke, k_e, True)
    else:
        f_be = _buf32(C, N)
        f_ke = _buf32(C, N)
        f_ad = _buf32(C, N)
        f_dy = _buf32(C, N)
        f_v = _buf32(C, N)
        f_be.store(b_e)
        f_ke.store(k_e)
        f_ad.store(a_d)
        f_dy.store(dY)
        f_v.store(vv)
    _stage(s_dy, dY, LO_DY)
    _stage(s_v, vv, LO_V)
    gl.thread_barrier()

    zcc = gl.full([C, C], 0.0, gl.float32, MMA)
    L_ab = gl.where(tri_s, _mm(s_ad, s_bu, True, zcc, True, True), 0.)
    L_ak = gl.where(tri_s, _mm(s_ad, s_ku, True, zcc, True, True), 0.)
    M_rb = gl.where(tri_i, _mm(s_rd, s_bu, True, zcc, True, True), 0.)
    M_rk = gl.where(tri_i, _mm(s_rd, s_ku, True, zcc, True, True), 0.)

    # Q = (I - L_ab)^{-1} - I by doubling: Lp <- Lp Lp, Q <- Q + Lp + Q Lp (each step's operands staged)
    Q = L_ab
    Lp = L_ab
    for _ in gl.static_range(LOG2C - 1):
        s_lp = _buf(C, C)
        _stage(s_lp, Lp, True)
        gl.thread_barrier()
        a_hi, a_lo = _opnd(s_lp, A16, False, True)
        b_hi, b_lo = _opnd(s_lp, B16, False, True)
        Lp = _x3(a_hi, a_lo, b_hi, b_lo, zcc, True, True)
        s_lp2 = _buf(C, C)
        s_qs = _buf(C, C)
        _stage(s_lp2, Lp, True)
        _stage(s_qs, Q, True)
        gl.thread_barrier()
        b_hi, b_lo = _opnd(s_lp2, B16, False, True)
        q_hi, q_lo = _opnd(s_qs, A16, False, True)
        Q = Q + Lp + _x3(q_hi, q_lo, b_hi, b_lo, zcc, True, True)

    _stage(s_q, Q, True)
    _stage(s_lak, L_ak, True)
    _stage(s_mrb, M_rb, True)
    _stage(s_mrk, M_rk, True)
    gl.thread_barrier()

    zcn = gl.full([C, N], 0.0, gl.float32, MMA)
    c_big_v = 1.0 + (1 + IO_V) * BIAS
    c_big = 1.0 + 2 * BIAS
    async_copy.wait_group(0)
    gl.thread_barrier()
    if BIG_X3:
        hS, hdS, sS = _split_states(s_S, s_dS, N)
        gl.thread_barrier()
        Z = _mm(s_ad, hS, True, zcn, True, True)                                      # a_d S^T
        dU = _mm(s_be, hdS, True, zcn, True, True)                                    # b_e dS^T
        dV = _mm(s_ke, hdS, True, zcn, True, True)                                    # k_e dS^T
    else:
        St = s_S.permute((1, 0)).load(B32)      # B = S^T: [K, V], this warp's value columns
        dSt = s_dS.permute((1, 0)).load(B32)
        Z = mma_v2(f_ad.load(A32), St, zcn, input_precision="tf32") * c_big
        dU = mma_v2(f_be.load(A32), dSt, zcn, input_precision="tf32") * c_big
        dV = mma_v2(f_ke.load(A32), dSt, zcn, input_precision="tf32") * c_big
    Z = _mm_cs(s_lak, False, s_v, Z, LO_V)                                      # + L_ak V
    dU = _mm_cs(s_mrb, True, s_dy, dU, LO_DY)                                     # + M_rb^T dY
    dV = _mm_cs(s_mrk, True, s_dy, dV, LO_DY)                                     # + M_rk^T dY
    _stage(s_z, Z, True)
    _stage(s_du, dU, True)
    gl.thread_barrier()
    U = _mm_cs(s_q, False, s_z, Z, True)                                     # Q Z + Z
    dZ = _mm_cs(s_q, True, s_du, dU, True)                                    # Q^T dU + dU
    _stage(s_u, U, True)
    _stage(s_dz, dZ, True)
    if not BIG_X3:
        f_u = _buf32(C, N)
        f_dz = _buf32(C, N)
        f_u.store(U)
        f_dz.store(dZ)
    gl.thread_barrier()

    dL_ab = gl.where(tri_s, _mm(s_dz, s_u, True, zcc, True, True), 0.)
    dL_ak = gl.where(tri_s, _mm(s_dz, s_v, True, zcc, True, LO_V), 0.)
    dM_rb = gl.where(tri_i, _mm(s_dy, s_u, True, zcc, LO_DY, True), 0.)
    dM_rk = gl.where(tri_i, _mm(s_dy, s_v, True, zcc, LO_DY, LO_V), 0.)
    _stage(s_dlab, dL_ab, True)
    _stage(s_dlak, dL_ak, True)
    _stage(s_dmrb, dM_rb, True)
    _stage(s_dmrk, dM_rk, True)
    gl.thread_barrier()

    dV = _mm_cs(s_lak, True, s_dz, dV, True)                                     # + L_ak^T dZ
    if BIG_X3:
        dR_d = _mm(s_dy, hS, False, zcn, LO_DY, True)                                  # dY S
        dA_d = _mm(s_dz, hS, False, zcn, True, True)                                  # dZ S
    else:
        S_ = s_S.load(B32)                      # B = S: [V, K], this warp's key columns
        dS_ = s_dS.load(B32)
        sS = gl.convert_layout(gl.sum(dS_ * S_, axis=0), COL)
        dR_d = mma_v2(f_dy.load(A32), S_, zcn, input_precision="tf32") * (1.0 + (1 + IO_DY) * BIAS)
        dA_d = mma_v2(f_dz.load(A32), S_, zcn, input_precision="tf32") * c_big
    dR_d = _mm_cs(s_dmrb, False, s_bu, dR_d, True)
    dR_d = _mm_cs(s_dmrk, False, s_ku, dR_d, True)
    dA_d = _mm_cs(s_dlab, False, s_bu, dA_d, True)
    dA_d = _mm_cs(s_dlak, False, s_ku, dA_d, True)
    dB_u = _mm_cs(s_dmrb, True, s_rd, zcn, True)
    dB_u = _mm_cs(s_dlab, True, s_ad, dB_u, True)
    dK_u = _mm_cs(s_dmrk, True, s_rd, zcn, True)
    dK_u = _mm_cs(s_dlak, True, s_ad, dK_u, True)
    if BIG_X3:
        dB_e = _mm(s_u, hdS, False, zcn, True, True)                                  # U dS
        dK_e = _mm(s_v, hdS, False, zcn, LO_V, True)                                  # V dS
    else:
        dB_e = mma_v2(f_u.load(A32), dS_, zcn, input_precision="tf32") * c_big
        dK_e = mma_v2(f_v.load(A32), dS_, zcn, input_precision="tf32") * c_big_v

    egC = gl.exp(gC)
    dgC = sS * egC + gl.sum(dB_e * b_e + dK_e * k_e, axis=0)
    dg = dR_d * r_d - dB_u * b_u - dB_e * b_e - dK_u * k_u - dK_e * k_e
    dgx = dA_d * a_d
    dw = _cumsum(dg + dgx, True) - dgx + dgC[None, :]     # reverse cumsums of dg and dgx in one scan
    gl.store(dr_ptr + pk, (dR_d * gl.exp(g)).to(dr_ptr.dtype.element_ty), mask=mk)
    gl.store(dw_ptr + pk, dw.to(dw_ptr.dtype.element_ty), mask=mk)
    gl.store(dk_ptr + pk, (dK_u * e_neg + dK_e * e_end).to(dk_ptr.dtype.element_ty), mask=mk)
    gl.store(dv_ptr + pk, dV.to(dv_ptr.dtype.element_ty), mask=mk)
    gl.store(da_ptr + pk, (dA_d * gl.exp(gx)).to(da_ptr.dtype.element_ty), mask=mk)
    gl.store(db_ptr + pk, (dB_u * e_neg + dB_e * e_end).to(db_ptr.dtype.element_ty), mask=mk)
