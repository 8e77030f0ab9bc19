"""Benchmark the RWKV-7 model: training throughput beside fla's RWKV-7, and RNN-mode generation speed.

Training (CUDA only): one optimizer step = forward + backward + fused AdamW, fp32 master weights under
bf16 autocast, random tokens, ctx 4096; ours with the trainer's fused Triton cross-entropy + L2Wrap, eager
and with each block torch.compile'd (the WKV kernel stays outside the graphs); peer: flash-linear-attention's
`RWKV7ForCausalLM` (chunk mode, fused cross-entropy, L2Wrap off, as in BENCHMARKS.md) at the same size
and LoRA widths, in the same process. MFU = 6 x (parameters outside the embedding) x tokens/s / 790e12.

Generation (CPU and CUDA): greedy RNN-mode decoding with trainer.generate.stream beside the `rwkv` pip
package's token-by-token forward, same random 0.1B checkpoint; tokens/s over the first and second half
of the generated tokens (constant time per token shows as equal halves).

    python bench/model.py --device cpu --plan gen       # generation on this machine
    python bench/model.py --device cpu --plan step-overhead   # per-token overhead: step vs forward vs rwkv package
    python bench/model.py --device cuda --out $OUT/model_gpu.json [--budget-s 150]
Prints a table last and writes JSON (results so far are rewritten after every measurement).
fla's first training step compiles and autotunes its Triton kernels: on the H200 it took over 3 minutes
(run 1), so the default plan measures ours first and fla after; give a run `--budget-s` 400+ for both.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.generate import stream  # noqa: E402
from trainer.loss import lm_loss  # noqa: E402
from trainer.models import PRESETS, RWKV7  # noqa: E402
from trainer.models.rwkv7 import apply_compile  # noqa: E402

PEAK_FLOPS = 790e12  # measured bf16 matmul rate of one H200 here (BENCHMARKS.md)


def nonemb_params(n_total: int, vocab: int, width: int) -> int:
    return n_total - vocab * width


def perturb_(model: torch.nn.Module, scale: float = 1e-3) -> None:
    """Move every parameter off the init's exact zeros (never time on zeros)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def time_steps(step, batches, warmup: int, steps: int) -> list[float]:
    for i in range(warmup):
        step(*batches[i % len(batches)])
    torch.cuda.synchronize()
    times = []
    for i in range(steps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        step(*batches[i % len(batches)])
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return times


def ours_train(preset: str, batch: int, ctx: int, compiled: bool, device: str = "cuda"):
    cfg = PRESETS[preset]
    with torch.device(device):
        model = RWKV7(cfg)
    perturb_(model)
    if compiled:
        torch._dynamo.reset()  # fresh static-shape graphs for this size
        apply_compile(model)
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-5, betas=(0.9, 0.99), eps=1e-18, fused=True)

    def step(idx, tgt):
        with torch.autocast(device, dtype=torch.bfloat16):
            logits, _ = model(idx)
            loss = lm_loss(logits, tgt)     # the trainer's loss: fused Triton CE + L2Wrap on CUDA
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    n = sum(t.numel() for t in model.state_dict().values())
    return step, n, cfg, (model, opt)


def fla_train(preset: str, batch: int, ctx: int):
    from fla.models import RWKV7Config as FlaConfig
    from fla.models import RWKV7ForCausalLM

    cfg = PRESETS[preset]
    fc = FlaConfig(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, head_dim=cfg.head_size,
                   decay_low_rank_dim=cfg.dim_w, a_low_rank_dim=cfg.dim_a, v_low_rank_dim=cfg.dim_v,
                   gate_low_rank_dim=cfg.dim_g, hidden_ratio=4, vocab_size=cfg.vocab_size, attn_mode="chunk",
                   fuse_cross_entropy=True, use_l2warp=False, tie_word_embeddings=False, use_cache=False)
    with torch.device("cuda"):
        model = RWKV7ForCausalLM(fc)
    perturb_(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.99), eps=1e-18, fused=True, weight_decay=0.1)

    def step(idx, tgt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=idx, labels=idx, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    n = sum(p.numel() for p in model.parameters())
    return step, n, cfg, (model, opt)


def bench_train_one(results: dict, write, preset: str, batch: int, variant: str, ctx: int, warmup: int, steps: int):
    row = {"kind": "train", "preset": preset, "batch": batch, "ctx": ctx, "impl": variant}
    holder = None
    try:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if variant == "fla":
            step, n, cfg, holder = fla_train(preset, batch, ctx)
        else:
            step, n, cfg, holder = ours_train(preset, batch, ctx, compiled=variant == "ours-compile")
        g = torch.Generator(device="cuda").manual_seed(0)
        batches = [(torch.randint(0, cfg.vocab_size, (batch, ctx), device="cuda", generator=g),
                    torch.randint(0, cfg.vocab_size, (batch, ctx), device="cuda", generator=g)) for _ in range(2)]
        loss = float(step(*batches[0]))
        row["first_step_s"] = time.perf_counter() - t0
        times = time_steps(step, batches, warmup, steps)
        med = statistics.median(times)
        tps = batch * ctx / med
        ne = nonemb_params(n, cfg.vocab_size, cfg.n_embd)
        row.update(params=n, nonemb_params=ne, step_s=med, step_s_all=times, tokens_per_s=tps,
                   mfu=6 * ne * tps / PEAK_FLOPS, peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9,
                   first_loss=loss)
    except Exception as e:  # noqa: BLE001 - one failed variant is reported, the rest still run
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
    finally:
        del holder
        gc.collect()
        torch.cuda.empty_cache()
    results["rows"].append(row)
    write()
    print(json.dumps({k: v for k, v in row.items() if k != "step_s_all"}), flush=True)


def rwkv_package_model():
    """The `rwkv` package's RWKV class set up as the oracle: RWKV-7 on, TorchScript on, its CUDA kernel off."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV

    return RWKV


def bench_generate(results: dict, write, device: str, n_tokens: int, tmpdir: Path):
    """Greedy decoding of n_tokens, ours vs the rwkv package, on the same random 0.1B checkpoint.
    The two decoders take turns token by token, so both see the same load on a shared machine."""
    torch.manual_seed(0)
    model = RWKV7(PRESETS["0.1b"])
    perturb_(model, 0.02)
    path = tmpdir / "gen_0.1b.pth"
    model.save_official(path, dtype=torch.bfloat16)
    del model
    from trainer.models import load_official

    RWKV = rwkv_package_model()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtypes = {"cpu": [("fp32", torch.float32, "cpu fp32")],
              "cuda": [("fp32", torch.float32, "cuda fp32"), ("bf16", torch.bfloat16, "cuda bf16")]}[device]
    prompt = list(range(1, 17))
    for name, dt, strategy in dtypes:
        try:
            ours = stream(load_official(path, dtype=dt, device=device).eval(), prompt, n_tokens + 1,
                          temperature=0.0, stop_token=None)
            ref = RWKV(model=str(path)[:-4], strategy=strategy)
            ref_logits, ref_state = ref.forward(prompt, None)
            ours_toks, ref_toks = [next(ours)[0]], []  # ours: the prompt pass and the first token
            sync()
            t_ours, t_ref = [], []
            for _ in range(n_tokens):
                t0 = time.perf_counter()
                ours_toks.append(next(ours)[0])
                sync()
                t1 = time.perf_counter()
                ref_toks.append(int(torch.argmax(ref_logits)))
                ref_logits, ref_state = ref.forward([ref_toks[-1]], ref_state)
                sync()
                t2 = time.perf_counter()
                t_ours.append(t1 - t0)
                t_ref.append(t2 - t1)
            agree = sum(a == b for a, b in zip(ours_toks, ref_toks))
            half = n_tokens // 2
            for impl, ts in (("ours", t_ours), ("rwkv-pip", t_ref)):
                row = {"kind": "generate", "impl": impl, "device": device, "dtype": name, "tokens": n_tokens,
                       "tokens_per_s_first_half": half / sum(ts[:half]),
                       "tokens_per_s_second_half": (n_tokens - half) / sum(ts[half:]),
                       "greedy_tokens_equal": agree}
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
            write()
        except Exception as e:  # noqa: BLE001
            results["rows"].append({"kind": "generate", "device": device, "dtype": name, "error": str(e)[:500]})
            traceback.print_exc()


def bench_step_overhead(results: dict, write, device: str, tmpdir: Path, tokens: int = 200, rounds: int = 3):
    """Per-token latency of RNN decoding where FLOPs are negligible (12 layers, width 128, vocab 1024), so what
    is timed is the per-op overhead: `RWKV7.step` (what `stream` runs per token), the T = 1 `forward` loop and
    the rwkv package's TorchScript forward, taking turns round by round on the same checkpoint."""
    from trainer.models import load_official
    from trainer.models.rwkv7 import RWKV7Config

    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(n_layer=12, n_embd=128, vocab_size=1024))
    perturb_(model, 1e-2)
    path = tmpdir / "tiny.pth"
    model.save_official(path)
    RWKV = rwkv_package_model()

    ref = RWKV(model=str(path)[:-4], strategy=f"{device} fp32")
    ours = load_official(path, device=device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    weights = ours.step_weights()
    prompt = [1, 2, 3]
    with torch.no_grad():
        logits, state = ours(torch.tensor([prompt], device=device))
        s_state, f_state, f_logits = state, state, logits[0, -1]
        s_tok = torch.argmax(logits[0, -1]).view(1)
    r_logits, r_state = ref.forward(prompt, None)

    def run_step(n):
        nonlocal s_state, s_tok
        for _ in range(n):
            lg, s_state = ours.step(s_tok, s_state, weights)
            s_tok = torch.argmax(lg, dim=-1)

    def run_forward(n):
        nonlocal f_state, f_logits
        for _ in range(n):
            lg, f_state = ours(torch.argmax(f_logits).view(1, 1), f_state)
            f_logits = lg[0, -1]

    def run_ref(n):
        nonlocal r_logits, r_state
        for _ in range(n):
            r_logits, r_state = ref.forward([int(torch.argmax(r_logits))], r_state)

    times = {"ours-step": [], "ours-forward-T1": [], "rwkv-pip": []}
    with torch.no_grad():
        for fn in (run_step, run_forward, run_ref):
            fn(20)  # warm-up (TorchScript profiles its first calls)
        for _ in range(rounds):
            for name, fn in zip(times, (run_step, run_forward, run_ref)):
                sync()
                t = time.perf_counter()
                fn(tokens)
                sync()
                times[name].append((time.perf_counter() - t) / tokens * 1e3)
    best = {k: min(v) for k, v in times.items()}
    row = {"kind": "step_overhead", "device": device, "model": "L12-D128-V1024 fp32", "tokens": tokens,
           "ms_per_token_rounds": times, "ms_per_token_best": best,
           "step_vs_rwkv_pip": best["ours-step"] / best["rwkv-pip"],
           "forward_T1_vs_rwkv_pip": best["ours-forward-T1"] / best["rwkv-pip"]}
    results["rows"].append(row)
    write()
    print(json.dumps(row), flush=True)


def table(rows: list[dict]) -> str:
    out = []
    train = [r for r in rows if r["kind"] == "train"]
    if train:
        out.append(f"{'size':6} {'batch':>5} {'impl':13} {'tokens/s':>10} {'MFU':>6} {'step s':>7} {'peak GB':>8} "
                   f"{'vs fla':>7}")
        for r in train:
            if "error" in r:
                out.append(f"{r['preset']:6} {r['batch']:>5} {r['impl']:13} ERROR {r['error'][:80]}")
                continue
            fla = next((x for x in train if x["preset"] == r["preset"] and x["impl"] == "fla" and "error" not in x), None)
            ratio = f"{r['tokens_per_s'] / fla['tokens_per_s']:.2f}x" if fla else "-"
            out.append(f"{r['preset']:6} {r['batch']:>5} {r['impl']:13} {r['tokens_per_s']:>10.0f} {r['mfu']:>6.1%} "
                       f"{r['step_s']:>7.3f} {r['peak_mem_gb']:>8.1f} {ratio:>7}")
    gen = [r for r in rows if r["kind"] == "generate" and "error" not in r]
    if gen:
        out.append(f"{'generate':9} {'device':6} {'dtype':5} {'tok/s (1st half)':>17} {'tok/s (2nd half)':>17} "
                   f"{'same greedy tokens':>18}")
        for r in gen:
            out.append(f"{r['impl']:9} {r['device']:6} {r['dtype']:5} {r['tokens_per_s_first_half']:>17.1f} "
                       f"{r['tokens_per_s_second_half']:>17.1f} {r['greedy_tokens_equal']:>12}/{r['tokens']}")
    for r in (r for r in rows if r["kind"] == "step_overhead"):
        b = r["ms_per_token_best"]
        out.append(f"per-token overhead ({r['model']}, {r['device']}): step {b['ours-step']:.2f} ms, forward T=1 "
                   f"{b['ours-forward-T1']:.2f} ms, rwkv package {b['rwkv-pip']:.2f} ms; step / rwkv package "
                   f"{r['step_vs_rwkv_pip']:.2f}, forward / rwkv package {r['forward_T1_vs_rwkv_pip']:.2f}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plan", default="0.1b:8:ours-compile,gen,1.5b:4:ours-compile,0.1b:8:fla,1.5b:4:fla,"
                   "0.1b:8:ours-eager,1.5b:4:ours-eager",
                   help="comma list in priority order: preset:batch:impl (impl: fla, ours-eager, ours-compile), gen or "
                        "step-overhead")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new item after this many seconds")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--out", default="bench/out/model.json")
    a = p.parse_args()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"device": a.device, "torch": torch.__version__, "host": platform.node(), "rows": [],
               "gpu": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor(),
               "settings": vars(a)}
    if a.device == "cuda":
        try:
            import fla

            results["fla"] = getattr(fla, "__version__", "?")
        except ImportError:
            results["fla"] = None

    def write():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out)

    write()
    t0 = time.perf_counter()
    for item in a.plan.split(","):
        if time.perf_counter() - t0 > a.budget_s:
            results.setdefault("skipped", []).append(item)
            continue
        if item == "gen":
            with tempfile.TemporaryDirectory() as tmp:
                bench_generate(results, write, a.device, a.gen_tokens, Path(tmp))
        elif item == "step-overhead":
            with tempfile.TemporaryDirectory() as tmp:
                bench_step_overhead(results, write, a.device, Path(tmp))
        elif a.device == "cuda":
            preset, batch, impl = item.split(":")
            bench_train_one(results, write, preset, int(batch), impl, a.ctx, a.warmup, a.steps)
    write()
    print(table(results["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
