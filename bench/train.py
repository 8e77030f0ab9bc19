"""Training throughput, MFU and infctx memory on one GPU, through the trainer's own step.

For each preset: RWKV7 with fp32 master weights, Fabric bf16-mixed, fused AdamW with the official
groups, L2Wrap, `trainer.fit.train_step` on `InfctxLM` (exactly what fit.py runs), random tokens
(uniform over the 65536 vocabulary; never zeros). Reports tokens/s, MFU = 6 × non-embedding
parameters × tokens/s ÷ 790e12 (the H200's measured dense bf16 rate, as BENCHMARKS.md), peak memory,
and a CUDA-time breakdown of one step by kernel family (what limits it).
infctx memory: 0.1B with data_ctx_len = 16 × ctx_len vs = ctx_len (same ctx_len and batch), peak
memory of a training step; the target is a ratio within 1.3.

    python bench/train.py [--presets 0.1b,1.5b] [--ctx 4096] [--steps 8] [--out DIR] [--ddp-data DIR]
With --ddp-data on a machine with 2 GPUs it also compares fit.py on 1 GPU with 2-GPU DDP (same global
batch, 20 steps; target: losses within 1e-3).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trainer.fit import train_step  # noqa: E402
from trainer.infctx import InfctxLM  # noqa: E402
from trainer.models.rwkv7 import PRESETS, RWKV7  # noqa: E402

PEAK_BF16 = 790e12
BATCH = {"debug": 2, "0.1b": 16, "0.4b": 8, "1.5b": 4}  # as the presets' micro_batch_size
ACCEL = "cuda"  # --accelerator cpu: a smoke run of this script on a machine without a GPU


def setup(preset: str, ctx_len: int, recompute: bool = True, compile: bool = False):
    import lightning as L

    fabric = L.Fabric(accelerator=ACCEL, devices=1, precision="bf16-mixed" if ACCEL == "cuda" else "32-true")
    fabric.seed_everything(0)
    with fabric.init_module():
        lm = RWKV7(PRESETS[preset])
    if compile:
        from trainer.models.rwkv7 import apply_compile

        apply_compile(lm)
    model = InfctxLM(lm, ctx_len, recompute=recompute)
    groups = lm.optimizer_groups(0.1)
    for g in groups:
        g.pop("names")
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.99), eps=1e-18, fused=True)
    model, opt = fabric.setup(model, opt)
    return fabric, lm, model, opt


def batches(B, D, n, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randint(0, 65536, (B, D + 1), generator=g).to(device) for _ in range(n)]


def family(name: str) -> str:
    n = name.lower()
    for key, fam in (("lm_loss", "loss (fused CE + L2Wrap)"), ("aten::mm", "matmul"), ("aten::bmm", "matmul"), ("addmm", "matmul"), ("wkv", "wkv7 (triton)"), ("chunk", "wkv7 (triton)"), ("gemm", "matmul"), ("sm90", "matmul"),
                     ("cutlass", "matmul"), ("nvjet", "matmul"), ("xmma", "matmul"), ("softmax", "cross-entropy"),
                     ("nll", "cross-entropy"), ("adam", "optimizer"), ("layer_norm", "layernorm/groupnorm"),
                     ("group_norm", "layernorm/groupnorm"), ("norm", "layernorm/groupnorm"),
                     ("scatter", "l2wrap"), ("max", "l2wrap"), ("copy", "copies/casts"), ("cast", "copies/casts")):
        if key in n:
            return fam
    return "elementwise/other"


def throughput(preset: str, ctx: int, steps: int, fused_loss: bool = True, compile: bool = False) -> dict:
    import trainer.loss

    trainer.loss.USE_FUSED = None if fused_loss else False
    B = BATCH[preset]
    t_setup = time.perf_counter()
    fabric, lm, model, opt = setup(preset, ctx, compile=compile)
    n_params = sum(p.numel() for p in lm.parameters())
    non_emb = n_params - lm.emb.weight.numel()
    data = batches(B, ctx, steps + 3, fabric.device)
    torch.cuda.reset_peak_memory_stats()
    for b in data[:3]:
        loss, _ = train_step(fabric, model, opt, [b], 1e-4, 1, 1.0)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t_setup
    t = time.perf_counter()
    for b in data[3:]:
        loss, norm = train_step(fabric, model, opt, [b], 1e-4, 1, 1.0)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    tok_s = B * ctx / dt
    peak = torch.cuda.max_memory_allocated()
    act = torch.profiler.ProfilerActivity.CUDA if ACCEL == "cuda" else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[act]) as prof:
        train_step(fabric, model, opt, [data[0]], 1e-4, 1, 1.0)
        torch.cuda.synchronize()
    fam: dict[str, float] = {}
    for e in prof.key_averages():
        us = e.device_time_total if ACCEL == "cuda" else e.self_cpu_time_total
        if us:
            fam[family(e.key)] = fam.get(family(e.key), 0.0) + us
    total = sum(fam.values()) or 1.0
    top = sorted(((e.key, e.device_time_total if ACCEL == "cuda" else e.self_cpu_time_total)
                  for e in prof.key_averages()),
                 key=lambda x: -x[1])[:12]
    trainer.loss.USE_FUSED = None
    res = {"preset": preset, "loss_path": "fused triton" if fused_loss and ACCEL == "cuda" else "pytorch reference", "compiled": compile,
           "setup_and_warmup_s": round(warm_s, 1), "params": n_params, "non_embedding_params": non_emb, "batch": B, "ctx": ctx,
           "step_ms": round(dt * 1e3, 1), "tokens_per_s": round(tok_s), "mfu": round(6 * non_emb * tok_s / PEAK_BF16, 4),
           "peak_mem_gb": round(peak / 1e9, 2), "loss": round(float(loss), 4), "grad_norm": round(float(norm), 4),
           "cuda_time_share": {k: round(v / total, 3) for k, v in sorted(fam.items(), key=lambda x: -x[1])},
           "top_kernels_ms": [(k[:90], round(v / 1e3, 2)) for k, v in top]}
    del model, opt, lm, fabric
    torch.cuda.empty_cache()
    return res


def infctx_memory(ctx: int, B: int = 2, mult: int = 16, preset: str = "0.1b") -> dict:
    out = {}
    for D in (ctx, mult * ctx):
        fabric, lm, model, opt = setup(preset, ctx)
        (b,) = batches(B, D, 1, fabric.device, seed=D)
        train_step(fabric, model, opt, [b], 1e-4, 1, 1.0)  # optimizer state allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss, _ = train_step(fabric, model, opt, [b], 1e-4, 1, 1.0)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        out[D] = {"peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3), "step_s": round(dt, 3),
                  "tokens_per_s": round(B * D / dt), "loss": round(float(loss), 4)}
        del model, opt, lm, fabric
        torch.cuda.empty_cache()
    ratio = out[mult * ctx]["peak_gb"] / out[ctx]["peak_gb"]
    return {"preset": preset, "batch": B, "ctx_len": ctx, "data_ctx_len": {str(k): v for k, v in out.items()},
            "peak_ratio": round(ratio, 3), "target_ratio": 1.3, "pass": ratio <= 1.3}


def ddp_check(data: str, steps: int = 20, precision: str = "bf16-mixed") -> dict:
    """fit.py on 1 GPU (micro-batch 8) vs `fabric run --devices 2 --strategy ddp` (micro-batch 4 per
    GPU): same global batch, same data order; per-step training losses compared (target: within 1e-3)."""
    import csv
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    run = Path(tempfile.mkdtemp(prefix="ddp"))
    sets = ["train.tensorboard=false", "sample.tokens=0", "train.ckpt_every=0", "train.val_every=10",
            "data.val_windows=16", f"train.precision={precision}"]
    common = ["trainer/fit.py", "--config", "trainer/configs/debug.yaml", "--data", data, "--max-steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmds = {"one": [sys.executable, "-c", "from lightning.fabric.cli import _main; _main()", "run", "--devices", "1",
                    *common, "--run-dir", str(run / "one"),
                    *sum((["--set", x] for x in sets + ["data.micro_batch_size=8"]), [])],
            "two": [sys.executable, "-c", "from lightning.fabric.cli import _main; _main()", "run", "--devices", "2", "--strategy", "ddp", *common,
                    "--run-dir", str(run / "two"), *sum((["--set", x] for x in sets + ["data.micro_batch_size=4"]), [])],
            "fsdp": [sys.executable, "-c", "from lightning.fabric.cli import _main; _main()", "run", "--devices", "2", "--strategy", "fsdp",
                     *common, "--run-dir", str(run / "fsdp"),
                     *sum((["--set", x] for x in sets + ["data.micro_batch_size=4"]), [])]}
    out = {}
    for name, cmd in cmds.items():
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
        if r.returncode:
            out[name] = {"error": f"rc {r.returncode}: {r.stderr[-2000:]}"}
            continue
        if name == "fsdp":
            from trainer.models import load_official

            ck = sorted((run / name / "checkpoints").glob("step-*"))
            out["fsdp_checkpoint_loads"] = bool(ck) and load_official(ck[-1] / "model.pth") is not None
        with open(run / name / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        out[name] = {"loss": [float(x["loss"]) for x in rows], "val_loss": [x["val_loss"] for x in rows if x["val_loss"]],
                     "wall_s": round(time.perf_counter() - t, 1)}
    res = {"steps": steps, "precision": precision, "model": "debug preset (L2-D128), ctx 128 in 2 segments"}
    for name in ("two", "fsdp"):
        if "loss" in out.get("one", {}) and "loss" in out.get(name, {}):
            a, b = out["one"]["loss"], out[name]["loss"]
            diff = max(abs(x - y) for x, y in zip(a, b))
            res[f"{name}_max_abs_loss_diff"] = round(diff, 6)
            res[f"{name}_pass_1e-3"] = len(a) == len(b) == steps and diff <= 1e-3
    return {**res, **out}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="0.1b,1.5b")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--accelerator", default="cuda")
    ap.add_argument("--compile", default="", help="presets to time again with per-block torch.compile")
    ap.add_argument("--reference-loss", default="0.1b", help="preset to time again with the reference loss ('' = none)")
    ap.add_argument("--batch", default="", help="micro-batch overrides, e.g. 0.1b=16 (default: BATCH)")
    ap.add_argument("--ddp-precision", default="bf16-mixed")
    ap.add_argument("--ddp-data", default=None, help="corpus for the 1-GPU vs 2-GPU DDP loss check (needs 2 GPUs)")
    args = ap.parse_args()
    global ACCEL
    ACCEL = args.accelerator
    for item in [x for x in args.batch.split(",") if x]:
        name, n = item.split("=")
        BATCH[name] = int(n)
    if ACCEL != "cuda":
        torch.cuda.synchronize = lambda: None
        torch.cuda.reset_peak_memory_stats = lambda: None
        torch.cuda.max_memory_allocated = lambda: 0
        torch.cuda.empty_cache = lambda: None
        torch.cuda.get_device_name = lambda: "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():  # after every measurement, so a run cut short still leaves its numbers
        tmp = out / f"train.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out / "train.json")   # a run killed mid-write keeps the previous complete file

    def timed(p, comp, fused_loss=True):
        r = None
        try:
            r = throughput(p, args.ctx, args.steps, fused_loss=fused_loss, compile=comp)
        except torch.cuda.OutOfMemoryError:
            pass
        except Exception as e:  # a failure (e.g. in torch.compile) is reported, not fatal to the rest
            res["results"].append({"preset": p, "compiled": comp, "error": repr(e)[:2000]})
            print(f"{p} compile={comp}: {e!r}"[:2000], flush=True)
            return
        if r is None:  # out of memory: free the failed attempt, halve the batch once and say so
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            BATCH[p] //= 2
            r = throughput(p, args.ctx, args.steps, fused_loss=fused_loss, compile=comp)
            r["note"] = f"batch {2 * BATCH[p]} ran out of memory"
        res["results"].append(r)
        save()
        print(json.dumps(r), flush=True)

    # in priority order (a run cut short keeps what finished): eager presets, infctx memory, the
    # reference-loss ratio, the multi-GPU check, then compiled variants
    for p in [p for p in args.presets.split(",") if p]:
        timed(p, False)
    if not args.skip_memory:
        res["infctx_memory"] = infctx_memory(args.ctx)
        save()
        print(json.dumps(res["infctx_memory"]), flush=True)
    if args.reference_loss:  # the same step with the plain PyTorch CE + L2Wrap, for the ratio
        timed(args.reference_loss, False, fused_loss=False)
    if args.ddp_data and torch.cuda.device_count() >= 2:
        res["ddp"] = ddp_check(args.ddp_data, precision=args.ddp_precision)
        save()
        print(json.dumps({k: v for k, v in res["ddp"].items() if k not in ("one", "two", "fsdp")}), flush=True)
    for p in [p for p in args.compile.split(",") if p]:
        timed(p, True)
    print(f"\n{'preset':<8}{'loss':<20}{'batch':>6}{'ctx':>6}{'tokens/s':>11}{'MFU':>7}{'peak GB':>9}")
    for r in res["results"]:
        if "error" in r:
            continue
        print(f"{r['preset'] + ('+c' if r['compiled'] else ''):<8}{r['loss_path']:<20}{r['batch']:>6}{r['ctx']:>6}{r['tokens_per_s']:>11,}"
              f"{r['mfu']:>7.1%}{r['peak_mem_gb']:>9}")
    if "infctx_memory" in res:
        m = res["infctx_memory"]
        print(f"infctx 0.1B peak memory, data_ctx_len 16x vs 1x ctx_len: ratio {m['peak_ratio']} (target <= 1.3)")
    save()


if __name__ == "__main__":
    main()
