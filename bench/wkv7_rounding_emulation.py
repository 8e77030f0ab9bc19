"""Which products of the Triton forward set y's error? An emulation on the CPU (no GPU needed).

Replays chunk_cc_kernel + chunk_fwd_kernel's arithmetic in float64 with each product's operands rounded to
tf32 ("tf32r"), and float32 between products, on the benchmark's accuracy check (B2-T256-H4, bf16 inputs, w
in float32 from w_raw as the model passes it), then makes chosen products exact and prints y's error
(bf16 output) against the float64 reference. It reproduces the GPU's 1.697e-3 with every product rounded,
and found M_rk = lower(r_d k_u^T) and M_rk V (the current step's (r.k) v on their diagonal) to be the
products that lift y above bf16's own rounding (1.656e-3); the kernels now carry them as hi + lo tf32 terms
(triton_kernels._dot_split).

`--backward` does the same for the gradients with the backward's "tf32c" products (operands truncated, product
scaled by 1 + n x 3.52e-4): with the kernels before their operand-count fix it reproduced the GPU's errors
(da 1.80e-3, db 1.78e-3), with the fix it gives 1.75e-3 / 1.72e-3; and it names the products that set them: the [C, C]-sized ones of the (r.k) diagonal (M_rk, dM_rk) and
of the U / dZ chain. Carried as hi + lo terms they are the gradient kernel's "tf32cs" precision.

    python bench/wkv7_rounding_emulation.py [--backward]
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from wkv7 import W_SCALE, make_inputs  # noqa: E402

from kernels.wkv7 import chunk_wkv7_torch  # noqa: E402

BIAS = 3.52e-4      # triton_kernels.TF32_TRUNCATION_BIAS
PRODUCTS = ("cc", "M_rk", "a_d S", "L_ak V", "Q Z", "r_d S", "M_rb U", "M_rk V", "U b_e", "V k_e")


def tf32(x):
    """float32 -> tf32, round to nearest (the kernels' _round_tf32), as float64."""
    i = x.float().view(torch.int32)
    return ((i + 0x1000) & -8192).view(torch.float32).double()


def tf32_truncated(x):
    """float32 -> tf32 as the tensor cores read it (mantissa truncated), as float64."""
    return (x.float().view(torch.int32) & -8192).view(torch.float32).double()


def fwd(x, w, exact, C=16):
    """y [B, T, H, N] float64 (values float32) of the chunked forward; products named in `exact` in float64."""
    B, T, H, N = x["r"].shape
    f32 = lambda t: t.float().double()  # noqa: E731

    def mm(a, b, name):
        return f32(a.double() @ b.double()) if name in exact else f32(tf32(a) @ tf32(b))
    y = torch.zeros(B, T, H, N, dtype=torch.float64)
    strict = torch.ones(C, C).tril(-1).double()
    incl = torch.ones(C, C).tril().double()
    for bi in range(B):
        for h in range(H):
            S = torch.zeros(N, N, dtype=torch.float64)                        # [V, K]
            for n in range(T // C):
                sl = slice(n * C, (n + 1) * C)
                r, k, v, a, b = (x[c][bi, sl, h].double() for c in "rkvab")   # [C, N]
                ww = w[bi, sl, h].double()
                g = f32(torch.cumsum(ww, 0))
                gx, gC = f32(g - ww), g[-1]
                a_d, r_d = f32(a * torch.exp(gx)), f32(r * torch.exp(g))
                b_u, k_u = f32(b * torch.exp(-g)), f32(k * torch.exp(-g))
                b_e, k_e = f32(b * torch.exp(gC - g)), f32(k * torch.exp(gC - g))
                cc = "cc" if "cc" in exact else ""
                L_ab = mm(a_d, b_u.T, cc) * strict
                L_ak = mm(a_d, k_u.T, cc) * strict
                M_rb = mm(r_d, b_u.T, cc) * incl
                M_rk = mm(r_d, k_u.T, cc or "M_rk") * incl
                Q, Lp = L_ab, L_ab                                            # (I - L_ab)^{-1} - I by doubling
                for _ in range(3):
                    Lp = mm(Lp, Lp, cc)
                    Q = f32(Q + Lp + mm(Q, Lp, cc))
                Z = f32(mm(a_d, S.T, "a_d S") + mm(L_ak, v, "L_ak V"))
                U = f32(mm(Q, Z, "Q Z") + Z)
                y[bi, sl, h] = f32(mm(r_d, S.T, "r_d S") + mm(M_rb, U, "M_rb U") + mm(M_rk, v, "M_rk V"))
                S = f32(S * torch.exp(gC) + mm(U.T, b_e, "U b_e") + mm(v.T, k_e, "V k_e"))
    return y


BWD_PRODUCTS = ("Z1", "Z2", "U", "dU1", "dU2", "dZ", "dLab", "dLak", "dMrb", "dMrk", "dV1", "dV2", "dV3", "dR1", "dR2",
                "dR3", "dA1", "dA2", "dA3", "dBu1", "dBu2", "dKu1", "dKu2", "dBe", "dKe", "cc", "M_rk", "inv")
"""The gradient kernel's products, named as in chunk_bwd_grads_kernel's formulas (dR3 = dM_rk k_u, ...)."""


def bwd(x, w, dy, exact, C=16):
    """Gradients of r, k, v, a, b (float64, values float32) from the state pass and gradient kernel with
    "tf32c" products; chunk-start states and the state pass's dL/dS exact (they hardly matter: measured)."""
    B, T, H, N = x["r"].shape
    f32 = lambda t: t.float().double()  # noqa: E731

    def mm(a, b, name, nt=2):
        if name in exact:
            return f32(a.double() @ b.double())
        return f32((tf32_truncated(a) @ tf32_truncated(b)) * (1 + nt * BIAS))
    strict = torch.ones(C, C).tril(-1).double()
    incl = torch.ones(C, C).tril().double()

    def terms(r, ww, k, a, b, mm):
        g = f32(torch.cumsum(ww, 0))
        t = dict(g=g, gx=f32(g - ww), gC=g[-1], a_d=f32(a * torch.exp(g - ww)), r_d=f32(r * torch.exp(g)),
                 b_u=f32(b * torch.exp(-g)), k_u=f32(k * torch.exp(-g)), b_e=f32(b * torch.exp(g[-1] - g)),
                 k_e=f32(k * torch.exp(g[-1] - g)))
        t["L_ab"] = mm(t["a_d"], t["b_u"].T, "cc") * strict
        t["L_ak"] = mm(t["a_d"], t["k_u"].T, "cc") * strict
        t["M_rb"] = mm(t["r_d"], t["b_u"].T, "cc") * incl
        t["M_rk"] = mm(t["r_d"], t["k_u"].T, "M_rk") * incl
        Q, Lp = t["L_ab"], t["L_ab"]
        for _ in range(3):
            Lp = mm(Lp, Lp, "inv")
            Q = f32(Q + Lp + mm(Q, Lp, "inv"))
        t["Q"] = Q                                                 # (I - L_ab)^{-1} - I
        return t
    exact_mm = lambda a, b, name, nt=2: a.double() @ b.double()  # noqa: E731
    out = {c: torch.zeros(B, T, H, N, dtype=torch.float64) for c in "rkvab"}
    for bi in range(B):
        for h in range(H):
            chunks = [tuple(x[c][bi, n * C:(n + 1) * C, h].double() for c in "rkvab")
                      + (w[bi, n * C:(n + 1) * C, h].double(), dy[bi, n * C:(n + 1) * C, h].double())
                      for n in range(T // C)]
            S, starts = torch.zeros(N, N, dtype=torch.float64), []
            for r, k, v, a, b, ww, _ in chunks:
                starts.append(f32(S))
                t = terms(r, ww, k, a, b, exact_mm)
                Z = t["a_d"] @ S.T + t["L_ak"] @ v
                U = t["Q"] @ Z + Z
                S = S * torch.exp(t["gC"]) + U.T @ t["b_e"] + v.T @ t["k_e"]
            dS, ends = torch.zeros(N, N, dtype=torch.float64), [None] * len(chunks)
            for n in reversed(range(len(chunks))):
                r, k, v, a, b, ww, dY = chunks[n]
                ends[n] = f32(dS)
                t = terms(r, ww, k, a, b, exact_mm)
                dU = t["M_rb"].T @ dY + t["b_e"] @ dS.T
                dZ = t["Q"].T @ dU + dU
                dS = dY.T @ t["r_d"] + dZ.T @ t["a_d"] + dS * torch.exp(t["gC"])
            for n, (r, k, v, a, b, ww, dY) in enumerate(chunks):
                S, dS, sl = starts[n], ends[n], slice(n * C, (n + 1) * C)
                t = terms(r, ww, k, a, b, mm)
                Z = f32(mm(t["a_d"], S.T, "Z1") + mm(t["L_ak"], v, "Z2", 1))
                U = f32(mm(t["Q"], Z, "U") + Z)
                dU = f32(mm(t["M_rb"].T, dY, "dU1", 1) + mm(t["b_e"], dS.T, "dU2"))
                dZ = f32(mm(t["Q"].T, dU, "dZ") + dU)
                dL_ab, dL_ak = mm(dZ, U.T, "dLab") * strict, mm(dZ, v.T, "dLak", 1) * strict
                dM_rb, dM_rk = mm(dY, U.T, "dMrb", 1) * incl, mm(dY, v.T, "dMrk", 0) * incl
                dV = mm(t["M_rk"].T, dY, "dV1", 1) + mm(t["L_ak"].T, dZ, "dV2") + mm(t["k_e"], dS.T, "dV3")
                dR_d = mm(dY, S, "dR1", 1) + mm(dM_rb, t["b_u"], "dR2") + mm(dM_rk, t["k_u"], "dR3")
                dA_d = mm(dZ, S, "dA1") + mm(dL_ab, t["b_u"], "dA2") + mm(dL_ak, t["k_u"], "dA3")
                dB_u = mm(dM_rb.T, t["r_d"], "dBu1") + mm(dL_ab.T, t["a_d"], "dBu2")
                dK_u = mm(dM_rk.T, t["r_d"], "dKu1") + mm(dL_ak.T, t["a_d"], "dKu2")
                dB_e, dK_e = mm(U, dS, "dBe"), mm(v, dS, "dKe", 1)
                e_neg, e_end = torch.exp(-t["g"]), torch.exp(t["gC"] - t["g"])
                out["r"][bi, sl, h] = dR_d * torch.exp(t["g"])
                out["k"][bi, sl, h] = dK_u * e_neg + dK_e * e_end
                out["v"][bi, sl, h] = dV
                out["a"][bi, sl, h] = dA_d * torch.exp(t["gx"])
                out["b"][bi, sl, h] = dB_u * e_neg + dB_e * e_end
    return out


def main_backward():
    x = make_inputs(1, 128, 2, "cpu", seed=1)
    w = W_SCALE * torch.sigmoid(x["w_raw"].double())
    leaves = {c: (w if c == "w" else x[c].double()).clone().requires_grad_() for c in "rwkvab"}
    dy = torch.randn(x["v"].shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    y, _ = chunk_wkv7_torch(*(leaves[c] for c in "rwkvab"), chunk_size=16)
    y.backward(dy.double())
    ref = {c: leaves[c].grad for c in "rkvab"}

    def show(name, out):
        errs = " ".join(f"d{c} {((out[c].bfloat16().double() - ref[c]).norm() / ref[c].norm()).item():.3e}"
                        for c in "rkvab")
        print(f"{name:34s} {errs}", flush=True)
    show("(none: bf16 rounding of exact grads)", ref)
    small = {"U", "dZ", "dU1", "dLak", "dA3", "dBu1", "dR3", "dKu1", "dV1", "M_rk"}
    for exact in [set(), small, small | {"Z1", "cc"}, set(BWD_PRODUCTS)] + [{p} for p in BWD_PRODUCTS]:
        label = ("tf32cs's products" if exact == small else ", ".join(sorted(exact))[:34]) or "none: all tf32c"
        show(label, bwd(x, w.float(), dy.double(), exact))


def main():
    if "--backward" in sys.argv:
        return main_backward()
    x = make_inputs(2, 256, 4, "cpu", seed=1)
    w = W_SCALE * torch.sigmoid(x["w_raw"].double())
    ref, _ = chunk_wkv7_torch(*((w if c == "w" else x[c].double()) for c in "rwkvab"), chunk_size=16)
    rel = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    print(f"{'products in float64':34s} y error (bf16 y)")
    print(f"{'(none: bf16 rounding of exact y)':34s} {rel(ref.bfloat16()):.4e}")
    cases = [("M_rk",), ("M_rk", "M_rk V"), ("cc",), ("cc", "M_rk V", "r_d S"), PRODUCTS[2:] + ("cc",)]
    for p in PRODUCTS[2:]:
        cases.append((p,))
    for exact in [()] + cases:
        y = fwd(x, w.float(), set(exact))
        print(f"{', '.join(exact) or 'none: all tf32r':34s} {rel(y.bfloat16()):.4e}", flush=True)


if __name__ == "__main__":
    main()
