"""Host (CPU) time of one chunk_wkv7 forward + backward call, and where it goes, on a GPU machine.

On short shapes (B16-T512-H12: 0.69 ms of kernels) the Python side of a call (autograd, argument checks,
allocations, four Triton launches) can take as long as the kernels, and then it sets the pace. This prints
the host time per call, the top entries of cProfile over many calls, and the cost of the pieces alone: a
Triton launch through JITFunction (argument specialization + cache lookup + launch), the same kernel launched
through its CompiledKernel, and one CUDA allocation.

    python bench/wkv7_host.py --shape 16-512-12
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from wkv7 import host_ms, make_inputs, ours_fwd_bwd_fn  # noqa: E402

from kernels.wkv7 import chunk as ours  # noqa: E402
from kernels.wkv7 import triton_kernels as K  # noqa: E402


def per_call_us(fn, calls=2000):
    return 1e3 * host_ms(fn, calls)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="16-512-12")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args()
    B, T, H = (int(s) for s in args.shape.split("-"))
    x = make_inputs(B, T, H, "cuda")
    dy = torch.randn_like(x["v"])
    run, _ = ours_fwd_bwd_fn(x, dy)
    res = {"shape": args.shape, "host_fwd_bwd_ms": host_ms(run, calls=200)}

    prof = cProfile.Profile()
    run()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(200):
        run()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    res["cprofile_top"] = s.getvalue()

    C = ours.CONFIG.chunk_size
    NC = -(-T // C)
    cc = torch.empty((B * H, NC, 4, C, C), dtype=torch.float32, device="cuda")
    a = (x["r"], x["w"], x["k"], x["a"], x["b"], cc, T, NC, H)
    kw = dict(N=64, C=C, LOG2C=int(math.log2(C)), PREC=ours.CONFIG.precision_cc, BIAS=ours._bias(x["r"]),
              num_warps=ours.CONFIG.num_warps_cc)
    grid = (NC * B * H,)   # the kernel's one-dimensional grid
    compiled = K.chunk_cc_kernel[grid](*a, **kw)
    res["jit_launch_us"] = per_call_us(lambda: K.chunk_cc_kernel[grid](*a, **kw))
    try:
        runner = compiled[(NC * B * H, 1, 1)]
        full = (*a, 64, C, int(math.log2(C)), ours.CONFIG.precision_cc, kw["BIAS"])
        res["compiled_launch_us"] = per_call_us(lambda: runner(*full))
    except Exception as e:  # noqa: BLE001
        res["compiled_launch_us"] = f"failed: {e!r}"
    res["cuda_alloc_us"] = per_call_us(lambda: torch.empty((B, T, H, 64), dtype=torch.bfloat16, device="cuda"))
    res["empty_like_us"] = per_call_us(lambda: torch.empty_like(x["r"]))
    print(res["cprofile_top"])
    print(json.dumps({k: v for k, v in res.items() if k != "cprofile_top"}, indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "wkv7_host.json.tmp"), "w") as f:
        json.dump(res, f, indent=1)
    os.replace(os.path.join(args.out, "wkv7_host.json.tmp"), os.path.join(args.out, "wkv7_host.json"))


if __name__ == "__main__":
    main()
