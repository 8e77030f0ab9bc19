"""Run checkpoints: official weights plus an exact-resume file, written atomically, newest N kept.

Layout: RUN/checkpoints/step-00000120/ with
  model.pth  - the official RWKV-LM state dict (loadable by the `rwkv` package and `load_official`)
  resume.pt  - Fabric state: the wrapped model (full precision), optimizer, step, samples consumed,
               RNG states (python, numpy, torch, cuda), config
Each checkpoint is written into `.tmp-step-...` and renamed into place, so a folder named `step-*`
is always complete; `latest()` picks the highest step among those holding both files. The files are
written straight into that folder (`DirectCheckpointIO`: Lightning's default serialises each file into
memory, then writes it to the system temp folder and moves it). Folders a killed save left behind
(`.tmp-step-*`, `.old-step-*`) are removed by `remove_stale()` when a run starts.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

STEP_DIR = re.compile(r"^step-(\d{8})$")
FILES = ("model.pth", "resume.pt")


STALE_DIR = re.compile(r"^\.(tmp|old)-step-\d{8}$")


class DirectCheckpointIO(TorchCheckpointIO):
    """Fabric's checkpoint IO for resume.pt: torch.save straight to the path, inside the checkpoint's
    temporary folder, whose rename is what makes a checkpoint appear (loading is TorchCheckpointIO's)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError("DirectCheckpointIO takes no storage_options")
        torch.save(checkpoint, path)


def use_direct_io(fabric) -> None:
    """Give the strategy DirectCheckpointIO where it takes a CheckpointIO (single device, DDP); FSDP and
    model-parallel strategies refuse the interface and already torch.save their files directly."""
    from lightning.fabric.strategies import FSDPStrategy, ModelParallelStrategy

    if not isinstance(fabric.strategy, (FSDPStrategy, ModelParallelStrategy)):
        fabric.strategy.checkpoint_io = DirectCheckpointIO()


def _restorable(run_dir: Path) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """(every stale folder, [(stale folder, step-N it is renamed back to)]): a complete .tmp-step-N or
    .old-step-N whose step-N is missing goes back in place, the .tmp one (newer) first. A save killed after
    its files were written but before its rename, or while replacing step-N (between its two renames),
    leaves such a folder."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(p for p in root.iterdir() if STALE_DIR.match(p.name)) if root.is_dir() else []
    plan, taken = [], set()
    for p in sorted(stale, key=lambda p: not p.name.startswith(".tmp-")):   # .tmp (newer) before .old
        final = p.with_name(p.name.split("-", 1)[1])
        if final.name not in taken and not final.exists() and all((p / f).exists() for f in FILES):
            plan.append((p, final))
            taken.add(final.name)
    return stale, plan


def remove_stale(run_dir: Path) -> list[Path]:
    """Remove the temporary and replaced checkpoint folders a killed save left (rank 0, at start-up), after
    renaming the complete ones back (`_restorable`); returns the removed ones."""
    stale, plan = _restorable(run_dir)
    for p, final in plan:
        os.replace(p, final)
    stale = [p for p in stale if p.exists()]
    for p in stale:
        shutil.rmtree(p)
    return stale


def latest_step_at_start(run_dir: Path) -> int | None:
    """The step `latest()` will give once `remove_stale` has run (on every rank, before rank 0 runs it: a
    complete checkpoint a killed save left unrenamed counts), or None if there is none."""
    steps = [s for s, _ in complete_checkpoints(run_dir)]
    steps += [int(STEP_DIR.match(final.name).group(1)) for _, final in _restorable(run_dir)[1]]
    return max(steps, default=None)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and all((p / f).exists() for f in FILES):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest(run_dir: Path) -> Path | None:
    ck = complete_checkpoints(run_dir)
    return ck[-1][1] if ck else None


def rng_states() -> dict:
    """Every RNG's state as tensors and plain values (loadable with weights_only=True)."""
    npst = np.random.get_state(legacy=False)
    npst["state"]["key"] = torch.from_numpy(npst["state"]["key"].astype(np.int64))
    st = {"python": random.getstate(), "numpy": npst, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_states(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = dict(st["numpy"])
    npst["state"] = dict(npst["state"], key=npst["state"]["key"].numpy().astype(np.uint32))
    np.random.set_state(npst)
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():  # as many GPUs as both machines have
        for i, state in enumerate(st["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)


def official_state_dict(fabric, model, lm) -> dict:
    """The language model's full state dict (official keys) on rank 0. Under FSDP the shards are
    gathered (a collective: every rank calls this); otherwise the local module holds everything."""
    from lightning.fabric.strategies import FSDPStrategy

    if isinstance(fabric.strategy, FSDPStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model._forward_module,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("lm."): v for k, v in sd.items()}
    return lm.state_dict()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file below `folder`, then the folders themselves."""
    for p in sorted(folder.rglob("*"), reverse=True):
        _fsync_path(p)
    _fsync_path(folder)


def save(fabric, run_dir: Path, step: int, state: dict, model, lm, keep: int) -> Path:
    """Write checkpoint `step` on every rank (Fabric decides who writes what), then rank 0 exports
    the official weights, renames the folder into place and prunes old ones."""
    from trainer.models.checkpoint import save_state_dict

    final = step_dir(run_dir, step)
    tmp = final.with_name(".tmp-" + final.name)
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    fabric.barrier()
    fabric.save(tmp / "resume.pt", state)
    sd = official_state_dict(fabric, model, lm)
    fabric.barrier()
    if fabric.global_rank == 0:
        save_state_dict(sd, tmp / "model.pth")
        _fsync_tree(tmp)  # the files are on disk before the rename makes the checkpoint "complete"
        if final.exists():
            trash = final.with_name(".old-" + final.name)
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
        _fsync_path(final.parent)
        for _, old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            trash = old.with_name(".old-" + old.name)   # renamed first: a kill mid-delete leaves no torn step-*
            os.replace(old, trash)
            shutil.rmtree(trash)
    fabric.barrier()
    return final
