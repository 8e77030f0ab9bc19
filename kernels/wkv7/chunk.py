"""WKV7 on the GPU: `chunk_wkv7` (training; chunked Triton forward and backward) and `recurrent_wkv7`
(step-by-step Triton forward for decoding and short T; its backward is the chunked one).

Kernels and their math: triton_kernels.py. This module imports triton, so import it lazily
(`kernels.wkv7` does) to let tests choose TRITON_INTERPRET before it is loaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import triton_kernels as K


@dataclass
class WKV7KernelConfig:
    """Tuning of the Triton path; the module-level CONFIG is used. Defaults: the best measured on an H200."""

    chunk_size: int = 16
    """Steps per chunk (power of two, 16..64): larger means fewer sequential steps but bigger [C, C] work."""
    block_v: int = 0
    """Rows of the state (value index) per program in the sequential kernels; N / block_v programs per
    head share its work. 0: 16 when there are few heads (B*H <= 48, e.g. one long sequence), else N."""
    precision: str = "tf32r"
    """Dot precision of the forward kernels: "tf32r" (operands rounded to tf32; y error 1.70e-3 on the
    benchmark check vs the official kernel's 1.77e-3), "tf32" (truncated by the tensor cores; 2.0e-3),
    "tf32x3" or "ieee" (float32; slower: 3.4x the forward time with ieee on the H200)."""
    precision_bwd: str = "tf32"
    """Dot precision of the backward kernels. "tf32" measured 2.8 ms of backward for B8-T4096-H12 on the
    H200, "tf32r" 4.0 ms; gradient errors were 1.8e-3..3.0e-3 and 1.7e-3..1.8e-3 respectively."""
    num_warps: int = 4
    """Warps per program for the sequential chunked kernels (forward, backward state pass)."""
    num_warps_bwd: int = 4
    """Warps per program for the parallel backward kernel (one program per chunk and head)."""
    split: str = "fused"
    """"fused": one sequential program per head (and value block) does all the chunk work; "split": chunk
    maps in parallel, then a light sequential scan; "auto": split when B*H <= 64. Split was measured only
    once, at C=32 on B8-T4096-H12, and was far slower there (22.9 ms forward vs 1.14 fused): keep fused."""
    scan_precision: str = "ieee"
    """tl.dot precision of the split-mode scan, which carries the state across many chunks."""
    prep: bool = True
    """Fused mode: compute each chunk's state-independent [C, C] matrices ((I - L_ab)^{-1}, L_ak, M_rb, M_rk)
    in a parallel kernel first (4 KiB per chunk and head, kept for the backward), so the sequential kernels
    load them instead of recomputing them in their serial steps (H200, 8-4096-32: forward 1.14 + 0.34 ms
    vs 1.66, backward state pass 1.00 vs 1.47; 1-32768-32: 4.67 + 0.34 vs 7.69 and 4.07 vs 7.24)."""
    prefetch: bool = True
    """With prep: the sequential kernels load the next chunk's inputs while computing the current one
    (H200, 1-32768-32: forward kernel 4.71 vs 5.83 ms, state pass 4.02 vs 4.93)."""
    grads_block_v: int = 0
    """Value rows per step of the backward's parallel gradient kernel, which then holds [block_v, N] slices of
    the state and its gradient instead of both whole [N, N]; 0: the kernel that holds them whole
    (chunk_bwd_grads_kernel). Blocked was slower on the H200 (8-4096-32: 4.52 ms with 32 rows, 5.69 with 16,
    vs 4.23 whole, each loading the [C, C] matrices)."""
    grads_use_cc: bool = False
    """With prep: the gradient kernel loads the forward's [C, C] matrices instead of recomputing them. Slower
    on the H200 (8-4096-32: 4.23 vs 3.95 ms; every shape 5-8% slower): the reload from memory costs more than
    the ~10 small products it replaces in a kernel that runs many programs at once."""
    num_warps_cc: int = 1
    """Warps per program for the parallel [C, C]-matrix kernel (prep). H200, 8-4096-32: 0.34 ms with 1 warp,
    0.42 with 2, 0.78 with 4."""
    maxnreg_bwd: int = 0
    """Register cap per thread for the backward's gradient kernel (0: none). Uncapped it takes 255 and
    spills a little (ptxas, sm_90), so at most two programs fit on a multiprocessor; a cap trades more
    spills for more programs in flight, and lost on the H200 (8-4096-32, whole kernel with the [C, C]
    matrices loaded: 4.23 ms uncapped, 5.07 at 168, 5.89 at 128)."""
    poison_outputs: bool = False
    """Fill outputs with NaN before the kernels run (tests: an unwritten element then fails)."""


CONFIG = WKV7KernelConfig()


def _alloc(shape, dtype, device):
    if CONFIG.poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check(r, w, k, v, a, b, initial_state):
    B, T, H, N = r.shape
    for name, x in zip("rwkvab", (r, w, k, v, a, b)):
        if x.shape != (B, T, H, N):
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, expected {(B, T, H, N)} like r")
    if T < 1:
        raise ValueError("wkv7: T must be >= 1")
    if N < 16 or N & (N - 1):
        raise ValueError(f"wkv7: head size N={N} must be a power of two >= 16")
    if initial_state is not None and initial_state.shape != (B, H, N, N):
        raise ValueError(f"wkv7: initial_state has shape {tuple(initial_state.shape)}, expected {(B, H, N, N)}")
    chunks = -(-T // CONFIG.chunk_size)  # saved chunk-start states, indexed with int32 offsets in the kernels
    if B * H * chunks * N * N >= 2**31:
        raise ValueError(f"wkv7: B*H*ceil(T/chunk)*N*N = {B * H * chunks * N * N:,} overflows the kernels' int32 "
                         f"offsets: split the batch or the sequence (infctx segments)")


def _block_v(B, H, N):
    if CONFIG.block_v:
        return min(CONFIG.block_v, N)
    return 16 if B * H <= 48 else N


def _split(B, H):
    return CONFIG.split == "split" or (CONFIG.split == "auto" and B * H <= 64)


def _fwd(r, w, k, v, a, b, s0, store_final, store_states):
    """Chunked forward. Returns y [B, T, H, N] (dtype of r), final [B, H, N, N] fp32 or None,
    chunk-start states [B, H, NC, N, N] fp32 or None, the chunks' [C, C] matrices [B*H, NC, 4, C, C] fp32
    (computed with CONFIG.precision; for the backward) or None."""
    B, T, H, N = r.shape
    C, BV = CONFIG.chunk_size, _block_v(B, H, N)
    NC = triton_cdiv(T, C)
    y = _alloc((B, T, H, N), r.dtype, r.device)
    sT = _alloc((B, H, N, N), torch.float32, r.device) if store_final else None
    if _split(B, H):
        st = _alloc((B, H, NC, N, N), torch.float32, r.device)
        m = torch.empty((B, H, NC, N, N), dtype=torch.float32, device=r.device)
        e = torch.empty_like(m)
        K.chunk_prep_kernel[(NC, B * H)](
            r, w, k, v, a, b, None, m, e, T, NC, H, N=N, C=C, LOG2C=int(math.log2(C)), BWD=False,
            PREC=CONFIG.precision, num_warps=CONFIG.num_warps_bwd)
        K.chunk_scan_kernel[(B * H, N // BV)](
            m, e, s0, st, sT, NC, N=N, BV=BV, HAS_S0=s0 is not None, STORE_FINAL=store_final, REVERSE=False,
            PREC=CONFIG.scan_precision, num_warps=CONFIG.num_warps)
        del m, e
        K.chunk_out_kernel[(NC, B * H)](
            r, w, k, v, a, b, st, y, T, NC, H, N=N, C=C, LOG2C=int(math.log2(C)), PREC=CONFIG.precision,
            num_warps=CONFIG.num_warps_bwd)
        return y, sT, (st if store_states else None), None
    st = _alloc((B, H, NC, N, N), torch.float32, r.device) if store_states else None
    if CONFIG.prep:
        cc = _alloc((B * H, NC, 4, C, C), torch.float32, r.device)
        K.chunk_cc_kernel[(NC, B * H)](
            r, w, k, a, b, cc, T, NC, H, N=N, C=C, LOG2C=int(math.log2(C)), PREC=CONFIG.precision,
            num_warps=CONFIG.num_warps_cc)
        K.chunk_fwd2_kernel[(B * H, N // BV)](
            r, w, k, v, a, b, cc, s0, y, sT, st, T, NC, H, N=N, C=C, BV=BV, HAS_S0=s0 is not None,
            STORE_FINAL=store_final, STORE_STATES=store_states, PREFETCH=CONFIG.prefetch, PREC=CONFIG.precision,
            num_warps=CONFIG.num_warps)
        return y, sT, st, (cc if store_states else None)
    K.chunk_fwd_kernel[(B * H, N // BV)](
        r, w, k, v, a, b, s0, y, sT, st, T, NC, H, N=N, C=C, LOG2C=int(math.log2(C)), BV=BV,
        HAS_S0=s0 is not None, STORE_FINAL=store_final, STORE_STATES=store_states,
        PREC=CONFIG.precision, num_warps=CONFIG.num_warps)
    return y, sT, st, None


def _grads_launch():
    """Launch options of the backward's gradient kernel: warps, and a register cap when configured."""
    opts = {"num_warps": CONFIG.num_warps_bwd}
    if CONFIG.maxnreg_bwd:
        opts["maxnreg"] = CONFIG.maxnreg_bwd
    return opts


def _bwd(r, w, k, v, a, b, st, cc, dy, dsT, need_ds0):
    """Chunked backward from the stored chunk-start states (and the forward's [C, C] matrices cc, or None).
    Returns (dr, dw, dk, dv, da, db, ds0)."""
    B, T, H, N = r.shape
    C, BV = CONFIG.chunk_size, _block_v(B, H, N)
    NC = st.shape[2]
    dy = dy.contiguous()
    dst = _alloc((B, H, NC, N, N), torch.float32, r.device)   # dL/dS at each chunk's end
    ds0 = _alloc((B, H, N, N), torch.float32, r.device)
    if _split(B, H):
        m = torch.empty((B, H, NC, N, N), dtype=torch.float32, device=r.device)
        e = torch.empty_like(m)
        K.chunk_prep_kernel[(NC, B * H)](
            r, w, k, v, a, b, dy, m, e, T, NC, H, N=N, C=C, LOG2C=int(math.log2(C)), BWD=True,
            PREC=CONFIG.precision_bwd, num_warps=CONFIG.num_warps_bwd)
        K.chunk_scan_kernel[(B * H, N // BV)](
            m, e, dsT, dst, ds0, NC, N=N, BV=BV, HAS_S0=dsT is not None, STORE_FINAL=True, REVERSE=True,
            PREC=CONFIG.scan_precision, num_warps=CONFIG.num_warps)
        del m, e
    elif cc is not None:
        K.chunk_bwd_dstate2_kernel[(B * H, N // BV)](
            r, w, a, b, cc, dy, dsT, dst, ds0, T, NC, H, N=N, C=C, BV=BV, HAS_DST=dsT is not None,
            PREFETCH=CONFIG.prefetch, PREC=CONFIG.precision_bwd, num_warps=CONFIG.num_warps)
    else:
        K.chunk_bwd_dstate_kernel[(B * H, N // BV)](
            r, w, k, a, b, dy, dsT, dst, ds0, T, NC, H, N=N, C=C, LOG2C=int(math.log2(C)), BV=BV,
            HAS_DST=dsT is not None, PREC=CONFIG.precision_bwd, num_warps=CONFIG.num_warps)
    grads = [_alloc(x.shape, x.dtype, x.device) for x in (r, w, k, v, a, b)]
    if CONFIG.grads_block_v:
        K.chunk_bwd_grads_vb_kernel[(NC, B * H)](
            r, w, k, v, a, b, cc, st, dst, dy, *grads, T, NC, H, N=N, C=C, LOG2C=int(math.log2(C)),
            BV=min(CONFIG.grads_block_v, N), HAS_CC=cc is not None and CONFIG.grads_use_cc, PREC=CONFIG.precision_bwd, **_grads_launch())
    else:
        K.chunk_bwd_grads_kernel[(NC, B * H)](
            r, w, k, v, a, b, cc, st, dst, dy, *grads, T, NC, H, N=N, C=C, LOG2C=int(math.log2(C)),
            HAS_CC=cc is not None and CONFIG.grads_use_cc, PREC=CONFIG.precision_bwd, **_grads_launch())
    return (*grads, ds0 if need_ds0 else None)


def triton_cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


class ChunkWKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, output_final_state):
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        s0 = None if s0 is None else s0.float().contiguous()
        need_grad = any(ctx.needs_input_grad[:7])
        y, sT, st, cc = _fwd(r, w, k, v, a, b, s0, output_final_state, need_grad)
        ctx.save_for_backward(r, w, k, v, a, b, st, cc)
        ctx.has_s0 = s0 is not None
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, st, cc = ctx.saved_tensors
        dsT = None if dsT is None else dsT.float().contiguous()
        if dy is None:
            dy = torch.zeros_like(r)
        grads = _bwd(r, w, k, v, a, b, st, cc, dy, dsT, ctx.has_s0)
        return (*grads, None)


class RecurrentWKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, output_final_state):
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        s0 = None if s0 is None else s0.float().contiguous()
        B, T, H, N = r.shape
        BV = min(16, N)
        y = _alloc((B, T, H, N), r.dtype, r.device)
        sT = _alloc((B, H, N, N), torch.float32, r.device) if output_final_state else None
        K.recurrent_fwd_kernel[(B * H, N // BV)](
            r, w, k, v, a, b, s0, y, sT, T, H, N=N, BV=BV, HAS_S0=s0 is not None,
            STORE_FINAL=output_final_state, num_warps=1)
        ctx.save_for_backward(r, w, k, v, a, b, s0)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, s0 = ctx.saved_tensors
        _, _, st, cc = _fwd(r, w, k, v, a, b, s0, False, True)
        dsT = None if dsT is None else dsT.float().contiguous()
        if dy is None:
            dy = torch.zeros_like(r)
        grads = _bwd(r, w, k, v, a, b, st, cc, dy, dsT, s0 is not None)
        return (*grads, None)


def chunk_wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False):
    """Chunked Triton WKV7 (training path), forward and backward.

    r, w, k, v, a, b: [B, T, H, N] bf16/fp16/fp32, any T >= 1; w is the log decay (w <= 0, and
    w >= -0.6065 as the model produces it). initial_state: [B, H, N, N] fp32 ([value][key]) or None.
    Returns (y [B, T, H, N] in r's dtype, final_state [B, H, N, N] fp32 or None). Gradients flow to all
    six inputs and initial_state, from y and from final_state.
    """
    _check(r, w, k, v, a, b, initial_state)
    return ChunkWKV7.apply(r, w, k, v, a, b, initial_state, output_final_state)


def recurrent_wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False):
    """Step-by-step Triton WKV7 (decoding, short T). Same arguments and results as `chunk_wkv7`;
    the backward recomputes chunk states and uses the chunked backward kernel."""
    _check(r, w, k, v, a, b, initial_state)
    return RecurrentWKV7.apply(r, w, k, v, a, b, initial_state, output_final_state)
