"""Which products of the Triton forward set y's error? An emulation on the CPU (no GPU needed).

Replays chunk_cc_kernel + chunk_fwd_kernel's arithmetic in float64 with each product's operands rounded to
tf32 ("tf32r"), and float32 between products, on the benchmark's accuracy check (B2-T256-H4, bf16 inputs, w
in float32 from w_raw as the model passes it), then makes chosen products exact and prints y's error
(bf16 output) against the float64 reference. It reproduces the GPU's 1.697e-3 with every product rounded,
and found M_rk = lower(r_d k_u^T) and M_rk V (the current step's (r.k) v on their diagonal) to be the
products that lift y above bf16's own rounding (1.656e-3); the kernels now carry them as hi + lo tf32 terms
(triton_kernels._dot_split).

    python bench/wkv7_rounding_emulation.py
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from wkv7 import W_SCALE, make_inputs  # noqa: E402

from kernels.wkv7 import chunk_wkv7_torch  # noqa: E402

PRODUCTS = ("cc", "M_rk", "a_d S", "L_ak V", "Pinv Z", "r_d S", "M_rb U", "M_rk V", "U b_e", "V k_e")


def tf32(x):
    """float32 -> tf32, round to nearest (the kernels' _round_tf32), as float64."""
    i = x.float().view(torch.int32)
    return ((i + 0x1000) & -8192).view(torch.float32).double()


def fwd(x, w, exact, C=16):
    """y [B, T, H, N] float64 (values float32) of the chunked forward; products named in `exact` in float64."""
    B, T, H, N = x["r"].shape
    f32 = lambda t: t.float().double()  # noqa: E731

    def mm(a, b, name):
        return f32(a.double() @ b.double()) if name in exact else f32(tf32(a) @ tf32(b))
    y = torch.zeros(B, T, H, N, dtype=torch.float64)
    strict = torch.ones(C, C).tril(-1).double()
    incl = torch.ones(C, C).tril().double()
    eye = torch.eye(C, dtype=torch.float64)
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
                X, Lp = eye + L_ab, L_ab                                      # (I - L_ab)^{-1} by doubling
                for _ in range(3):
                    Lp = mm(Lp, Lp, cc)
                    X = f32(X + mm(X, Lp, cc))
                U = mm(X, f32(mm(a_d, S.T, "a_d S") + mm(L_ak, v, "L_ak V")), "Pinv Z")
                y[bi, sl, h] = f32(mm(r_d, S.T, "r_d S") + mm(M_rb, U, "M_rb U") + mm(M_rk, v, "M_rk V"))
                S = f32(S * torch.exp(gC) + mm(U.T, b_e, "U b_e") + mm(v.T, k_e, "V k_e"))
    return y


def main():
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
