"""WKV7: the RWKV-7 recurrence. `wkv7` picks an implementation for the device and length.

Temporary dispatch to the naive reference until the chunked Triton kernels land.
"""
from .naive import naive_wkv7


def wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False):
    """r, w, k, v, a, b: [B, T, H, N]; initial/final state [B, H, N, N] fp32 ([value][key] layout)."""
    return naive_wkv7(r, w, k, v, a, b, initial_state, output_final_state)


__all__ = ["wkv7", "naive_wkv7"]
