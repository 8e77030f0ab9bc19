"""The WKV7 recurrence as a plain PyTorch loop: the reference every fast path is tested against.

Per batch b and head h, with state S [N, N] (S[i, j]: i = value index, j = key index):
    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t
(RWKV-7 "Goose", generalized delta rule; the model passes a = -kk, b = kk * iclr.)
"""
from __future__ import annotations

import torch


def naive_wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False):
    """r, w, k, v, a, b: [B, T, H, N]; w is the log decay (w <= 0).

    initial_state: [B, H, N, N] fp32 or None (zeros). Returns (y [B, T, H, N] in the input dtype,
    final_state [B, H, N, N] fp32 or None). Computes in fp32, or fp64 when the inputs are fp64.
    """
    B, T, H, N = r.shape
    in_dtype = r.dtype
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    r, w, k, v, a, b = (x.to(dtype) for x in (r, w, k, v, a, b))
    S = r.new_zeros(B, H, N, N) if initial_state is None else initial_state.to(dtype)
    decay = torch.exp(w)
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])  # [B, H, N] (value index)
        S = (S * decay[:, t, :, None, :]
             + sa[..., :, None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    y = (torch.stack(ys, dim=1) if T else r.new_zeros(B, 0, H, N)).to(in_dtype)
    final = S.float() if dtype == torch.float32 else S
    return y, (final if output_final_state else None)
