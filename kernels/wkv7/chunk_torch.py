"""WKV7 in chunked form, in plain PyTorch: the CPU path (any dtype, float64 included; autograd does
the backward, initial-state gradient included).

Math (the same chunked form the Triton kernels use, see chunk.py). Within a chunk of C steps starting
from state S0 [V, K], with g_t = sum_{s<=t} w_s (inclusive, per key) and gx_t = g_t - w_t:
    u_t = S_{t-1} a_t                                                       (value vector)
    S_t = S0 diag(e^{g_t}) + sum_{s<=t} (u_s b_s^T + v_s k_s^T) diag(e^{g_t - g_s})
so, with L_xy[t, s] = sum_j x_tj y_sj e^{gx_tj - g_sj} (s < t) and M_xy[t, s] the same with e^{g_tj - g_sj}
(s <= t), the C vectors u solve the unit-lower-triangular system
    (I - L_ab) U = (a * e^{gx}) S0^T + L_ak V
and
    Y   = (r * e^{g}) S0^T + M_rb U + M_rk V
    S_C = S0 diag(e^{g_C}) + U^T (b * e^{g_C - g}) + V^T (k * e^{g_C - g}).
Each exponent is <= 0; it is evaluated either as one exp of the difference or, when the chunk decay
allows (see _FACTOR_SAFE), as the product e^{x} e^{-y} via matmuls. The intra-chunk parts are computed for
all chunks at once; only S0 -> S_C is a loop over chunks.
"""
from __future__ import annotations

import torch

from .checks import check_inputs

# Largest chunk decay magnitude (-sum of w over a chunk) for which the factorised form e^{x - y} = e^x e^{-y}
# is used: e^{40} is far from float32 overflow and leaves ample range. Beyond it, the exact [C, C, K] form.
_FACTOR_SAFE = 40.0


def chunk_wkv7_torch(r, w, k, v, a, b, initial_state=None, output_final_state=False, chunk_size: int = 16):
    """r, w, k, v, a, b: [B, T, H, N]; initial_state [B, H, N, N] ([value][key]) or None.

    Returns (y [B, T, H, N] in the input dtype, final_state [B, H, N, N] or None). Computes in float64 for
    float64 inputs, else float32, also under torch.autocast (which would otherwise run the products in
    bf16); the final state is float32 (float64 for float64 inputs).
    """
    check_inputs(r, w, k, v, a, b, initial_state)
    with torch.autocast(r.device.type, enabled=False):
        return _chunk_wkv7_torch(r, w, k, v, a, b, initial_state, output_final_state, chunk_size)


W_FLOOR = 60.0
"""w below -W_FLOOR is taken as -W_FLOOR: a decay of e^-60 (1e-26) instead of 0 or less, the same to float64."""


def _chunk_wkv7_torch(r, w, k, v, a, b, initial_state, output_final_state, chunk_size):
    B, T, H, N = r.shape
    in_dtype = r.dtype
    dt = torch.float64 if in_dtype == torch.float64 else torch.float32
    C = chunk_size
    NC = (T + C - 1) // C
    pad = NC * C - T

    def prep(x):  # [B, T, H, N] -> [B, H, NC, C, N], zero-padded (w = 0, k = v = 0: identity steps)
        x = x.to(dt)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, NC, C, H, N).permute(0, 3, 1, 2, 4)

    r, w, k, v, a, b = (prep(x) for x in (r, w, k, v, a, b))
    w = w.clamp_min(-W_FLOOR)                       # a decay of exactly 0 (w = -inf) would give inf - inf
    g = torch.cumsum(w, dim=3)                      # [B, H, NC, C, K] inclusive
    gx = g - w                                      # exclusive
    gC = g[:, :, :, -1:, :]                         # [B, H, NC, 1, K]
    strict = torch.ones(C, C, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(C, C, dtype=torch.bool, device=r.device).tril()
    if bool((gC < -_FACTOR_SAFE).any()):
        # decay factors e^{gx_t - g_s} (s < t) and e^{g_t - g_s} (s <= t): [B, H, NC, C, C, K]
        neg_inf = torch.tensor(float("-inf"), dtype=dt, device=r.device)
        dx = torch.exp(torch.where(strict[:, :, None], gx[..., :, None, :] - g[..., None, :, :], neg_inf))
        di = torch.exp(torch.where(incl[:, :, None], g[..., :, None, :] - g[..., None, :, :], neg_inf))
        L_ab = torch.einsum("...tj,...sj,...tsj->...ts", a, b, dx)   # [B, H, NC, C, C]
        L_ak = torch.einsum("...tj,...sj,...tsj->...ts", a, k, dx)
        M_rb = torch.einsum("...tj,...sj,...tsj->...ts", r, b, di)
        M_rk = torch.einsum("...tj,...sj,...tsj->...ts", r, k, di)
    else:
        # e^{gx_t - g_s} = e^{gx_t} e^{-g_s}: exact, and no overflow while -g_C <= _FACTOR_SAFE
        a_d, r_d = a * torch.exp(gx), r * torch.exp(g)
        b_u, k_u = (b * torch.exp(-g)).transpose(-1, -2), (k * torch.exp(-g)).transpose(-1, -2)
        L_ab = (a_d @ b_u).masked_fill(~strict, 0)
        L_ak = (a_d @ k_u).masked_fill(~strict, 0)
        M_rb = (r_d @ b_u).masked_fill(~incl, 0)
        M_rk = (r_d @ k_u).masked_fill(~incl, 0)
    eye = torch.eye(C, dtype=dt, device=r.device)
    P = eye - L_ab
    a_dec = a * torch.exp(gx)                       # [B, H, NC, C, K]
    # U = W S0^T + U0, with W = P^{-1} a_dec [C, K] and U0 = P^{-1} L_ak V [C, V]
    sol = torch.linalg.solve_triangular(P, torch.cat([a_dec, L_ak @ v], dim=-1), upper=False,
                                        unitriangular=True)
    W, U0 = sol[..., :N], sol[..., N:]
    b_end = b * torch.exp(gC - g)                   # [B, H, NC, C, K]
    k_end = k * torch.exp(gC - g)
    # S_C = S0 (diag(e^{g_C}) + W^T b_end) + (U0^T b_end + V^T k_end)
    Mt = torch.diag_embed(torch.exp(gC[..., 0, :])) + W.transpose(-1, -2) @ b_end   # [B, H, NC, K, K]
    E = U0.transpose(-1, -2) @ b_end + v.transpose(-1, -2) @ k_end                  # [B, H, NC, V, K]
    S = r.new_zeros(B, H, N, N) if initial_state is None else initial_state.to(dt)
    starts = []
    for n in range(NC):
        starts.append(S)
        S = S @ Mt[:, :, n] + E[:, :, n]
    S0 = torch.stack(starts, dim=2)                 # [B, H, NC, V, K]
    S0t = S0.transpose(-1, -2)
    U = W @ S0t + U0                                # [B, H, NC, C, V]
    Y = (r * torch.exp(g)) @ S0t + M_rb @ U + M_rk @ v
    y = Y.permute(0, 2, 3, 1, 4).reshape(B, NC * C, H, N)[:, :T].to(in_dtype)
    final = S if dt == torch.float64 else S.float()
    return y, (final if output_final_state else None)
