"""Argument checks shared by every WKV7 path (no triton import, so the CPU path can use them)."""
from __future__ import annotations


def check_inputs(r, w, k, v, a, b, initial_state) -> tuple[int, int, int, int]:
    """Raises ValueError naming the argument when shapes, dtypes (floating point) or devices disagree, or
    T < 1; returns (B, T, H, N)."""
    if r.dim() != 4:
        raise ValueError(f"wkv7: r has shape {tuple(r.shape)}, expected [B, T, H, N]")
    B, T, H, N = r.shape
    for name, x in zip("rwkvab", (r, w, k, v, a, b)):
        if tuple(x.shape) != (B, T, H, N):
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, expected {(B, T, H, N)} like r")
        if not x.dtype.is_floating_point:
            raise ValueError(f"wkv7: {name} has dtype {x.dtype}, expected a floating-point dtype")
        if x.device != r.device:
            raise ValueError(f"wkv7: {name} is on {x.device}, r on {r.device}")
    if T < 1:
        raise ValueError("wkv7: T must be >= 1")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, N, N):
        raise ValueError(f"wkv7: initial_state has shape {tuple(initial_state.shape)}, expected {(B, H, N, N)}")
    if initial_state is not None and initial_state.device != r.device:
        raise ValueError(f"wkv7: initial_state is on {initial_state.device}, r on {r.device}")
    return B, T, H, N
