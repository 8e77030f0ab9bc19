"""Official RWKV-7 checkpoints in and out: RWKV-LM's key names and shapes, as .pth or .safetensors.

`.pth` files are read with `torch.load(weights_only=True)` (no pickled code runs); LoRA widths, layer
count, width, head size and vocab come from the tensors themselves, since released checkpoints differ
(0.1B: 64/64/32/128, 1.5B: 96/96/64/256). A file that is not an RWKV-7 state dict, or has missing,
extra or misshaped tensors, raises one `CheckpointError` that lists everything wrong. Layer 0's v-LoRA
(`blocks.0.att.v0/v1/v2`) is unused by the model (layer 0 sets v_first = v) and may be absent, as in files
from tools that drop tensors without gradients; a `{"state_dict": ...}` or `{"model": ...}` wrapper and the
`module.` / `_orig_mod.` prefixes of DDP and torch.compile are taken off.
Writes are atomic: a temporary file in the same folder, then `os.replace`.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from .rwkv7 import RWKV7, RWKV7Config


class CheckpointError(ValueError):
    """The file is not a usable RWKV-7 checkpoint; the message lists what is wrong."""


def official_shapes(cfg: RWKV7Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of an RWKV-LM x070 state dict, by key, with its shape."""
    C, V, H, N = cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.head_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        if i == 0:
            shapes |= {b + "ln0.weight": (C,), b + "ln0.bias": (C,)}
        for ln in ("ln1", "ln2"):
            shapes |= {b + ln + ".weight": (C,), b + ln + ".bias": (C,)}
        a = b + "att."
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            shapes[a + name] = (1, 1, C)
        for name, d in (("w", cfg.dim_w), ("a", cfg.dim_a), ("v", cfg.dim_v), ("g", cfg.dim_g)):
            shapes[a + name + "1"] = (C, d)
            shapes[a + name + "2"] = (d, C)
        shapes[a + "r_k"] = (H, N)
        for lin in ("receptance", "key", "value", "output"):
            shapes[a + lin + ".weight"] = (C, C)
        shapes |= {a + "ln_x.weight": (C,), a + "ln_x.bias": (C,)}
        f = b + "ffn."
        shapes |= {f + "x_k": (1, 1, C), f + "key.weight": (cfg.dim_ffn, C), f + "value.weight": (C, cfg.dim_ffn)}
    shapes |= {"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    return shapes


UNUSED_IN_LAYER_0 = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
"""Tensors of the official layout that layer 0 never reads; filled with zeros when a file lacks them."""


def _unwrap(sd):
    """A training script's {"state_dict": sd} / {"model": sd} wrapper and DDP / torch.compile key prefixes."""
    if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = [sd[k] for k in ("state_dict", "model") if isinstance(sd.get(k), dict)]
        if len(inner) == 1:
            sd = inner[0]
    if isinstance(sd, dict) and sd and all(isinstance(k, str) for k in sd):
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


STEP_FOLDER = re.compile(r"^step-(\d+)$")
"""A run's checkpoint folder name (the trainer writes step-%08d, by atomic rename of a temporary folder)."""
MODEL_FILES = ("model.pth", "model.safetensors")


def _model_file(folder: Path) -> Path | None:
    """The weights file in a checkpoint folder, or None."""
    return next((folder / n for n in MODEL_FILES if (folder / n).is_file()), None)


def newest_checkpoint(root: Path) -> Path | None:
    """The step-N folder under `root` (a run's checkpoints/ folder) with the highest N that holds a model
    file; None when there is none. The same rule as `trainer.checkpoint.latest`, which is not imported
    here (it loads Lightning) and which also asks for resume.pt, which loading weights does not need."""
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_FOLDER.match(p.name)) and p.is_dir() and _model_file(p) is not None]
    return max(found)[1] if found else None


def _resolve_folder(path: Path) -> Path:
    """A checkpoint folder -> its model file; a run folder (runs/NAME) or its checkpoints/ folder -> the
    model file of the newest checkpoint in it (`newest_checkpoint`)."""
    if (f := _model_file(path)) is not None:
        return f
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = [p for p in root.iterdir() if STEP_FOLDER.match(p.name) and p.is_dir()]
    if root is path and not steps:
        raise CheckpointError(f"{path}: a folder without model.pth or model.safetensors (give a checkpoint "
                              f"folder such as runs/NAME/checkpoints/step-N, a run folder runs/NAME, or the file)")
    newest = newest_checkpoint(root)
    if newest is None:
        raise CheckpointError(f"{path}: a run folder without a complete checkpoint: no step-N folder in {root} "
                              f"holds model.pth or model.safetensors ({len(steps)} step folder(s) found)")
    return _model_file(newest)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The file a checkpoint argument names: a checkpoint folder (runs/NAME/checkpoints/step-N) stands for
    the model.pth in it; a run folder (runs/NAME) or its checkpoints/ folder for the newest complete
    checkpoint's (the highest step-N holding model.pth); a name without suffix for NAME.pth when only that
    exists (as the `rwkv` package takes it). Anything else is returned as given."""
    path = Path(path)
    if not path.exists() and path.suffix != ".pth" and path.with_name(path.name + ".pth").is_file():
        path = path.with_name(path.name + ".pth")
    return _resolve_folder(path) if path.is_dir() else path


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .pth (weights_only) or .safetensors file into a dict of CPU tensors; folders and suffix-less
    names as `resolve_checkpoint` takes them (a run folder: its newest complete checkpoint)."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:   # mmap takes only the zip format: retry the legacy format (or get the real error)
                if "mmap" not in str(e):
                    raise
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear error naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read as a {path.suffix or 'torch'} state dict: {first}") from e
    sd = _unwrap(sd)
    if (not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd)
            or not all(isinstance(v, torch.Tensor) for v in sd.values())):
        top = ", ".join(repr(k) for k in list(sd)[:8]) if isinstance(sd, dict) else type(sd).__name__
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors); found: {top}")
    return sd


def config_from_state_dict(sd: dict[str, torch.Tensor], where: str = "state dict") -> RWKV7Config:
    """Infer the RWKV7Config (layers, width, vocab, head size, LoRA and FFN widths) from tensor shapes."""
    # dim_v from layer 1's v-LoRA, else layer 0's unused one; a 1-layer file without it (the `rwkv` package
    # loads it) gets the derived width for the zeros filled in; with more layers check_state_dict names the gap
    v1 = next((k for k in ("blocks.1.att.v1", "blocks.0.att.v1") if k in sd), None)
    need = ["emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1", *([v1] if v1 else []),
            "blocks.0.att.g1", "blocks.0.ffn.key.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        hint = " (an RWKV-6 or older checkpoint?)" if any(".time_" in k for k in sd) else ""
        raise CheckpointError(f"{where}: not an RWKV-7 checkpoint{hint}: missing {', '.join(missing)}")
    bad = [f"{k} {tuple(sd[k].shape)} (expected 2-D)" for k in need if sd[k].dim() != 2]
    if bad:
        raise CheckpointError(f"{where}: not an RWKV-7 checkpoint: wrong shape: {', '.join(bad)}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    V, C = sd["emb.weight"].shape
    H, N = sd["blocks.0.att.r_k"].shape
    if H * N != C:
        raise CheckpointError(f"{where}: blocks.0.att.r_k is {H}x{N} (heads x head size) but emb.weight is "
                              f"{V}x{C}: heads x head size must equal the width")
    try:   # a zero-sized tensor gives a zero width: one CheckpointError, as for any other bad shape
        return RWKV7Config(n_layer=max(layers) + 1, n_embd=C, vocab_size=V, head_size=N,
                           dim_w=sd["blocks.0.att.w1"].shape[1], dim_a=sd["blocks.0.att.a1"].shape[1],
                           dim_v=None if v1 is None else sd[v1].shape[1], dim_g=sd["blocks.0.att.g1"].shape[1],
                           dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0])
    except ValueError as e:
        raise CheckpointError(f"{where}: not a usable RWKV-7 checkpoint: {e}") from None


def check_state_dict(sd: dict[str, torch.Tensor], cfg: RWKV7Config, where: str = "state dict") -> None:
    """Raise one CheckpointError listing every missing, extra and misshaped tensor."""
    want = official_shapes(cfg)
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    bad = sorted(f"{k} {tuple(sd[k].shape)} (expected {want[k]})"
                 for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    if missing or extra or bad:
        lines = [f"{where}: does not match an RWKV-7 L{cfg.n_layer}-D{cfg.n_embd} checkpoint"]
        for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", bad)):
            if items:
                lines.append(f"  {label} ({len(items)}): " + ", ".join(items))
        raise CheckpointError("\n".join(lines))


def load_official(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device=None) -> RWKV7:
    """Build an RWKV7 from an official RWKV-LM checkpoint (.pth or .safetensors). The module is built on the
    meta device and takes the file's tensors converted once to `dtype`: peak memory about one model in
    `dtype` (building it in float32 first took 3.3x a bf16 model's size). Its parameters require grad (for
    fine-tuning): decode under `torch.no_grad()`, or the carried state keeps every token's graph alive."""
    path = resolve_checkpoint(path)  # errors below name the file a folder stood for
    sd = load_state_dict(path)
    cfg = config_from_state_dict(sd, str(path))
    shapes = official_shapes(cfg)
    sd = {**{k: torch.zeros(shapes[k]) for k in UNUSED_IN_LAYER_0 if k in shapes and k not in sd}, **sd}
    check_state_dict(sd, cfg, str(path))
    with torch.device("meta"):
        model = RWKV7(cfg, init=False)
    # contiguous: a file written from transposed views (conversion scripts) keeps their strides through
    # torch.load, and the parameters kept them too (fine-tuning starts here: DDP's gradient buckets are contiguous)
    model.load_state_dict({k: v.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
                           for k, v in sd.items()}, assign=True)
    return model.to(device=device)


def save_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write contiguous CPU tensors to .pth (torch.save) or .safetensors: a temp file, fsynced, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, tmp)
        else:
            torch.save(sd, tmp)
        os.chmod(tmp, 0o644)  # readable like the run's other files (mkstemp makes 0600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
