"""WKV7: the RWKV-7 recurrence, per batch and head, with state S [N, N] (S[i, j]: value i, key j):
    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,    y_t = S_t r_t

Implementations (all: r, w, k, v, a, b [B, T, H, N]; state [B, H, N, N] fp32; -> (y, final_state)):
- `naive_wkv7` (naive.py): the plain loop, the reference.
- `chunk_wkv7_torch` (chunk_torch.py): chunked, vectorised PyTorch; any dtype incl. float64; CPU path.
- `chunk_wkv7` (chunk.py + triton_kernels.py): chunked Triton forward and backward, the training path.
- `recurrent_wkv7` (chunk.py): step-by-step Triton forward, for decoding (backward: the chunked one).
- `wkv7`: picks one by device, dtype and length.
The Triton modules are imported on first use, so importing this package does not import triton.
Tuning: `kernels.wkv7.chunk.CONFIG`, an immutable `WKV7KernelConfig` (chunk size, dot precisions, gradient
kernel): set `chunk.CONFIG = dataclasses.replace(chunk.CONFIG, ...)`; its defaults are the fastest measured
whose errors equal the official CUDA kernel's.
"""
from __future__ import annotations

import torch

from .chunk_torch import chunk_wkv7_torch
from .naive import naive_wkv7


def chunk_wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False):
    """Chunked Triton WKV7, forward and backward; see chunk.py."""
    from .chunk import chunk_wkv7 as impl
    return impl(r, w, k, v, a, b, initial_state, output_final_state)


def recurrent_wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False):
    """Step-by-step Triton WKV7 forward (backward through the chunked kernel); see chunk.py."""
    from .chunk import recurrent_wkv7 as impl
    return impl(r, w, k, v, a, b, initial_state, output_final_state)


def wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False):
    """r, w, k, v, a, b: [B, T, H, N]; initial/final state [B, H, N, N] fp32 ([value][key] layout).

    CUDA and not float64: the chunked Triton kernels (measured on the H200; any T, T = 1 included).
    Otherwise (CPU, float64): the chunked PyTorch implementation, differentiable by autograd.
    (`recurrent_wkv7` is not picked: it has been checked in the Triton interpreter only, not on a GPU.)
    """
    if r.is_cuda and r.dtype != torch.float64:
        return chunk_wkv7(r, w, k, v, a, b, initial_state, output_final_state)
    return chunk_wkv7_torch(r, w, k, v, a, b, initial_state, output_final_state, chunk_size=32)


__all__ = ["wkv7", "chunk_wkv7", "recurrent_wkv7", "chunk_wkv7_torch", "naive_wkv7"]
