"""WKV7 kernel benchmark on one GPU: ours (chunk_wkv7, several configs) vs flash-linear-attention's
chunk_rwkv7 and the official RWKV-LM CUDA kernels (rwkv7_clampw v1 and v3_for_h100), on the five shapes of
BENCHMARKS.md, bf16, head size 64.

Times forward and forward+backward (median of triton.testing.do_bench), checks each implementation's
forward error (ours and the official kernels': gradients too) against a float64 reference, and reports achieved
bandwidth against the memory floor (each input read once, each output written once). Writes JSON incrementally
to --out.

Forward+backward is compared within one calling convention at a time, since on short shapes the host side
(autograd, launches) can take as long as the kernels: "autograd" (y = op(...); y.backward(dy), as a trainer
calls it; the official op behind an autograd.Function as RWKV-LM's trainer wraps it), "raw" (the forward and
backward host functions called directly; fla has no such form) and "device" (the GPU kernels' time alone, from
torch.profiler).

Peers are optional: fla from an installed `fla` package, the official kernels from --rwkvlm DIR holding
rwkv7_clampw.{cu,cpp}, rwkv7_clampw_v3.cpp and rwkv7_clampw_v3_for_h100.cu (copied from RWKV-LM at bench time;
never committed here). A peer that fails to load or run is reported and skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.wkv7 import chunk as ours  # noqa: E402
from kernels.wkv7 import chunk_wkv7_torch  # noqa: E402

SHAPES = [(8, 4096, 12), (8, 4096, 32), (4, 4096, 32), (1, 32768, 32), (16, 512, 12)]
N = 64
W_SCALE = -0.6065306597
CHUNK_LEN_OFFICIAL = 16


def make_inputs(B, T, H, device, seed=0):
    """r, k, v ~ N(0,1); w_raw ~ N(0, 4); a = -kk, b = kk sigmoid(noise), kk unit per head. bf16. Also dy ~ N(0,1)
    (the upstream gradient of y, from the same generator: runs with the same seed check the same gradients)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, device=device, generator=g)
    r, k, v = rnd(), rnd(), rnd()
    w_raw = 2 * rnd()
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rnd())
    bf = lambda x: x.bfloat16().contiguous()
    r, w_raw, k, v, a, b = map(bf, (r, w_raw, k, v, a, b))
    w = bf(W_SCALE * torch.sigmoid(w_raw.float()))     # log decay, as the model passes it
    return dict(r=r, w=w, w_raw=w_raw, k=k, v=v, a=a, b=b, dy=bf(rnd()))


# ---------------------------------------------------------------------------------------------------- peers
def load_fla():
    from fla.ops.rwkv7 import chunk_rwkv7

    def fwd(x):
        return chunk_rwkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], scale=1.0)[0]
    return fwd


def load_official(src_dir, v3):
    from torch.utils.cpp_extension import load
    flags = ["-res-usage", f"-D_N_={N}", f"-D_CHUNK_LEN_={CHUNK_LEN_OFFICIAL}", "--use_fast_math", "-O3",
             "-Xptxas -O3", "--extra-device-vectorization"]
    name = "rwkv7_clampw_v3" if v3 else "rwkv7_clampw"
    srcs = (["rwkv7_clampw_v3_for_h100.cu", "rwkv7_clampw_v3.cpp"] if v3 else ["rwkv7_clampw.cu", "rwkv7_clampw.cpp"])
    load(name=name, sources=[os.path.join(src_dir, s) for s in srcs], is_python_module=False, verbose=False,
         extra_cuda_cflags=flags)
    op = getattr(torch.ops, name)

    def fwd(x):
        B, T, H, _ = x["r"].shape
        y = torch.empty_like(x["v"])
        s = torch.empty(B, H, T // CHUNK_LEN_OFFICIAL, N, N, dtype=torch.float32, device=y.device)
        sa = torch.empty(B, T, H, N, dtype=torch.float32, device=y.device)
        op.forward(x["r"], x["w_raw"], x["k"], x["v"], x["a"], x["b"], y, s, sa)
        return y, s, sa

    def fwd_bwd(x, dy):
        y, s, sa = fwd(x)
        grads = [torch.empty_like(x[n]) for n in ("r", "w_raw", "k", "v", "a", "b")]
        op.backward(x["r"], x["w_raw"], x["k"], x["v"], x["a"], x["b"], dy, s, sa, *grads)
        return grads

    class Op(torch.autograd.Function):
        """The op behind autograd, as RWKV-LM's trainer calls it (saved s, sa; backward allocates the grads)."""

        @staticmethod
        def forward(ctx, r, w_raw, k, v, a, b):
            y, s, sa = fwd(dict(r=r, w_raw=w_raw, k=k, v=v, a=a, b=b))
            ctx.save_for_backward(r, w_raw, k, v, a, b, s, sa)
            return y

        @staticmethod
        def backward(ctx, dy):
            r, w_raw, k, v, a, b, s, sa = ctx.saved_tensors
            grads = [torch.empty_like(t) for t in (r, w_raw, k, v, a, b)]
            op.backward(r, w_raw, k, v, a, b, dy.contiguous(), s, sa, *grads)
            return tuple(grads)

    def autograd_run(x, dy):
        leaves = [x[n].detach().requires_grad_() for n in ("r", "w_raw", "k", "v", "a", "b")]

        def run():
            for t in leaves:
                t.grad = None
            Op.apply(*leaves).backward(dy)
        return run
    return (lambda x: fwd(x)[0]), (lambda x, dy: lambda: fwd_bwd(x, dy)), autograd_run


# ------------------------------------------------------------------------------------------------- helpers
def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def floor_ms(B, T, H, fwd_bwd):
    """Memory floor at the measured copy bandwidth: fwd reads 6 inputs, writes y (bf16); bwd reads 6 inputs
    and dy, writes 6 gradients."""
    elems = B * T * H * N
    nbytes = (7 + (13 if fwd_bwd else 0)) * 2 * elems
    return nbytes, nbytes / BW_BYTES_PER_MS


def copy_bandwidth():
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / ms


def cfg_tag(cfg):
    return (f"ours_C{cfg.chunk_size}_BV{cfg.block_v}_W{cfg.num_warps}_Wb{cfg.num_warps_bwd}_{cfg.precision}"
            f"_{cfg.precision_bwd}_s{cfg.precision_state_bwd}_x{cfg.precision_cc}_f{int(cfg.prefetch)}"
            f"_c{cfg.num_warps_cc}_g{cfg.grads_kernel}")


def parse_cfg(c):
    """C-BV-warps-warpsbwd-precision-precisionbwd[-fF-cW-sP-xQ-gG]: F prefetch (0/1), W num_warps_cc, P
    precision_state_bwd, Q precision_cc, G grads_kernel; omitted ones keep chunk.CONFIG's defaults."""
    f = c.split("-")
    cfg = replace(ours.CONFIG, chunk_size=int(f[0]), block_v=int(f[1]), num_warps=int(f[2]), num_warps_bwd=int(f[3]),
                  precision=f[4], precision_bwd=f[5])
    for x in f[6:]:
        key = {"f": "prefetch", "c": "num_warps_cc", "s": "precision_state_bwd", "x": "precision_cc",
               "g": "grads_kernel"}[x[0]]
        val = x[1:] if key.startswith("precision") or key == "grads_kernel" else int(x[1:])
        cfg = replace(cfg, **{key: bool(val) if key == "prefetch" else val})
    return cfg


def kernel_times(fn, iters=5):
    """Device time per GPU kernel (ms per call of fn), from torch.profiler over `iters` calls; "total": all of
    them, the call's GPU work without host gaps."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        if t and e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.key] = t / 1000 / iters
    out["total"] = sum(out.values())
    return out


def host_ms(fn, calls=20):
    """Host time per call of fn (ms): the calls are timed without waiting for the GPU. Where this nears the
    do_bench time, the launches (Python, autograd, allocations) rather than the kernels set the pace."""
    import time as _time
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = _time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = _time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / calls


def ours_fwd(x):
    return ours.chunk_wkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"])[0]


def ours_fwd_bwd_fn(x, dy):
    leaves = {n: x[n].detach().requires_grad_() for n in "rwkvab"}

    def run():
        for t in leaves.values():
            t.grad = None
        y, _ = ours.chunk_wkv7(*(leaves[n] for n in "rwkvab"))
        y.backward(dy)
    return run, leaves


def ours_raw_fwd_bwd_fn(x, dy):
    """Ours called the way this script calls the official op: the forward and backward host functions
    directly, no autograd (the kernels and their launches only)."""
    args = [x[n] for n in "rwkvab"]

    def run():
        _, _, st, cc = ours._fwd(*args, None, False, True, ours.CONFIG)
        return ours._bwd(*args, st, cc, dy, None, False, ours.CONFIG)
    return run


def fla_fwd_bwd_fn(fla_mod, x, dy):
    from fla.ops.rwkv7 import chunk_rwkv7
    leaves = {n: x[n].detach().requires_grad_() for n in "rwkvab"}

    def run():
        for t in leaves.values():
            t.grad = None
        y = chunk_rwkv7(*(leaves[n] for n in "rwkvab"), scale=1.0)[0]
        y.backward(dy)
    return run


def main():
    global do_bench, BW_BYTES_PER_MS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--rwkvlm", default=".whl-kernels/rwkvlm")
    ap.add_argument("--shapes", default="all", help='"all", "none" (accuracy only) or e.g. 16-512-12,8-4096-32')
    ap.add_argument("--configs", default="",
                    help="comma-separated configs, see parse_cfg and WKV7KernelConfig (default: chunk.CONFIG)")
    ap.add_argument("--acc-shapes", type=int, default=2, help="how many accuracy shapes to check (<= 2)")
    ap.add_argument("--peers", default="fla,official_v1,official_v3")
    ap.add_argument("--host", action="store_true", help="also time the host side of each fwd+bwd call")
    ap.add_argument("--build-only", choices=["v1", "v3"], help="build one official extension and exit")
    args = ap.parse_args()
    if args.build_only:
        load_official(args.rwkvlm, args.build_only == "v3")
        return
    builds = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rwkvlm", args.rwkvlm, "--build-only", v])
              for v in ("v1", "v3") if f"official_{v}" in args.peers] if os.path.isdir(args.rwkvlm) else []
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "wkv7.json")
    import triton
    from triton.testing import do_bench as _db
    do_bench = lambda f: _db(f, warmup=25, rep=100, return_mode="median")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import fla
        res["fla"] = getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        res["fla"] = f"unavailable: {e}"
    try:
        res["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except Exception as e:  # noqa: BLE001
        res["nvcc"] = f"unavailable: {e}"
    res["rows"], res["errors"], res["failures"] = [], {}, {}

    def save():
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, out_path)

    BW_BYTES_PER_MS = copy_bandwidth()
    res["copy_bandwidth_TBps"] = BW_BYTES_PER_MS / 1e9
    print(f"copy bandwidth {BW_BYTES_PER_MS / 1e9:.2f} TB/s", flush=True)
    configs = [parse_cfg(c) for c in args.configs.split(",")] if args.configs else [ours.CONFIG]

    peers = {}
    want = set(args.peers.split(",")) if args.peers else set()
    try:
        if "fla" in want:
            peers["fla"] = (load_fla(), lambda x, dy: fla_fwd_bwd_fn(None, x, dy))
    except Exception:  # noqa: BLE001
        res["failures"]["fla_load"] = traceback.format_exc()[-2000:]
    save()
    print("peers:", list(peers), "failures:", list(res["failures"]), flush=True)

    acc_refs = {}
    # --- accuracy vs float64 (B2-T256-H4 as in BENCHMARKS.md, and one long sequence)
    for (B, T, H) in [(2, 256, 4), (1, 4096, 4)][:args.acc_shapes]:
        x = make_inputs(B, T, H, "cuda", seed=1)
        x64 = {n: x[n].double().requires_grad_() for n in "rwkvab"}
        y64, _ = chunk_wkv7_torch(*(x64[n] for n in "rwkvab"), chunk_size=16)
        dy = x["dy"]
        y64.backward(dy.double())
        key = f"B{B}-T{T}-H{H}"
        errs = {}
        for cfg in configs:
            ours.CONFIG = cfg
            tag = cfg_tag(cfg)
            try:
                leaves = {n: x[n].detach().requires_grad_() for n in "rwkvab"}
                y, _ = ours.chunk_wkv7(*(leaves[n] for n in "rwkvab"))
                y.backward(dy)
                errs[tag] = {"y": rel(y, y64), **{f"d{n}": rel(leaves[n].grad, x64[n].grad) for n in "rwkvab"}}
            except Exception:  # noqa: BLE001
                res["failures"][f"{tag}_err_{key}"] = traceback.format_exc()[-2000:]
        # The official kernels take w_raw and compute w = W_SCALE * sigmoid(w_raw) in fp32, and the model passes
        # ours w in fp32 too: so also check both against a reference on that exact w (float64); the bf16 rounding
        # of w in the check above is an input error the official kernels never see.
        w_exact = W_SCALE * torch.sigmoid(x["w_raw"].double())
        x64e = {n: (w_exact if n == "w" else x[n].double()).detach().requires_grad_() for n in "rwkvab"}
        y64e, _ = chunk_wkv7_torch(*(x64e[n] for n in "rwkvab"), chunk_size=16)
        y64e.backward(dy.double())
        ref_e = {"y": y64e, **{f"d{n}": x64e[n].grad for n in "rwkvab"}}
        dw_raw_e = x64e["w"].grad * W_SCALE * torch.sigmoid(x["w_raw"].double()) * (1 - torch.sigmoid(x["w_raw"].double()))
        for cfg in configs:
            ours.CONFIG = cfg
            tag = cfg_tag(cfg) + "_w_fp32"
            try:
                leaves = {n: (w_exact.float() if n == "w" else x[n]).detach().requires_grad_() for n in "rwkvab"}
                y, _ = ours.chunk_wkv7(*(leaves[n] for n in "rwkvab"))
                y.backward(dy)
                errs[tag] = {"y_vs_exact_w": rel(y, y64e),
                             **{f"d{n}_vs_exact_w": rel(leaves[n].grad, ref_e[f"d{n}"]) for n in "rwkvab"}}
            except Exception:  # noqa: BLE001
                res["failures"][f"{tag}_err_{key}"] = traceback.format_exc()[-2000:]
        res["errors"][key] = errs
        acc_refs[key] = (x, dy, y64, ref_e, dw_raw_e)
        print(key, json.dumps(errs), flush=True)
        save()

    for p in builds:
        p.wait()
    for v3 in (False, True):
        nm = "official_v3" if v3 else "official_v1"
        if nm not in want:
            continue
        try:
            t0 = time.time()
            fwd, raw, autograd = load_official(args.rwkvlm, v3)
            peers[nm] = (fwd, raw)
            peers[nm + "_autograd"] = (fwd, autograd)
            res[f"{nm}_build_s"] = time.time() - t0
        except Exception:  # noqa: BLE001
            res["failures"][f"{nm}_load"] = traceback.format_exc()[-2000:]
    for key, (x, dy, y64, ref_e, dw_raw_e) in acc_refs.items():
        for nm, (f, make_run) in peers.items():
            if nm.endswith("_autograd"):
                continue
            try:
                y = f(x)
                res["errors"][key][nm] = {"y": rel(y, y64)}
                if nm.startswith("official"):   # grads of (r, w_raw, k, v, a, b) from the raw backward
                    g = make_run(x, dy)()
                    res["errors"][key][nm].update(
                        {"y_vs_exact_w": rel(y, ref_e["y"]), "dw_raw_vs_exact_w": rel(g[1], dw_raw_e),
                         **{f"d{n}_vs_exact_w": rel(g[i], ref_e[f"d{n}"]) for i, n in enumerate("rwkvab") if n != "w"}})
            except Exception:  # noqa: BLE001
                res["failures"][f"{nm}_err_{key}"] = traceback.format_exc()[-2000:]
        print(key, "peers", json.dumps({k: v for k, v in res["errors"][key].items() if not k.startswith("ours")}),
              flush=True)
    save()

    # --- timing
    named = {"all": SHAPES, "none": []}
    shapes = named[args.shapes] if args.shapes in named else [tuple(int(t) for t in s.split("-"))
                                                              for s in args.shapes.split(",")]
    for (B, T, H) in shapes:
        x = make_inputs(B, T, H, "cuda")
        dy = x["dy"]
        nb_f, fl_f = floor_ms(B, T, H, False)
        nb_fb, fl_fb = floor_ms(B, T, H, True)
        row = {"shape": f"{B}-{T}-{H}", "floor_fwd_ms": fl_f, "floor_fwd_bwd_ms": fl_fb}
        for cfg in configs:
            ours.CONFIG = cfg
            tag = cfg_tag(cfg)
            try:
                row[tag] = {"fwd": do_bench(lambda x=x: ours_fwd(x))}
                run, _ = ours_fwd_bwd_fn(x, dy)
                row[tag]["fwd_bwd"] = do_bench(run)
                row[tag]["fwd_bwd_raw"] = do_bench(ours_raw_fwd_bwd_fn(x, dy))
                row[tag]["kernels_ms"] = kernel_times(run)
                row[tag]["device_fwd_bwd"] = row[tag]["kernels_ms"]["total"]
                if args.host:
                    row[tag]["host_fwd_bwd"] = host_ms(run)
            except Exception:  # noqa: BLE001
                res["failures"][f"{tag}_{row['shape']}"] = traceback.format_exc()[-2000:]
            print(row["shape"], tag, row.get(tag), flush=True)
        for nm, (f, make_run) in peers.items():
            try:
                row[nm] = {"fwd": do_bench(lambda f=f, x=x: f(x))}
                run = make_run(x, dy)
                row[nm]["fwd_bwd"] = do_bench(run)
                row[nm]["device_fwd_bwd"] = kernel_times(run)["total"]
                if args.host:
                    row[nm]["host_fwd_bwd"] = host_ms(run)
            except Exception:  # noqa: BLE001
                res["failures"][f"{nm}_{row['shape']}"] = traceback.format_exc()[-2000:]
            print(row["shape"], nm, row.get(nm), flush=True)
        res["rows"].append(row)
        save()
        torch.cuda.empty_cache()

    # --- table: each comparison within one calling convention. "autograd": y = op(...); y.backward(dy), as a
    # trainer calls it (ours: chunk_wkv7; official: its op behind an autograd.Function as RWKV-LM does; fla:
    # chunk_rwkv7). "raw": forward and backward host functions called directly (ours: _fwd/_bwd; official: its
    # two ops; fla has no such form). "device": the GPU kernels' time alone (torch.profiler), no host gaps.
    print("\nshape | ours fwd / fwd+bwd (autograd) | ours raw | ours device | fla | v3 autograd | v3 raw | v3 device"
          " | vs best peer: autograd / raw / device | % of memory floor")
    for row in res["rows"]:
        ours_tags = [k for k in row if k.startswith("ours_") and "fwd_bwd" in row[k]]
        if not ours_tags:
            continue
        best = min(ours_tags, key=lambda k: row[k]["fwd_bwd"])
        o = row[best]

        def best_peer(names, key, row=row):
            return min((row[k][key] for k in names if key in row.get(k, {})), default=float("nan"))
        row["best_ours"] = best
        row["speedup_vs_best_peer"] = {
            "autograd": best_peer(("fla", "official_v1_autograd", "official_v3_autograd"), "fwd_bwd") / o["fwd_bwd"],
            "raw": best_peer(("official_v1", "official_v3"), "fwd_bwd") / o["fwd_bwd_raw"],
            "device": best_peer(("fla", "official_v1", "official_v3"), "device_fwd_bwd") / o["device_fwd_bwd"]}
        sp = row["speedup_vs_best_peer"]
        cell = lambda k, key="fwd_bwd", row=row: f"{row[k][key]:.2f}" if key in row.get(k, {}) else "-"
        print(f"{row['shape']} | {o['fwd']:.2f} / {o['fwd_bwd']:.2f} | {o['fwd_bwd_raw']:.2f} | "
              f"{o['device_fwd_bwd']:.2f} | {cell('fla')} | {cell('official_v3_autograd')} | {cell('official_v3')} | "
              f"{cell('official_v3', 'device_fwd_bwd')} | {sp['autograd']:.2f}x / {sp['raw']:.2f}x / "
              f"{sp['device']:.2f}x | {100 * row['floor_fwd_bwd_ms'] / o['fwd_bwd']:.0f}%")
    save()
    print("config:", asdict(ours.CONFIG))


if __name__ == "__main__":
    main()
