"""Train an RWKV model on the pipeline's shards with Lightning Fabric.

    python trainer/fit.py --config trainer/configs/debug.yaml --data data/sample --run-dir runs/debug
    fabric run --devices 2 --strategy ddp trainer/fit.py --config trainer/configs/0.1b.yaml --data D --run-dir R
    ... --max-steps N --resume --set optim.lr_init=1e-3 --set data.micro_batch_size=4

Everything that could stop a run (config keys, index, shard checksums and schemas) is checked before
the model is built. Per optimizer step: the micro-batches of this rank run through `InfctxLM`
(segments of ctx_len with carried state), gradients are accumulated (no DDP sync until the last
micro-batch), clipped, and AdamW steps with the cosine schedule (RWKV-LM's optimizer groups: lr_scale
per group). Outputs in RUN/: metrics.csv (one row per step), tb/ (TensorBoard), checkpoints/,
config.yaml, loss.png; a generated sample is printed at the end.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import pickle
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python trainer/fit.py`, `fabric run trainer/fit.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import yaml

from trainer import checkpoint as ckpt
from trainer.config import ConfigError, TrainConfig, load_config, resolve_model_config
from trainer.data import DataError, Layout, ShardCorpus, make_train_loader, train_batches, val_batches
from trainer.infctx import InfctxLM

DEFER_METRICS: bool | None = None  # read step k's metrics after step k + 1 is queued; None: on CUDA only
METRICS = ["step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "val_loss"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr_init/100, then cosine
    from lr_init to lr_final over lr_decay_steps (default max_steps), constant lr_final after."""
    o = cfg.optim
    total = o.lr_decay_steps or cfg.train.max_steps
    if step < o.warmup_steps:
        return o.lr_init * (0.01 + 0.99 * step / o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.lr_final + 0.5 * (o.lr_init - o.lr_final) * (1 + math.cos(math.pi * progress))


def train_step(fabric, model, optimizer, micro_batches, lr: float, accumulate: int, grad_clip: float):
    """One optimizer step over `accumulate` micro-batches ([B, D + 1] token tensors): backward on each
    (gradient sync only on the last), clip, AdamW with lr × each group's lr_scale. Returns (mean loss
    over ranks and micro-batches, gradient norm before clipping), as tensors (no host sync here)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    acc = torch.zeros((), device=fabric.device, dtype=torch.float64)
    for micro, batch in enumerate(micro_batches):
        with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
            loss = model(fabric.to_device(batch))
            fabric.backward(loss / accumulate)
        acc += loss.detach().double()
    # clipping at +inf still returns the norm, so metrics.csv has it with clipping off too; the non-finite
    # check is the caller's (on the logged norm), since raising here would make every step wait for the GPU
    grad_norm = fabric.clip_gradients(model, optimizer, max_norm=grad_clip if grad_clip > 0 else float("inf"),
                                      error_if_nonfinite=False)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return fabric.all_reduce(acc / accumulate, reduce_op="mean"), grad_norm


def check_resumable(saved: dict, cfg: TrainConfig, where: Path, saved_corpus: str | None = None,
                    corpus: str | None = None) -> None:
    """The loader position counts samples of one seeded order: a resume that changes what sample i is
    (settings, or the corpus: its fingerprint, a sha256 of the shard list with each shard's sha256 and of the
    component weights) would repeat or skip data, so it is refused."""
    now = cfg.to_dict()
    keys = [("train", "seed"), ("data", "data_ctx_len"), ("data", "mixture"), ("data", "val_fraction")]
    changed = [f"{a}.{b}: {saved[a][b]!r} -> {now[a][b]!r}" for a, b in keys if saved[a][b] != now[a][b]]
    if saved_corpus is not None and corpus is not None and saved_corpus != corpus:
        changed.append(f"the corpus (fingerprint of its shards and component weights {saved_corpus[:12]}… -> "
                       f"{corpus[:12]}…)")
    if changed:
        raise ConfigError(f"--resume from {where}: these differ from the checkpoint's and would change the "
                          f"data order: {'; '.join(changed)}")


def _flat_settings(d: dict, prefix: str = ""):
    """(dotted key, value) of a config dict, as --set names them (model overrides read as model.n_layer etc.)."""
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flat_settings(v, prefix if k == "overrides" else f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def changed_settings(saved: dict, now: dict) -> list[str]:
    """`key: saved -> now` for each setting two config dicts disagree on."""
    saved, now = dict(_flat_settings(saved)), dict(_flat_settings(now))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def _changed_model_settings(resume_pt: Path, cfg: TrainConfig) -> list[str]:
    """`model.key: saved -> now` for each model setting a failed resume's checkpoint disagrees on ([] if the
    file cannot be read either: then it is the damaged one)."""
    try:
        saved = torch.load(resume_pt, map_location="cpu", weights_only=True, mmap=True)["config"]["model"]
    except Exception:  # noqa: BLE001 - any failure here leaves the generic message
        return []
    return changed_settings({"model": saved}, {"model": cfg.to_dict()["model"]})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML preset (trainer/configs/*.yaml)")
    p.add_argument("--data", default="data/sample",
                   help="pipeline output folder holding index.json (default: data/sample, what `make corpus` builds)")
    p.add_argument("--run-dir", default=None,
                   help="where metrics, logs and checkpoints go (default: runs/<config name>)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this optimizer step (default train.max_steps, which the schedule follows)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr_init=1e-3 (repeatable)")
    return p.parse_args(argv)


def build_fabric(cfg: TrainConfig, run_dir: Path, purge_step: int | None = None):
    import lightning as L
    from lightning.fabric.loggers import TensorBoardLogger

    precision = cfg.train.precision
    if precision == "auto":
        if os.environ.get("LT_PRECISION"):          # set by `fabric run --precision`
            precision = None
        else:
            precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    # purge_step: on resume, TensorBoard drops the abandoned run's events past the checkpoint (as metrics.csv);
    # checkpoint files are written straight into the checkpoint's temporary folder (ckpt.DirectCheckpointIO)
    loggers = ([TensorBoardLogger(root_dir=str(run_dir), name="tb", version="", purge_step=purge_step)]
               if cfg.train.tensorboard else [])
    try:
        fabric = L.Fabric(precision=precision, loggers=loggers)
    except ValueError as e:   # e.g. `fabric run --precision X` against an explicit train.precision
        raise ConfigError(f"Lightning Fabric refused the settings: {e}") from None
    ckpt.use_direct_io(fabric)
    return fabric


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _complete_row(r: dict) -> bool:
    """A row a crash did not tear: an integer step and a float loss (a torn last line has neither)."""
    try:
        int(r["step"]), float(r["loss"]), int(r["tokens"])
        return True
    except (TypeError, ValueError, KeyError):
        return False


def write_metrics_upto(path: Path, step: int) -> None:
    """On resume: keep only complete rows of steps already covered by the checkpoint (atomic rewrite)."""
    rows = [r for r in read_metrics(path) if _complete_row(r) and int(r["step"]) <= step]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot_loss(run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir / "metrics.csv") if _complete_row(r)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([int(r["tokens"]) for r in rows], [float(r["loss"]) for r in rows], label="train")
    val = [(int(r["tokens"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    tmp = run_dir / "loss.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


@torch.no_grad()
def evaluate(fabric, model, batches) -> float:
    """Mean loss over every rank's validation windows (all windows have the same length, so the mean of
    per-window means). batches: (micro-batch, windows that count) from `val_batches`, as many on every
    rank (each forward is a collective under DDP/FSDP); padding batches count 0."""
    model.eval()
    acc = torch.zeros(2, device=fabric.device, dtype=torch.float64)  # [sum of window losses, windows]
    for b, n in batches:
        acc += torch.stack([model(fabric.to_device(b)).double() * n, acc.new_tensor(n)])
    model.train()
    acc = fabric.all_reduce(acc, reduce_op="sum")
    return float(acc[0] / acc[1])


def check_sample_prompt(cfg: TrainConfig, vocab_size: int) -> None:
    """Before training: the prompt of the sample printed at the end must encode to ids the model has (a model
    smaller than the World vocabulary failed with an IndexError after the last checkpoint)."""
    if cfg.sample.tokens <= 0:
        return
    from tokenizer import WorldTokenizer

    ids = WorldTokenizer().encode(cfg.sample.prompt)
    if ids and max(ids) >= vocab_size:
        raise ConfigError(f"sample.prompt {cfg.sample.prompt!r} encodes to token id {max(ids)}, not below the model's "
                          f"vocab_size {vocab_size}: choose another prompt, or sample.tokens=0")


def generate_sample(lm, cfg: TrainConfig) -> str | None:
    if cfg.sample.tokens <= 0:
        return None
    from tokenizer import WorldTokenizer
    from trainer.generate import NonFiniteLogits, stream

    tok = WorldTokenizer()
    ids = tok.encode(cfg.sample.prompt)
    was_training = lm.training
    lm.eval()
    try:
        out = [t for t, _ in stream(lm, ids, cfg.sample.tokens, temperature=cfg.sample.temperature, top_p=0.85,
                                    seed=cfg.train.seed, stop_token=None, n_ids=tok.n_entries + 1)]
    except NonFiniteLogits:   # a diverged run: its checkpoints are written, say so rather than end in a traceback
        return "(no sample: the model's logits are not finite; the training diverged)"
    finally:
        lm.train(was_training)
    return cfg.sample.prompt + tok.decode(out)


def fit(cfg: TrainConfig, data_dir: Path, run_dir: Path, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train up to optimizer step `stop_at` (default train.max_steps); returns a summary dict (final step,
    losses, run paths). The schedule follows train.max_steps whatever `stop_at` is, so a run stopped early
    and resumed repeats the uninterrupted one."""
    last = cfg.train.max_steps if stop_at is None else stop_at
    from tqdm import tqdm

    model_cfg = resolve_model_config(cfg.model)
    check_sample_prompt(cfg, model_cfg.vocab_size)
    # checksums are read once per machine (local rank 0); every rank checks schemas and counts. A failed check
    # ends rank 0 before any collective; under `fabric run`, torchrun then stops the other ranks (tested)
    verify = cfg.data.verify_checksums and os.environ.get("LOCAL_RANK", "0") == "0"
    corpus = ShardCorpus(data_dir, cfg.data.data_ctx_len, cfg.data.val_fraction, cfg.data.mixture, verify)
    if corpus.vocab_size > model_cfg.vocab_size:
        raise DataError(f"{data_dir}/index.json: vocab_size {corpus.vocab_size} exceeds the model's "
                        f"{model_cfg.vocab_size}")
    # what latest() gives once rank 0's remove_stale has renamed back a complete checkpoint a kill left unrenamed
    start = ckpt.latest_step_at_start(run_dir)
    if resume and start is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir}/checkpoints")
    if not resume and start is not None:  # pruning would keep the old run's newer steps
        raise FileExistsError(f"{run_dir} already holds checkpoints of a run: pass --resume or use a new --run-dir")

    # purge_step: a fresh run drops every earlier event in tb/ (a run that died before its first checkpoint)
    fabric = build_fabric(cfg, run_dir, start + 1 if resume else 0)
    if os.environ.get("LT_CLI_USED") != "1":  # `fabric run` has already started the processes
        fabric.launch()
    fabric.seed_everything(cfg.train.seed)
    rank0 = fabric.global_rank == 0
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for p in ckpt.remove_stale(run_dir):
            fabric.print(f"removed {p} (left by a save that did not finish)")

    from trainer.models.rwkv7 import RWKV7

    # initialised on the CPU under the seed, then moved by fabric.setup: the same weights on any
    # device and under any strategy (a GPU's RNG stream would give a different init than the CPU's)
    lm = RWKV7(model_cfg)
    if cfg.train.compile:
        from trainer.models.rwkv7 import apply_compile

        apply_compile(lm)
    model = InfctxLM(lm, cfg.data.ctx_len, cfg.train.bptt_truncate, cfg.train.recompute_segments)
    o = cfg.optim
    groups = lm.optimizer_groups(o.weight_decay)
    for g in groups:
        g.pop("names")
    fused = fabric.device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=o.lr_init, betas=o.betas, eps=o.eps, fused=fused)
    model, optimizer = fabric.setup(model, optimizer)

    layout = Layout(cfg.data.micro_batch_size, fabric.world_size, fabric.global_rank, o.accumulate_grad_batches)
    step, samples = 0, 0
    metrics_path = run_dir / "metrics.csv"
    if resume:
        where = ckpt.latest(run_dir)
        state = {"model": model, "optimizer": optimizer}
        try:
            rest = fabric.load(where / "resume.pt", state)
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
            changed = _changed_model_settings(where / "resume.pt", cfg)
            if changed:
                raise ConfigError(f"--resume from {where}: the model settings differ from the checkpoint's "
                                  f"({'; '.join(changed)}): resume with the checkpoint's, or start a new "
                                  f"--run-dir") from None
            raise ConfigError(f"--resume: cannot load {where / 'resume.pt'}: {str(e).splitlines()[0][:300]}. The "
                              f"model settings or optim.weight_decay (zero vs non-zero: other optimizer groups) may "
                              f"differ from the checkpoint's, or the file is damaged (remove {where} to resume "
                              f"from the previous checkpoint)") from None
        step, samples = int(rest["step"]), int(rest["samples"])
        if "corpus_order_sha256" in rest:
            check_resumable(rest["config"], cfg, where, rest["corpus_order_sha256"], corpus.order_fingerprint)
        else:   # a checkpoint of the earlier code: its fingerprint covers the whole component table
            check_resumable(rest["config"], cfg, where, rest.get("corpus_sha256"), corpus.fingerprint)
        for g in optimizer.param_groups:   # the checkpoint restored its own; config.yaml says these
            g["betas"], g["eps"] = tuple(o.betas), o.eps
            if g["weight_decay"] > 0:
                g["weight_decay"] = o.weight_decay
        ckpt.set_rng_states(rest["rng"])
        fabric.print(f"resuming from {where} (step {step}, {samples} samples consumed)")
        changed = changed_settings(rest["config"], cfg.to_dict())
        if changed:   # allowed (they keep the data order), but not silently: e.g. max_steps reshapes the cosine
            fabric.print(f"settings changed since that checkpoint, used from step {step + 1}: {'; '.join(changed)}")
        if rank0:
            write_metrics_upto(metrics_path, step)
    elif rank0 and metrics_path.exists():
        metrics_path.unlink()
    if rank0:
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        os.replace(tmp, run_dir / "config.yaml")

    loader = make_train_loader(corpus, cfg.train.seed, layout, samples, cfg.data.num_workers)
    val = val_batches(corpus, layout, cfg.data.val_windows)
    n_val = len(corpus.val_windows(cfg.data.val_windows))  # the same on every rank
    if cfg.data.val_windows and not n_val:
        fabric.print("no validation windows in this corpus (data.val_fraction): validation is skipped")
    tokens_per_step = layout.global_batch * cfg.data.data_ctx_len
    n_params = sum(p.numel() for p in lm.parameters())
    fabric.print(f"model {cfg.model.arch}/{cfg.model.preset}: {n_params / 1e6:.2f}M parameters, "
                 f"L{model_cfg.n_layer}-D{model_cfg.n_embd}; corpus {data_dir}: "
                 f"{', '.join(f'{c}={corpus.components[c].n_train}' for c in corpus.train_components)} "
                 f"train windows; {n_val} val windows; "
                 f"{tokens_per_step} tokens/step; precision {getattr(fabric.strategy.precision, 'precision', '?')}; "
                 f"{fabric.world_size} process(es) on {fabric.device.type}")

    def save_checkpoint(at_step: int, at_samples: int):
        state = {"model": model, "optimizer": optimizer, "step": at_step, "samples": at_samples,
                 "rng": ckpt.rng_states(), "config": cfg.to_dict(), "corpus_sha256": corpus.fingerprint,
                 "corpus_order_sha256": corpus.order_fingerprint}
        return ckpt.save(fabric, run_dir, at_step, state, model, lm, cfg.train.keep_checkpoints)

    f = None
    writer = None
    if rank0:
        new = not metrics_path.exists()
        f = open(metrics_path, "a", newline="")
        writer = csv.DictWriter(f, fieldnames=METRICS)
        if new:
            writer.writeheader()
    losses = []
    it = train_batches(loader)
    bar = tqdm(total=last, initial=step, disable=not rank0, dynamic_ncols=True, desc="train")
    model.train()
    # On the GPU, step k's numbers are read (a host sync) only once step k + 1 is queued, so the GPU never
    # waits on the host; on the CPU a step is done when train_step returns, so it is read at once.
    defer = fabric.device.type == "cuda" if DEFER_METRICS is None else DEFER_METRICS
    pending = None
    t_last = time.perf_counter()  # when the last read step finished (validation and checkpoints excluded)

    def finish(p: dict) -> dict:
        """Wait for step p, check its loss and norm are finite, and return its metrics row."""
        nonlocal t_last
        loss_val, grad_norm = float(p["loss"]), float(p["norm"])
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
            last = ckpt.latest(run_dir)
            raise FloatingPointError(f"step {p['step']}: loss {loss_val}, gradient norm {grad_norm}; stopping "
                                     f"({f'newest checkpoint: {last}' if last else 'no checkpoint written yet'})")
        now = time.perf_counter()
        row = {"step": p["step"], "loss": f"{loss_val:.6f}", "lr": f"{p['lr']:.6g}", "tokens": p["tokens"],
               "tokens_per_s": f"{tokens_per_step / (now - t_last):.1f}", "grad_norm": f"{grad_norm:.4f}",
               "val_loss": ""}
        t_last = now
        losses.append(loss_val)
        return row

    def write(row: dict):
        fabric.log_dict({k: float(v) for k, v in row.items() if v != "" and k != "step"}, step=row["step"])
        if rank0:
            writer.writerow(row)
            f.flush()
        if row["step"] % max(1, cfg.train.log_every) == 0 or row["step"] == last:
            bar.set_postfix(loss=f"{float(row['loss']):.3f}", lr=f"{float(row['lr']):.2e}", tok_s=row["tokens_per_s"])
        bar.update(1)

    try:
        while step < last:
            lr = lr_at(step, cfg)
            loss_t, norm_t = train_step(fabric, model, optimizer, (next(it) for _ in range(o.accumulate_grad_batches)),
                                        lr, o.accumulate_grad_batches, o.grad_clip)
            step += 1
            samples += layout.global_batch
            if pending is not None:
                write(finish(pending))
            pending = {"step": step, "lr": lr, "loss": loss_t, "norm": norm_t, "tokens": samples * cfg.data.data_ctx_len}
            final = step == last
            validate = n_val > 0 and ((cfg.train.val_every and step % cfg.train.val_every == 0) or final)
            save = (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or final
            if defer and not (validate or save):
                continue
            row, pending = finish(pending), None  # this step's row before its checkpoint
            if validate:
                row["val_loss"] = f"{evaluate(fabric, model, [b for b in val]):.6f}"
            write(row)
            if save:
                save_checkpoint(step, samples)
            if validate or save:
                t_last = time.perf_counter()  # validation and checkpoint time is not training throughput
    finally:
        bar.close()
        if f is not None:
            f.close()
    for lg in fabric.loggers:
        lg.finalize("success")
    summary = {"step": step, "losses": losses, "run_dir": str(run_dir), "checkpoint": str(ckpt.latest(run_dir))}
    if rank0:
        png = plot_loss(run_dir)
        summary["loss_png"] = str(png) if png else None
        from lightning.fabric.strategies import FSDPStrategy

        text = None if isinstance(fabric.strategy, FSDPStrategy) else generate_sample(lm, cfg)
        if text is not None:
            fabric.print("--- sample " + "-" * 60)
            fabric.print(text)
            fabric.print("-" * 71)
        summary["sample"] = text
    fabric.print(f"done: step {step}; metrics {metrics_path}; checkpoint {summary['checkpoint']}")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.max_steps is not None and args.max_steps < 1:
            raise ConfigError(f"--max-steps must be at least 1, got {args.max_steps}")
        resolve_model_config(cfg.model)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
        fit(cfg, Path(args.data), run_dir, resume=args.resume, stop_at=args.max_steps)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
