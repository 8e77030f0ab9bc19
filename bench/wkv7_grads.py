"""Variants of WKV7's backward gradient kernel, timed alone on one GPU: the Triton kernel ("shipped",
triton_kernels.chunk_bwd_grads_kernel, the reference), the Gluon one ("gluon", gluon_kernels.py, the GPU
default since session 6: 2.18 vs 4.08 ms on B8-T4096-H32, run 35) and variants.

The Triton gradient kernel was 61% of forward + backward on B8-T4096-H32 (bench/results/wkv7.md): one
program per chunk and head, latency-bound at two programs per SM (255 registers per thread). Variants:
- `ks` (kept here): loops over key blocks of BK columns so fewer values are live. Pass 1 accumulates what
  sums over keys (the [C, C] matrices, a_d S^T, b_e dS^T, k_e dS^T); the chunk's U, dZ and the [C, C]
  gradients follow; pass 2 produces the per-key gradients block by block, reloading S and dS (from L2) and
  recomputing the decays. 4.53 vs 3.91 ms on B8-T4096-H32 (run 14): slower.
- Timed and removed (results in bench/results/wkv7_run16_grads_persistent.json, wkv7_run18_*): the shipped
  body in a persistent loop over (chunk, head) items with Triton's loop pipelining (1-3 programs per SM, 1-3
  stages: 5.58-7.34 ms), and "tf32r" with each operand rounded once where it is made (6.07 vs 7.16 ms for
  rounding inside every product, 3.93 for "tf32").
Each variant is checked against the Triton kernel on the same inputs (RMS-relative difference), then timed
(median of triton.testing.do_bench) on real chunk-start states and state gradients from the shipped forward
and state pass. Also runs on the CPU under TRITON_INTERPRET=1 (small shapes, `--check-only`).

    python bench/wkv7_grads.py --shapes 8-4096-32,16-512-12 --variants shipped,gluon,gluon-qbf16x3,ks32,ks32-r168
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from wkv7 import make_inputs  # noqa: E402

from kernels.wkv7 import chunk as ours  # noqa: E402
from kernels.wkv7 import triton_kernels as K  # noqa: E402
from kernels.wkv7.triton_kernels import _dot, _inv_unit_lower  # noqa: E402


@triton.jit
def _decayed(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, pk, mk):
    """One key block of a chunk: cumulative log decays and the decayed vectors, all [C, BK]."""
    ww = tl.load(w_ptr + pk, mask=mk, other=0.).to(tl.float32)
    rr = tl.load(r_ptr + pk, mask=mk, other=0.).to(tl.float32)
    kk = tl.load(k_ptr + pk, mask=mk, other=0.).to(tl.float32)
    aa = tl.load(a_ptr + pk, mask=mk, other=0.).to(tl.float32)
    bb = tl.load(b_ptr + pk, mask=mk, other=0.).to(tl.float32)
    g = tl.cumsum(ww, axis=0)
    gx = g - ww
    gC = tl.sum(ww, axis=0)
    e_neg = tl.exp(-g)
    e_end = tl.exp(gC[None, :] - g)
    return g, gx, gC, aa * tl.exp(gx), rr * tl.exp(g), bb * e_neg, kk * e_neg, bb * e_end, kk * e_end, e_neg, e_end


@triton.jit
def grads_ks_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, st_ptr, dst_ptr, dy_ptr,
                    dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr,
                    T, NC, H, N: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, LOG2C: tl.constexpr,
                    PREC: tl.constexpr):
    """grid (NC, B*H), the same outputs as chunk_bwd_grads_kernel, in two passes over key blocks [.., BK]."""
    n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    offs_t = tl.arange(0, C)
    offs_v = tl.arange(0, N)
    offs_kb = tl.arange(0, BK)
    tri_s = offs_t[:, None] > offs_t[None, :]
    tri_i = offs_t[:, None] >= offs_t[None, :]
    t = n * C + offs_t
    mk = (t < T)[:, None]
    base = ((i_b * T + t) * H + i_h) * N
    pv = base[:, None] + offs_v[None, :]
    s_base = (i_bh * NC + n) * N * N
    dY = tl.load(dy_ptr + pv, mask=mk, other=0.).to(tl.float32)        # [C, V]
    vv = tl.load(v_ptr + pv, mask=mk, other=0.).to(tl.float32)         # [C, V]
    L_ab = tl.zeros([C, C], tl.float32)
    L_ak = tl.zeros([C, C], tl.float32)
    M_rb = tl.zeros([C, C], tl.float32)
    M_rk = tl.zeros([C, C], tl.float32)
    Za = tl.zeros([C, N], tl.float32)                                  # a_d S^T
    dUb = tl.zeros([C, N], tl.float32)                                 # b_e dS^T
    dV = tl.zeros([C, N], tl.float32)
    for kb in range(N // BK):
        offs_k = kb * BK + offs_kb
        pk = base[:, None] + offs_k[None, :]
        p_s = s_base + offs_v[:, None] * N + offs_k[None, :]            # [V, BK]
        S = tl.load(st_ptr + p_s)
        dS = tl.load(dst_ptr + p_s)
        g, gx, gC, a_d, r_d, b_u, k_u, b_e, k_e, e_neg, e_end = _decayed(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, pk, mk)
        L_ab += _dot(a_d, tl.trans(b_u), PREC)
        L_ak += _dot(a_d, tl.trans(k_u), PREC)
        M_rb += _dot(r_d, tl.trans(b_u), PREC)
        M_rk += _dot(r_d, tl.trans(k_u), PREC)
        Za += _dot(a_d, tl.trans(S), PREC)
        dUb += _dot(b_e, tl.trans(dS), PREC)
        dV += _dot(k_e, tl.trans(dS), PREC)
    L_ab = tl.where(tri_s, L_ab, 0.)
    L_ak = tl.where(tri_s, L_ak, 0.)
    M_rb = tl.where(tri_i, M_rb, 0.)
    M_rk = tl.where(tri_i, M_rk, 0.)
    Q = _inv_unit_lower(L_ab, LOG2C, PREC, 0.)                          # (I - L_ab)^{-1} - I
    Z = Za + _dot(L_ak, vv, PREC)
    U = _dot(Q, Z, PREC) + Z                                              # [C, V]
    dU = _dot(tl.trans(M_rb), dY, PREC) + dUb
    dZ = _dot(tl.trans(Q), dU, PREC) + dU
    dL_ab = tl.where(tri_s, _dot(dZ, tl.trans(U), PREC), 0.)
    dL_ak = tl.where(tri_s, _dot(dZ, tl.trans(vv), PREC), 0.)
    dM_rb = tl.where(tri_i, _dot(dY, tl.trans(U), PREC), 0.)
    dM_rk = tl.where(tri_i, _dot(dY, tl.trans(vv), PREC), 0.)
    dV += _dot(tl.trans(M_rk), dY, PREC) + _dot(tl.trans(L_ak), dZ, PREC)
    tl.store(dv_ptr + pv, dV.to(dv_ptr.dtype.element_ty), mask=mk)
    for kb in range(N // BK):
        offs_k = kb * BK + offs_kb
        pk = base[:, None] + offs_k[None, :]
        p_s = s_base + offs_v[:, None] * N + offs_k[None, :]
        S = tl.load(st_ptr + p_s)
        dS = tl.load(dst_ptr + p_s)
        g, gx, gC, a_d, r_d, b_u, k_u, b_e, k_e, e_neg, e_end = _decayed(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, pk, mk)
        dR_d = _dot(dY, S, PREC) + _dot(dM_rb, b_u, PREC) + _dot(dM_rk, k_u, PREC)     # [C, BK]
        dA_d = _dot(dZ, S, PREC) + _dot(dL_ab, b_u, PREC) + _dot(dL_ak, k_u, PREC)
        dB_u = _dot(tl.trans(dM_rb), r_d, PREC) + _dot(tl.trans(dL_ab), a_d, PREC)
        dK_u = _dot(tl.trans(dM_rk), r_d, PREC) + _dot(tl.trans(dL_ak), a_d, PREC)
        dB_e = _dot(U, dS, PREC)
        dK_e = _dot(vv, dS, PREC)
        dgC = tl.sum(dS * S, axis=0) * tl.exp(gC) + tl.sum(dB_e * b_e + dK_e * k_e, axis=0)
        dg = dR_d * r_d - dB_u * b_u - dB_e * b_e - dK_u * k_u - dK_e * k_e
        dgx = dA_d * a_d
        dw = tl.cumsum(dg, axis=0, reverse=True) + tl.cumsum(dgx, axis=0, reverse=True) - dgx + dgC[None, :]
        tl.store(dr_ptr + pk, (dR_d * tl.exp(g)).to(dr_ptr.dtype.element_ty), mask=mk)
        tl.store(dw_ptr + pk, dw.to(dw_ptr.dtype.element_ty), mask=mk)
        tl.store(dk_ptr + pk, (dK_u * e_neg + dK_e * e_end).to(dk_ptr.dtype.element_ty), mask=mk)
        tl.store(da_ptr + pk, (dA_d * tl.exp(gx)).to(da_ptr.dtype.element_ty), mask=mk)
        tl.store(db_ptr + pk, (dB_u * e_neg + dB_e * e_end).to(db_ptr.dtype.element_ty), mask=mk)


def parse_variant(v):
    """shipped | gluon | ksBK, then [-wW][-rR][-qPREC][-l1]: warps W (default 4), register cap R, dot precision PREC
    (default: the config's precision_bwd; the gluon kernel runs "bf16x3" for -qbf16x3 and "bf16x3k" for
    anything else); -l1: the gluon kernel computes the products' terms with the lo halves of dy and v even
    though these bf16 inputs have none (as before LO_DY / LO_V)."""
    f = v.split("-")
    kernel = "ks" if f[0].startswith("ks") else f[0]
    out = {"name": v, "kernel": kernel, "warps": 4, "maxnreg": None, "prec": None, "lo": 0}
    if kernel == "ks":
        out["BK"] = int(f[0][2:])
    for x in f[1:]:
        key = {"w": "warps", "r": "maxnreg", "q": "prec", "l": "lo"}[x[0]]
        out[key] = x[1:] if key == "prec" else int(x[1:])
    return out


def launch(var, x, st, dst, dy, grads, T, NC, H, C, prec):
    kw = {"num_warps": var["warps"], **({"maxnreg": var["maxnreg"]} if var["maxnreg"] else {})}
    prec = var["prec"] or prec
    if var["kernel"] != "shipped" and prec in ("tf32c", "bf16x3k"):
        prec = "tf32"   # the variants take plain tl.dot precisions (they were timed with "tf32")
    B = x["r"].shape[0]
    args = (x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], st, dst, dy, *grads, T, NC, H)
    if var["kernel"] == "gluon":
        from kernels.wkv7.gluon_kernels import chunk_bwd_grads_gluon
        return chunk_bwd_grads_gluon[(NC * B * H,)](*args, N=64, C=C, LOG2C=int(math.log2(C)), IO_DY=0, IO_V=0,
                                                    BIAS=ours._bias(x["r"]), BIG_X3=prec == "bf16x3",
                                                    LO_DY=bool(var["lo"]), LO_V=bool(var["lo"]), **kw)
    if var["kernel"] == "shipped":
        return K.chunk_bwd_grads_kernel[(NC * B * H,)](*args, N=64, C=C, LOG2C=int(math.log2(C)), PREC=prec,
                                                     IO_DY=0, IO_V=0, BIAS=ours._bias(x["r"]), **kw)
    return grads_ks_kernel[(NC, B * H)](*args, N=64, C=C, BK=var["BK"], LOG2C=int(math.log2(C)), PREC=prec, **kw)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def setup(B, T, H, device):
    """Real chunk-start states and state gradients from the shipped forward and state pass."""
    x = make_inputs(B, T, H, device)
    dy = torch.randn_like(x["v"])
    _, _, st, cc = ours._fwd(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], None, False, True, ours.CONFIG)
    C, NC = ours.CONFIG.chunk_size, st.shape[2]
    BV = ours._block_v(B, H, 64, ours.CONFIG)
    dst = torch.empty_like(st)
    ds0 = torch.empty((B, H, 64, 64), dtype=torch.float32, device=device)
    K.chunk_bwd_dstate_kernel[(B * H, 64 // BV)](
        x["r"], x["w"], x["a"], x["b"], cc, dy, None, dst, ds0, T, NC, H, N=64, C=C, BV=BV, HAS_DST=False,
        PREFETCH=ours.CONFIG.prefetch, IO_DY=0, BIAS=ours._bias(dy),
        PREC=ours._sequential_precision(ours.CONFIG.precision_state_bwd, "tf32c", dy, B * H * (64 // BV)),
        num_warps=ours.CONFIG.num_warps)
    return x, dy, st, dst, C, NC


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8-4096-32,16-512-12")
    ap.add_argument("--variants", default="shipped,ks32")
    ap.add_argument("--check-only", action="store_true", help="compare outputs only (CPU interpreter)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args()
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    variants = [parse_variant(v) for v in args.variants.split(",")]
    prec = ours.CONFIG.precision_bwd
    res = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
           "torch": torch.__version__, "triton": triton.__version__, "rows": []}
    for shape in args.shapes.split(","):
        B, T, H = (int(s) for s in shape.split("-"))
        x, dy, st, dst, C, NC = setup(B, T, H, device)
        refs = {}
        row = {"shape": shape}
        for var in variants:
            p = var["prec"] or prec
            if p not in refs:   # the shipped kernel at the same dot precision
                refs[p] = [torch.empty_like(x[n]) for n in "rwkvab"]
                launch(parse_variant(f"shipped-q{p}"), x, st, dst, dy, refs[p], T, NC, H, C, prec)
            grads = [torch.full_like(x[n], float("nan")) for n in "rwkvab"]
            kern = launch(var, x, st, dst, dy, grads, T, NC, H, C, prec)
            diff = max(rel(g, r) for g, r in zip(grads, refs[p]))
            row[var["name"]] = {"max_rel_diff_vs_shipped": diff,
                                **{a: getattr(kern, a, None) for a in ("n_regs", "n_spills")}}
            if not args.check_only:
                from triton.testing import do_bench
                call = functools.partial(launch, var, x, st, dst, dy, grads, T, NC, H, C, prec)
                row[var["name"]]["ms"] = do_bench(call, warmup=25, rep=200, return_mode="median")
            print(shape, var["name"], row[var["name"]], flush=True)
        res["rows"].append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "wkv7_grads.json.tmp"), "w") as f:
        json.dump(res, f, indent=1)
    os.replace(os.path.join(args.out, "wkv7_grads.json.tmp"), os.path.join(args.out, "wkv7_grads.json"))
    if not args.check_only:
        print(f"\n{'shape':12s}" + "".join(f"{v['name']:>14s}" for v in variants))
        for row in res["rows"]:
            print(f"{row['shape']:12s}" + "".join(f"{row[v['name']]['ms']:14.3f}" for v in variants))


if __name__ == "__main__":
    main()
