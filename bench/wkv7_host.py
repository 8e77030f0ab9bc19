"""Host (CPU) time of one chunk_wkv7 forward + backward call, and where it goes, on a GPU machine.

On short shapes (B16-T512-H12: 0.69 ms of kernels) the Python side of a call (autograd, argument checks,
allocations, four Triton launches) can take as long as the kernels, and then it sets the pace. This prints
the host time per call, the top entries of cProfile over many calls, and the cost of the pieces alone: a
Triton launch through JITFunction (argument specialization + cache lookup + launch), the same kernel launched
through its CompiledKernel, and one CUDA allocation; and, for scale, the same autograd call with no kernels
(an autograd.Function that allocates and saves what ours does: the floor any op pays in this convention), ours
without autograd (chunk._fwd / chunk._bwd) and, with --rwkvlm, the official op's autograd call.

    python bench/wkv7_host.py --shape 16-512-12 [--rwkvlm .whl-kernels/rwkvlm]
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

from wkv7 import host_ms, load_official, make_inputs, ours_fwd_bwd_fn, ours_raw_fwd_bwd_fn  # noqa: E402

from kernels.wkv7 import chunk as ours  # noqa: E402
from kernels.wkv7 import triton_kernels as K  # noqa: E402


def per_call_us(fn, calls=2000):
    return 1e3 * host_ms(fn, calls)


class NoKernels(torch.autograd.Function):
    """chunk.ChunkWKV7's host side without its kernels: the allocations it makes and the tensors it saves."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b):
        B, T, H, N = r.shape
        NC = -(-T // ours.CONFIG.chunk_size)
        C = ours.CONFIG.chunk_size
        y = torch.empty_like(r)
        st = torch.empty((B, H, NC, N, N), dtype=torch.float32, device=r.device)
        cc = torch.empty((B * H, NC, 4, C, C), dtype=torch.float32, device=r.device)
        ctx.save_for_backward(r, w, k, v, a, b, st, cc)
        return y

    @staticmethod
    def backward(ctx, dy):
        r, w, k, v, a, b, st, cc = ctx.saved_tensors
        torch.empty_like(st)
        torch.empty((r.shape[0], r.shape[2], r.shape[3], r.shape[3]), dtype=torch.float32, device=r.device)
        return tuple(torch.empty_like(t) for t in (r, w, k, v, a, b))


def no_kernels_fn(x, dy):
    leaves = [x[n].detach().requires_grad_() for n in "rwkvab"]

    def run():
        for t in leaves:
            t.grad = None
        NoKernels.apply(*leaves).backward(dy)
    return run


def split_ms(x, dy, calls=100):
    """Host ms per call of the autograd forward alone and of the backward alone (calls prepared first), and of
    the raw forward and raw backward."""
    import time
    leaves = [x[n].detach().requires_grad_() for n in "rwkvab"]
    args = [x[n] for n in "rwkvab"]
    out = {}
    for _ in range(3):
        ours.chunk_wkv7(*leaves)[0].backward(dy)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ys = [ours.chunk_wkv7(*leaves)[0] for _ in range(calls)]
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    for y in ys:
        y.backward(dy)
    t3 = time.perf_counter()
    torch.cuda.synchronize()
    out["autograd_fwd_ms"], out["autograd_bwd_ms"] = (t1 - t0) * 1e3 / calls, (t3 - t2) * 1e3 / calls
    del ys
    t0 = time.perf_counter()
    saved = [ours._fwd(*args, None, False, True, ours.CONFIG) for _ in range(calls)]
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    for _, _, st, cc in saved:
        ours._bwd(*args, st, cc, dy, None, False, ours.CONFIG)
    t3 = time.perf_counter()
    torch.cuda.synchronize()
    out["raw_fwd_ms"], out["raw_bwd_ms"] = (t1 - t0) * 1e3 / calls, (t3 - t2) * 1e3 / calls
    return out


def cpu_trace(run, path, calls=10):
    """torch.profiler over `calls` calls (CPU and CUDA, every thread): the self CPU time table, and a trace."""
    from torch.profiler import ProfilerActivity, profile
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=False) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="16-512-12")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--rwkvlm", default="", help="folder of the official kernels' sources (see wkv7.py)")
    args = ap.parse_args()
    B, T, H = (int(s) for s in args.shape.split("-"))
    x = make_inputs(B, T, H, "cuda")
    dy = x["dy"]
    run, _ = ours_fwd_bwd_fn(x, dy)
    res = {"shape": args.shape, "host_fwd_bwd_ms": host_ms(run, calls=200),
           "host_no_kernels_ms": host_ms(no_kernels_fn(x, dy), calls=200),
           "host_raw_ms": host_ms(ours_raw_fwd_bwd_fn(x, dy), calls=200)}
    if args.rwkvlm:
        try:
            res["host_official_v3_autograd_ms"] = host_ms(load_official(args.rwkvlm, True)[2](x, dy), calls=200)
        except Exception as e:  # noqa: BLE001
            res["host_official_v3_autograd_ms"] = f"failed: {e!r}"
    res["host_fwd_bwd_ms_again"] = host_ms(run, calls=200)
    direct_key = ours._call_key
    ours._call_key = lambda *a: None     # every launch through triton's JIT, as before chunk._launch
    res["host_fwd_bwd_jit_launches_ms"] = host_ms(run, calls=200)
    ours._call_key = direct_key
    res.update(split_ms(x, dy))
    os.makedirs(args.out, exist_ok=True)
    res["cpu_table"] = cpu_trace(run, os.path.join(args.out, "trace.json"))
    print(res["cpu_table"])

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
    print(json.dumps({k: v for k, v in res.items() if k not in ("cprofile_top", "cpu_table")}, indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "wkv7_host.json.tmp"), "w") as f:
        json.dump(res, f, indent=1)
    os.replace(os.path.join(args.out, "wkv7_host.json.tmp"), os.path.join(args.out, "wkv7_host.json"))


if __name__ == "__main__":
    main()
