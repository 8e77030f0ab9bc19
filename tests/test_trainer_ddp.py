"""`fabric run` with 2 CPU processes (DDP over gloo) and the same global batch gives the same losses
as one process: the loader splits the batch across ranks, gradients are averaged, losses all-reduced."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.testing import random_docs, write_corpus

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.n_layer=2", "model.n_embd=64", "data.data_ctx_len=32", "data.ctx_len=16", "data.val_windows=2", "data.val_fraction=0.1",
        "optim.warmup_steps=2", "train.ckpt_every=0", "train.val_every=2", "train.tensorboard=false", "sample.tokens=0"]


def _losses(run):
    with open(run / "metrics.csv", newline="") as f:
        return [(float(r["loss"]), r["val_loss"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    data = write_corpus(tmp_path / "data", random_docs(60, ["a", "b"], seed=3, max_len=120, vocab=500))
    fabric = str(Path(sys.executable).parent / "fabric")
    common = ["--config", "trainer/configs/debug.yaml", "--data", str(data), "--max-steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "trainer/fit.py", *common, "--run-dir", str(tmp_path / "one"),
           *sum((["--set", s] for s in TINY + ["data.micro_batch_size=4"]), [])]
    two = [fabric, "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--precision", "32-true",
           "trainer/fit.py", *common, "--run-dir", str(tmp_path / "two"),
           *sum((["--set", s] for s in TINY + ["data.micro_batch_size=2"]), [])]
    for cmd in (one, two):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    for (la, va), (lb, vb) in zip(a, b):
        assert abs(la - lb) <= 1e-5 * abs(la)
        assert bool(va) == bool(vb) and (not va or abs(float(va) - float(vb)) <= 1e-5 * float(va))


def test_corrupt_shard_stops_every_process(tmp_path):
    """Only local rank 0 reads the checksums; under `fabric run` its error must end the whole job (torchrun
    stops the other ranks) with the file named, not leave rank 1 waiting in a collective."""
    data = write_corpus(tmp_path / "data", random_docs(40, ["a"], seed=5, max_len=80, vocab=500))
    shard = sorted((data / "shards").iterdir())[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    fabric = str(Path(sys.executable).parent / "fabric")
    cmd = [fabric, "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "trainer/fit.py",
           "--config", "trainer/configs/debug.yaml", "--data", str(data), "--run-dir", str(tmp_path / "run"),
           "--max-steps", "2", *sum((["--set", s] for s in TINY), [])]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode != 0
    assert f"{shard}" in r.stderr and "sha256" in r.stderr and "does not match the index" in r.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_validation_with_an_empty_rank_share(tmp_path):
    """One validation window and two ranks: rank 1's share is empty, yet it must run as many forwards as rank 0
    (each is a collective under DDP) or validation hangs; the run finishes with rank 0's window's loss."""
    data = write_corpus(tmp_path / "data", random_docs(60, ["a", "b"], seed=3, max_len=120, vocab=500))
    fabric = str(Path(sys.executable).parent / "fabric")
    sets = TINY + ["data.micro_batch_size=1", "data.val_windows=1", "train.val_every=2"]
    cmd = [fabric, "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--precision", "32-true",
           "trainer/fit.py", "--config", "trainer/configs/debug.yaml", "--data", str(data), "--max-steps", "2",
           "--run-dir", str(tmp_path / "run"), *sum((["--set", s] for s in sets), [])]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _losses(tmp_path / "run")
    assert len(rows) == 2 and rows[1][1] and float(rows[1][1]) > 0
