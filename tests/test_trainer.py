"""The trainer: presets, config errors, the schedule, a CPU run's outputs, and exact resume."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, load_config, resolve_model_config
from trainer.fit import fit, lr_at, main
from trainer.testing import random_docs, write_corpus

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "trainer" / "configs").glob("*.yaml"))

TINY = ["model.n_layer=2", "model.n_embd=64", "data.data_ctx_len=32", "data.ctx_len=16",
        "data.micro_batch_size=2", "data.val_windows=2", "data.val_fraction=0.05",
        "optim.lr_init=3e-3", "optim.lr_final=3e-4", "optim.warmup_steps=2", "optim.lr_decay_steps=6",
        "train.val_every=2", "train.ckpt_every=2", "train.keep_checkpoints=2", "train.tensorboard=true",
        "sample.tokens=0"]


def test_presets_exist_and_load():
    names = {p.stem for p in CONFIGS}
    assert {"debug", "0.1b", "0.4b", "1.5b"} <= names
    for p in CONFIGS:
        cfg = load_config(p)
        mc = resolve_model_config(cfg.model)
        assert cfg.data.data_ctx_len % cfg.data.ctx_len == 0
        assert mc.vocab_size == 65536
    assert resolve_model_config(load_config(ROOT / "trainer/configs/1.5b.yaml").model).n_embd == 2048


def test_config_errors_name_the_key(tmp_path):
    debug = ROOT / "trainer/configs/debug.yaml"
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_config(debug, ["train.bogus=1"])
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_config(debug, ["trian.max_steps=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(debug, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="multiple of"):
        load_config(debug, ["data.ctx_len=100"])
    with pytest.raises(ConfigError, match="unknown key 'n_embed'"):
        resolve_model_config(load_config(debug, ["model.n_embed=64"]).model)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optim: unknown key 'lr'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="overrides: expected a mapping"):
        load_config(debug, ["model.overrides=5"])
    with pytest.raises(ConfigError, match="train.precision: 'bf17'"):
        load_config(debug, ["train.precision=bf17"])
    with pytest.raises(ConfigError, match="val_windows and data.num_workers"):
        load_config(debug, ["data.val_windows=-1"])
    with pytest.raises(ConfigError, match="n_layer must be at least 1"):
        resolve_model_config(load_config(debug, ["model.n_layer=0"]).model)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  max_steps: [1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)
    cfg = load_config(debug, ["model.n_embd=256", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.betas == (0.9, 0.95)
    assert resolve_model_config(cfg.model).dim_ffn == 1024  # derived widths follow the override


def test_cosine_schedule_with_warmup():
    cfg = load_config(ROOT / "trainer/configs/debug.yaml", ["optim.warmup_steps=10", "train.max_steps=110",
                                                             "optim.lr_init=1e-3", "optim.lr_final=1e-4"])
    lrs = [lr_at(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))
    assert lrs[60] == pytest.approx(5.5e-4) and lrs[110] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = random_docs(60, ["a", "b"], seed=3, max_len=120, vocab=500)
    return write_corpus(tmp_path_factory.mktemp("corpus") / "data", docs, docs_per_shard=25)


def _rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_cpu_run_outputs_and_exact_resume(corpus, tmp_path):
    debug = ROOT / "trainer/configs/debug.yaml"
    full = tmp_path / "full"
    fit(load_config(debug, TINY + ["train.max_steps=6"]), corpus, full)
    rows = _rows(full)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True, False, True]
    assert int(rows[-1]["tokens"]) == 6 * 2 * 32
    assert all(float(r["grad_norm"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    assert (full / "loss.png").stat().st_size > 0
    assert any((full / "tb").rglob("events.out.tfevents.*"))
    kept = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert kept == ["step-00000004", "step-00000006"]  # newest 2, no temporary folders left
    from trainer.models import load_official

    lm = load_official(full / "checkpoints/step-00000006/model.pth")
    sd = torch.load(full / "checkpoints/step-00000006/resume.pt", weights_only=True)["model"]
    for k, v in lm.state_dict().items():
        assert torch.equal(v, sd["lm." + k]), k
    # the `rwkv` package (the inference oracle) loads the trained weights and agrees with our model
    os.environ["RWKV_V7_ON"] = "1"
    from rwkv.model import RWKV

    oracle = RWKV(model=str(full / "checkpoints/step-00000006/model"), strategy="cpu fp32")
    ref, _ = oracle.forward([5, 17, 300], None)
    with torch.no_grad():
        ours, _ = lm.eval()(torch.tensor([[5, 17, 300]]))
    assert torch.allclose(ours[0, -1], ref, atol=1e-4, rtol=1e-4)

    part = tmp_path / "part"
    fit(load_config(debug, TINY + ["train.max_steps=3"]), corpus, part)
    # a crash after step 3 was logged but before its checkpoint: resume goes back to step 2
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    import shutil

    shutil.rmtree(part / "checkpoints" / "step-00000003")
    (part / "checkpoints" / ".tmp-step-00000004").mkdir()  # an incomplete write is ignored
    fit(load_config(debug, TINY + ["train.max_steps=6"]), corpus, part, resume=True)
    got = _rows(part)
    assert [int(r["step"]) for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows, got):
        assert (a["loss"], a["lr"], a["grad_norm"], a["val_loss"]) == (b["loss"], b["lr"], b["grad_norm"], b["val_loss"])
    # a fresh run into a folder with checkpoints is refused (pruning would keep the old run's newer steps)
    with pytest.raises(FileExistsError, match="--resume"):
        fit(load_config(debug, TINY + ["train.max_steps=2"]), corpus, part)
    # a resume that would change what sample i is (seed, window length, mixture, val split) is refused
    with pytest.raises(ConfigError, match="train.seed"):
        fit(load_config(debug, TINY + ["train.max_steps=8", "train.seed=7"]), corpus, part, resume=True)


def test_bad_input_fails_before_training(corpus, tmp_path, capsys):
    debug = str(ROOT / "trainer/configs/debug.yaml")
    run = tmp_path / "run"
    assert main(["--config", debug, "--data", str(corpus), "--run-dir", str(run), "--set", "optim.bogus=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err
    assert main(["--config", debug, "--data", str(corpus), "--run-dir", str(run), "--max-steps", "0"]) == 2
    assert "--max-steps must be at least 1" in capsys.readouterr().err
    import shutil

    bad = Path(shutil.copytree(corpus, tmp_path / "bad"))
    with open(bad / "shards" / "00001.arrow", "r+b") as f:
        f.seek(300)
        f.write(b"\x00garbage")
    assert main(["--config", debug, "--data", str(bad), "--run-dir", str(run)] + [f"--set={s}" for s in TINY]) == 2
    err = capsys.readouterr().err
    assert "00001.arrow" in err and "sha256" in err
    assert not run.exists()
    assert main(["--config", debug, "--data", str(corpus), "--run-dir", str(run), "--resume"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_runs_as_a_script(tmp_path):
    """`python trainer/fit.py` from the repo root (as `make train` runs it) resolves its imports."""
    r = subprocess.run([sys.executable, "trainer/fit.py", "--config", "trainer/configs/debug.yaml", "--data",
                        str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "r")],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert r.returncode == 2 and "index not found" in r.stderr, r.stderr


def test_gradient_accumulation_matches_a_bigger_micro_batch(corpus, tmp_path):
    """2 micro-batches of 2 accumulated == 1 micro-batch of 4 (same samples, same global batch)."""
    debug = ROOT / "trainer/configs/debug.yaml"
    base = TINY + ["train.max_steps=3", "train.ckpt_every=0", "train.val_every=0", "train.tensorboard=false"]
    fit(load_config(debug, base + ["data.micro_batch_size=4"]), corpus, tmp_path / "big")
    fit(load_config(debug, base + ["data.micro_batch_size=2", "optim.accumulate_grad_batches=2"]), corpus,
        tmp_path / "acc")
    a, b = _rows(tmp_path / "big"), _rows(tmp_path / "acc")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(float(x["loss"]) - float(y["loss"])) <= 1e-5 * float(x["loss"])
        assert abs(float(x["grad_norm"]) - float(y["grad_norm"])) <= 1e-4 * float(x["grad_norm"])


def test_non_finite_loss_stops_the_run(corpus, tmp_path, capsys):
    """A diverged run (here: a learning rate of 1e30) stops with the step named, not silently logging NaN."""
    run = tmp_path / "run"
    sets = [s for s in TINY if not s.startswith("optim.lr_")] + ["optim.lr_init=1e30", "optim.lr_final=1e30",
                                                                 "optim.warmup_steps=0", "train.ckpt_every=0"]
    rc = main(["--config", str(ROOT / "trainer/configs/debug.yaml"), "--data", str(corpus), "--run-dir", str(run),
               "--max-steps", "6"] + [f"--set={s}" for s in sets])
    err = capsys.readouterr().err
    assert rc == 2 and "error: step " in err and ("nan" in err or "inf" in err)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) < 6 and all(float(r["loss"]) == float(r["loss"]) for r in rows)


def test_deferred_metrics_match_immediate(corpus, tmp_path, monkeypatch):
    """On the GPU a step's metrics are read after the next step is queued; forced on here, every row
    (and the checkpoints) must match reading each step at once."""
    import trainer.fit

    sets = TINY + ["train.max_steps=7", "train.ckpt_every=3", "train.tensorboard=false"]
    runs = {}
    for defer in (False, True):
        monkeypatch.setattr(trainer.fit, "DEFER_METRICS", defer)
        run = tmp_path / f"defer{int(defer)}"
        fit(load_config(ROOT / "trainer/configs/debug.yaml", sets), corpus, run)
        runs[defer] = run
    a, b = _rows(runs[False]), _rows(runs[True])
    assert [int(r["step"]) for r in b] == list(range(1, 8))
    keys = ("step", "loss", "lr", "tokens", "grad_norm", "val_loss")
    assert [tuple(r[k] for k in keys) for r in a] == [tuple(r[k] for k in keys) for r in b]
    assert sorted(p.name for p in (runs[True] / "checkpoints").iterdir()) == ["step-00000006", "step-00000007"]


def test_resume_keeps_the_schedule_and_checks_the_corpus(corpus, tmp_path):
    """Stopping with --max-steps 3 and resuming with --max-steps 6 repeats the uninterrupted run (the cosine
    follows train.max_steps, not the stop); resuming on another corpus, or with other weights, is refused."""
    debug = ROOT / "trainer/configs/debug.yaml"
    sets = [s for s in TINY if not s.startswith("optim.lr_decay_steps")] + ["train.ckpt_every=1", "train.max_steps=6",
                                                                            "train.tensorboard=false"]
    data = ["--data", str(corpus), "--config", str(debug)] + [f"--set={s}" for s in sets]
    assert main(data + ["--run-dir", str(tmp_path / "full")]) == 0
    assert main(data + ["--run-dir", str(tmp_path / "part"), "--max-steps", "3"]) == 0
    assert main(data + ["--run-dir", str(tmp_path / "part"), "--max-steps", "6", "--resume"]) == 0
    keys = ("step", "loss", "lr", "grad_norm")  # (the stopped run also validates at its last step)
    assert [tuple(r[k] for k in keys) for r in _rows(tmp_path / "full")] == \
           [tuple(r[k] for k in keys) for r in _rows(tmp_path / "part")]
    other = write_corpus(tmp_path / "other", random_docs(60, ["a", "b"], seed=4, max_len=120, vocab=500))
    with pytest.raises(ConfigError, match="the corpus"):
        fit(load_config(debug, sets), other, tmp_path / "part", resume=True, stop_at=8)
    # a rebuild with the same shards and weights but other component metadata (stage counts) keeps the data
    # order: it used to be refused too (the fingerprint hashed the whole component table); a weight is not
    import json
    import shutil

    same = Path(shutil.copytree(corpus, tmp_path / "same"))
    index = json.loads((same / "index.json").read_text())
    index["components"]["a"]["stages"] = {"filter": {"in": 40, "out": 30}}
    (same / "index.json").write_text(json.dumps(index))
    fit(load_config(debug, sets), same, tmp_path / "part", resume=True, stop_at=7)
    index["components"]["a"]["weight"] = 2.0
    (same / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="the corpus"):
        fit(load_config(debug, sets), same, tmp_path / "part", resume=True, stop_at=8)


def test_config_value_checks():
    """Values the optimizer, schedule or sampler cannot use are config errors naming the key (a negative
    lr_final used to train with a negative rate; sample.temperature < 0 crashed after the last checkpoint;
    train.max_steps 0 ran nothing; YAML `precision: 32` was refused though Lightning takes it)."""
    debug = ROOT / "trainer/configs/debug.yaml"
    for bad, key in [("optim.lr_final=-3e-3", "lr_final"), ("optim.lr_init=0", "lr_init"),
                     ("optim.lr_init=.nan", "lr_init"), ("optim.betas=[1.5, 0.9]", "betas"),
                     ("optim.eps=-1", "eps"), ("optim.weight_decay=-0.1", "weight_decay"),
                     ("train.max_steps=0", "max_steps"), ("sample.temperature=-1", "sample.temperature"),
                     ("sample.temperature=.nan", "sample.temperature")]:
        with pytest.raises(ConfigError, match=key):
            load_config(debug, [bad])
    assert load_config(debug, ["train.precision=32"]).train.precision == "32"


def test_resume_uses_the_config_optimizer_settings_and_names_a_damaged_file(corpus, tmp_path, capsys):
    """A resume used to keep the checkpoint's betas/eps/weight_decay while config.yaml showed the new ones;
    TensorBoard kept the abandoned steps beside the resumed ones; a damaged resume.pt gave a bare zip error.
    Settings a resume may change (they keep the data order) used to change silently: they are listed."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    debug = ROOT / "trainer/configs/debug.yaml"
    run = tmp_path / "run"
    fit(load_config(debug, TINY + ["train.max_steps=3", "train.ckpt_every=1"]), corpus, run)
    shutil.rmtree(run / "checkpoints" / "step-00000003")          # crashed after logging step 3
    fit(load_config(debug, TINY + ["train.max_steps=4", "train.ckpt_every=1", "optim.eps=1e-6",
                                   "optim.betas=[0.8, 0.95]", "optim.weight_decay=0.3"]), corpus, run, resume=True)
    out = capsys.readouterr().out
    assert ("settings changed since that checkpoint, used from step 3: optim.betas: (0.9, 0.99) -> (0.8, 0.95); "
            "optim.eps: 1e-18 -> 1e-06; optim.weight_decay: 0.01 -> 0.3; train.max_steps: 3 -> 4") in out, out
    groups = torch.load(run / "checkpoints/step-00000004/resume.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {(g["eps"], tuple(g["betas"])) for g in groups} == {(1e-6, (0.8, 0.95))}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.3}
    ea = EventAccumulator(str(run / "tb")).Reload()
    steps = [e.step for e in ea.Scalars("lr")]
    assert sorted(steps) == [1, 2, 3, 4], steps                    # step 3 once, from the resumed run
    with pytest.raises(ConfigError, match=r"model\.n_layer: 2 -> 3"):   # used to be torch's state_dict dump
        fit(load_config(debug, TINY + ["model.n_layer=3", "train.max_steps=5"]), corpus, run, resume=True)
    resume_pt = run / "checkpoints/step-00000004/resume.pt"
    resume_pt.write_bytes(resume_pt.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="step-00000004/resume.pt"):
        fit(load_config(debug, TINY + ["train.max_steps=5", "train.ckpt_every=1"]), corpus, run, resume=True)


def test_data_and_run_dir_default_as_design_writes_the_command(corpus, tmp_path, monkeypatch):
    """DESIGN.md's `python trainer/fit.py --config trainer/configs/<name>.yaml` used to fail (--data and
    --run-dir were required): they default to data/sample and runs/<config name>."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(corpus, tmp_path / "data" / "sample")
    cfg = tmp_path / "tiny.yaml"
    shutil.copy(ROOT / "trainer/configs/debug.yaml", cfg)
    assert main(["--config", str(cfg)] + [f"--set={s}" for s in TINY + ["train.max_steps=1", "train.tensorboard=false"]]) == 0
    assert (tmp_path / "runs" / "tiny" / "metrics.csv").exists()


def test_checkpoint_and_log_hygiene(corpus, tmp_path, monkeypatch):
    """Review findings: resume.pt went through Lightning's _atomic_save (a full copy in memory, then a file in
    the system temp folder, orphaned by a kill); folders a killed save left stayed forever; a fresh run into a
    folder whose earlier run died before its first checkpoint kept that run's TensorBoard events; a torn
    metrics.csv row crashed the end of a resumed run; a resume.pt that fails safe unpickling gave a traceback."""
    from lightning.fabric.utilities import cloud_io
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def no_atomic_save(*a, **k):
        raise AssertionError("resume.pt went through _atomic_save")
    monkeypatch.setattr(cloud_io, "_atomic_save", no_atomic_save)
    import lightning.fabric.plugins.io.torch_io as torch_io
    monkeypatch.setattr(torch_io, "_atomic_save", no_atomic_save)

    debug = ROOT / "trainer/configs/debug.yaml"
    run = tmp_path / "run"
    fit(load_config(debug, TINY + ["train.max_steps=3", "train.ckpt_every=100"]), corpus, run)
    import shutil

    shutil.rmtree(run / "checkpoints")                 # as if it died before its first checkpoint
    fit(load_config(debug, TINY + ["train.max_steps=2", "train.ckpt_every=1"]), corpus, run)
    ea = EventAccumulator(str(run / "tb")).Reload()
    assert sorted(e.step for e in ea.Scalars("lr")) == [1, 2]   # the dead run's step 3 is purged

    for stale in (".tmp-step-00000003", ".old-step-00000001"):
        (run / "checkpoints" / stale).mkdir()
        (run / "checkpoints" / stale / "resume.pt").write_bytes(b"partial")
    with open(run / "metrics.csv", "a") as f:
        f.write("1")                  # a torn last row (ENOSPC / power loss): the start of step 1x's row
    fit(load_config(debug, TINY + ["train.max_steps=3", "train.ckpt_every=1"]), corpus, run, resume=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert [int(r["step"]) for r in _rows(run)] == [1, 2, 3]

    resume_pt = run / "checkpoints/step-00000003/resume.pt"
    import fractions

    torch.save({"step": 3, "when": fractions.Fraction(1, 3)}, resume_pt)   # not loadable with weights_only
    with pytest.raises(ConfigError, match="cannot load .*step-00000003/resume.pt"):
        fit(load_config(debug, TINY + ["train.max_steps=4"]), corpus, run, resume=True)


def test_duplicate_yaml_keys_and_seed_range_are_config_errors(tmp_path):
    """A second `train:` section silently replaced the first (last one wins); a seed outside numpy's range
    failed with a bare ValueError after the corpus was read."""
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  max_steps: 3\n  val_every: 25\ndata:\n  ctx_len: 64\ntrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:6: key 'train' given twice \(first at line 1\)"):
        load_config(p)
    p.write_text("train:\n  max_steps: 3\n  max_steps: 4\n")
    with pytest.raises(ConfigError, match="dup.yaml:3: key 'max_steps'"):
        load_config(p)
    debug = ROOT / "trainer/configs/debug.yaml"
    for seed in ("-1", "4294967296"):
        with pytest.raises(ConfigError, match=r"train.seed must be in \[0, 2\*\*32\)"):
            load_config(debug, [f"train.seed={seed}"])


def test_direct_checkpoint_io_is_given_only_where_the_strategy_takes_it():
    """Passing DirectCheckpointIO as a Fabric plugin would make FSDP (GPU runs) raise NotImplementedError at
    start-up: FSDP refuses the CheckpointIO interface. It is set on single-device/DDP strategies only."""
    from types import SimpleNamespace

    from lightning.fabric.strategies import FSDPStrategy

    from trainer import checkpoint as ckpt

    fsdp = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(NotImplementedError):
        fsdp.strategy.checkpoint_io = ckpt.DirectCheckpointIO()
    ckpt.use_direct_io(fsdp)                          # leaves FSDP alone
    import lightning as L
    single = L.Fabric(accelerator="cpu", devices=1)
    ckpt.use_direct_io(single)
    assert isinstance(single.strategy.checkpoint_io, ckpt.DirectCheckpointIO)


def test_yaml_merge_keys_tiny_temperature_and_an_interrupted_replace(tmp_path):
    """Second-look review: the duplicate-key loader refused YAML merge keys (`<<: *base`) and crashed on an
    unhashable key; a temperature below float32's range gave NaN probabilities; remove_stale deleted both
    halves of a checkpoint whose replacement was killed between its two renames."""
    p = tmp_path / "merge.yaml"
    p.write_text("train:\n  <<: {max_steps: 7, val_every: 5}\n  ckpt_every: 3\n")
    cfg = load_config(p)
    assert (cfg.train.max_steps, cfg.train.val_every, cfg.train.ckpt_every) == (7, 5, 3)
    p.write_text("train:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(ConfigError, match="merge.yaml"):
        load_config(p)

    from trainer.generate import sample_logits
    assert sample_logits(torch.tensor([1.0, 3.0, 2.0]), 1e-46, 0.9, torch.Generator().manual_seed(0)) == 1

    from trainer import checkpoint as ckpt
    root = tmp_path / "run" / "checkpoints"
    for name, tag in ((".tmp-step-00000005", b"new"), (".old-step-00000005", b"old")):
        (root / name).mkdir(parents=True)
        for f in ckpt.FILES:
            (root / name / f).write_bytes(tag)
    (root / ".tmp-step-00000006").mkdir()            # an unfinished save: removed
    ckpt.remove_stale(tmp_path / "run")
    assert sorted(q.name for q in root.iterdir()) == ["step-00000005"]
    assert (root / "step-00000005" / "model.pth").read_bytes() == b"new"


def test_cli_and_config_mistakes_are_one_error_line(tmp_path, capsys, monkeypatch):
    """Adversarial review: each of these ended in a traceback (IsADirectoryError, UnicodeDecodeError, yaml's
    ParserError, ZeroDivisionError in the model config, a negative-dimension RuntimeError in torch, Fabric's
    ValueError on a `fabric run --precision` that contradicts train.precision), and an empty YAML section
    (`train:` alone) made `--set train.max_steps=3` say that train is not a section."""
    debug = str(ROOT / "trainer/configs/debug.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00train")
    for config in (tmp_path, binary):
        with pytest.raises(ConfigError, match="cannot be read as UTF-8 YAML"):
            load_config(config)
    with pytest.raises(ConfigError, match=r"--set 'train.max_steps=\[1': the value is not valid YAML"):
        load_config(debug, ["train.max_steps=[1"])
    for bad in ("n_embd=0", "head_size=0", "dim_ffn=-1", "vocab_size=0"):
        with pytest.raises(ConfigError, match=f"model.{bad.split('=')[0]} must be at least 1"):
            resolve_model_config(load_config(debug, [f"model.{bad}"]).model)
    empty = tmp_path / "empty_sections.yaml"
    empty.write_text("train:\ndata:\n")
    assert load_config(empty, ["train.max_steps=3"]).train.max_steps == 3

    monkeypatch.setenv("LT_CLI_USED", "1")        # as `fabric run --precision bf16-mixed trainer/fit.py ...` sets
    monkeypatch.setenv("LT_PRECISION", "bf16-mixed")
    corpus = write_corpus(tmp_path / "data", random_docs(20, ["a"], seed=1, max_len=60, vocab=500))
    rc = main(["--config", debug, "--data", str(corpus), "--run-dir", str(tmp_path / "run"),
               "--set", "train.precision=32-true", "--set", "train.tensorboard=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: Lightning Fabric refused the settings" in err and "Traceback" not in err, err


def test_a_sample_prompt_past_a_small_vocabulary_is_refused_before_training(tmp_path, capsys):
    """Adversarial review: a model with fewer ids than the World tokenizer (here 512) trained to the end, wrote
    its last checkpoint, then failed with an IndexError traceback embedding the sample's prompt ("The" is id
    33,xxx). It is now a config error before anything runs."""
    corpus = write_corpus(tmp_path / "data", random_docs(20, ["a"], seed=1, max_len=60, vocab=500), vocab_size=512)
    args = ["--config", str(ROOT / "trainer/configs/debug.yaml"), "--data", str(corpus), "--run-dir",
            str(tmp_path / "run"), "--set", "model.vocab_size=512", "--set", "sample.prompt=The"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "sample.prompt 'The' encodes to token id" in err and "vocab_size 512" in err, err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_killed_before_its_rename_counts_from_the_start(corpus, tmp_path):
    """Adversarial review (a kill after the files of step-N were written, before the rename): remove_stale
    renames the complete .tmp-step-N back, but only after the start-up checks had looked, so `--resume` said
    "no complete checkpoint" (for a first checkpoint), a fresh run into the folder was allowed, and a resume
    purged TensorBoard from the previous checkpoint while training went on after step N (steps lost)."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    debug = ROOT / "trainer/configs/debug.yaml"
    sets = TINY + ["train.ckpt_every=1", "train.val_every=0"]
    run = tmp_path / "run"
    fit(load_config(debug, sets + ["train.max_steps=2"]), corpus, run)
    root = run / "checkpoints"
    shutil.rmtree(root / "step-00000001")
    os.replace(root / "step-00000002", root / ".tmp-step-00000002")   # written, not yet renamed
    with pytest.raises(FileExistsError, match="--resume"):
        fit(load_config(debug, sets + ["train.max_steps=3"]), corpus, run)
    fit(load_config(debug, sets + ["train.max_steps=3"]), corpus, run, resume=True)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
    assert [int(r["step"]) for r in _rows(run)] == [1, 2, 3]
    ea = EventAccumulator(str(run / "tb")).Reload()
    assert sorted(e.step for e in ea.Scalars("lr")) == [1, 2, 3]


def test_a_diverged_models_sample_is_a_message_not_a_traceback():
    """The sample at the end of a run whose weights went NaN says so (its checkpoints are already written);
    generate_sample used to end the run in a traceback from the sampler."""
    from trainer.fit import generate_sample
    from trainer.models.rwkv7 import RWKV7

    cfg = load_config(ROOT / "trainer/configs/debug.yaml", TINY + ["sample.tokens=3"])
    lm = RWKV7(resolve_model_config(cfg.model))
    text = generate_sample(lm, cfg)
    assert text.startswith(cfg.sample.prompt)
    with torch.no_grad():
        lm.head.weight.fill_(float("nan"))
    lm.train()
    assert "not finite" in generate_sample(lm, cfg)
    assert lm.training
