"""Typed configuration of a training run: one dataclass per component, YAML presets, dotted overrides.

A preset (trainer/configs/<name>.yaml) is a nested mapping whose sections mirror `TrainConfig`:
`model` (an architecture preset name plus overrides of its config fields), `data`, `optim`, `train`,
`sample`. Every key is checked against the dataclass fields: an unknown key is an error that names the
file (or the `--set` flag) and the key, raised before anything is built. The code is the schema
(litgpt's `Config` habit): each field's docstring is the comment beside it.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type, inconsistent values."""


@dataclass
class ModelSection:
    arch: str = "rwkv7"                 # model family; trainer/models/<arch>.py
    preset: str = "debug"               # key of trainer.models.rwkv7.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # fields of RWKV7Config replacing the preset's


@dataclass
class DataSection:
    data_ctx_len: int = 512             # tokens per sample (a multiple of ctx_len); windows are data_ctx_len + 1
    ctx_len: int = 512                  # infctx segment length: the model sees ctx_len tokens at a time
    micro_batch_size: int = 8           # samples per rank per forward/backward
    mixture: dict[str, float] = field(default_factory=dict)  # component -> weight (times seen); overrides index.json
    val_fraction: float = 0.01          # share of each component's windows held out for validation
    val_windows: int = 32               # held-out windows per validation pass, split across ranks (0: none)
    num_workers: int = 0                # torch DataLoader workers per rank (0: in the training process)
    verify_checksums: bool = False      # sha256 and the largest token id of every shard before training (reads
    #                                     the whole corpus at every start); sizes, counts and offsets are always
    #                                     checked, and every window read checks its token ids

    def __post_init__(self):
        if self.ctx_len <= 0 or self.data_ctx_len <= 0 or self.data_ctx_len % self.ctx_len:
            raise ConfigError(f"data.data_ctx_len ({self.data_ctx_len}) must be a positive multiple of "
                              f"data.ctx_len ({self.ctx_len})")
        if self.micro_batch_size <= 0:
            raise ConfigError("data.micro_batch_size must be positive")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("data.val_fraction must be in [0, 1)")
        if self.val_windows < 0 or self.num_workers < 0:
            raise ConfigError("data.val_windows and data.num_workers must not be negative")


@dataclass
class OptimSection:
    lr_init: float = 6e-4               # peak learning rate, reached after warmup
    lr_final: float = 6e-5              # learning rate at the end of the cosine
    warmup_steps: int = 10              # linear warmup from lr_init/100 to lr_init
    lr_decay_steps: int = 0             # cosine length in optimizer steps; 0 means train.max_steps
    weight_decay: float = 0.1           # on >= 2-D .weight matrices only (the model's optimizer groups)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-18
    grad_clip: float = 1.0              # max global gradient norm (0: off)
    accumulate_grad_batches: int = 1    # micro-batches per optimizer step per rank

    def __post_init__(self):
        if self.accumulate_grad_batches < 1:
            raise ConfigError("optim.accumulate_grad_batches must be at least 1")
        if self.warmup_steps < 0 or self.lr_decay_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, optim.lr_decay_steps and optim.grad_clip must not be negative")
        if not (math.isfinite(self.lr_init) and self.lr_init > 0):
            raise ConfigError(f"optim.lr_init must be a finite number > 0, got {self.lr_init}")
        if not (math.isfinite(self.lr_final) and 0 <= self.lr_final):
            raise ConfigError(f"optim.lr_final must be a finite number >= 0, got {self.lr_final} "
                              f"(a negative rate would ascend the loss)")
        if not all(0 <= b < 1 for b in self.betas) or not self.eps >= 0 or not self.weight_decay >= 0:
            raise ConfigError(f"optim.betas must be in [0, 1) and optim.eps, optim.weight_decay >= 0, got betas "
                              f"{list(self.betas)}, eps {self.eps}, weight_decay {self.weight_decay}")


PRECISIONS = ("auto", "32-true", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "transformer-engine",
              "transformer-engine-float16", "64", "32", "16", "bf16")  # "auto" and Lightning Fabric's names and aliases


@dataclass
class TrainSection:
    max_steps: int = 100                # optimizer steps the run plans (the cosine's length; --max-steps only stops)
    seed: int = 42                      # model init, data order, everything
    precision: str | int = "auto"       # Fabric precision (or 16, 32, 64); auto = bf16-mixed on GPU, 32-true on CPU
    bptt_truncate: bool = False         # detach the carried state between segments instead of full BPTT
    recompute_segments: bool = True     # recompute each segment in backward when a sample has > 1 segment
    log_every: int = 1                  # progress-bar refresh (metrics.csv gets every step)
    val_every: int = 50                 # optimizer steps between validation passes (0: only at the end)
    ckpt_every: int = 50                # optimizer steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2           # newest N checkpoints kept
    tensorboard: bool = True            # TensorBoard logs under RUN/tb through Fabric's logger
    compile: bool = False               # torch.compile each block (trainer.models.rwkv7.apply_compile)

    def __post_init__(self):
        if self.max_steps < 1 or self.keep_checkpoints < 1 or self.val_every < 0 or self.ckpt_every < 0:
            raise ConfigError("train.max_steps and train.keep_checkpoints must be at least 1, "
                              "train.val_every and ckpt_every must not be negative")
        if not 0 <= self.seed < 2**32:   # numpy's seed range; checked before the corpus is opened
            raise ConfigError(f"train.seed must be in [0, 2**32), got {self.seed}")
        if isinstance(self.precision, int) and not isinstance(self.precision, bool):
            self.precision = str(self.precision)   # YAML `precision: 32` (Lightning takes 32, 16, 64 too)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")


@dataclass
class SampleSection:
    prompt: str = "\n"                  # prompt for the generated sample printed at the end
    tokens: int = 48                    # tokens to generate (0: no sample)
    temperature: float = 0.0            # 0 = greedy

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0) or self.tokens < 0:
            raise ConfigError(f"sample.temperature must be a finite number >= 0 and sample.tokens >= 0, got "
                              f"{self.temperature} and {self.tokens}")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert: int -> float, list -> tuple) a YAML value against a field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _section_from_dict(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _model_section(raw: dict, where: str) -> ModelSection:
    """`model:` holds arch, preset, and any other key is an override of the architecture's config."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    raw = dict(raw)
    overrides = raw.pop("overrides", {}) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}.overrides: expected a mapping of RWKV7Config fields, got {overrides!r}")
    overrides = dict(overrides)
    sec = ModelSection(arch=_coerce(raw.pop("arch", "rwkv7"), str, f"{where}.arch"),
                       preset=_coerce(raw.pop("preset", "debug"), str, f"{where}.preset"))
    overrides.update(raw)
    sec.overrides = overrides
    return sec


def from_dict(raw: dict, where: str = "<config>") -> TrainConfig:
    """Build a TrainConfig from a nested mapping; every key is validated (model overrides later, in
    `resolve_model_config`, against the architecture's own dataclass)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping")
    sections = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    kwargs = {}
    for key, value in raw.items():
        if key not in sections:
            raise ConfigError(f"{where}: unknown section {key!r} (known: {', '.join(sections)})")
        if key == "model":
            kwargs[key] = _model_section(value or {}, f"{where}: model")
        else:
            cls = typing.get_type_hints(TrainConfig)[key]
            kwargs[key] = _section_from_dict(cls, value or {}, f"{where}: {key}")
    return TrainConfig(**kwargs)


def apply_overrides(raw: dict, sets: list[str]) -> dict:
    """Apply `--set a.b=value` overrides (value parsed as YAML) to the raw nested mapping."""
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"--set {item!r}: key must be section.field (e.g. train.max_steps)")
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:   # absent, or an empty YAML section (`train:` alone reads as None)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {str(e).splitlines()[0]} "
                              f"(quote it: --set '{key}=\"...\"')") from None
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently: a
    second `train:` section replaced the first one's settings with the defaults)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *anchor`, resolved by the parent class
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:   # an unhashable key: the parent class reports it
                continue
            if duplicate:
                raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: key {key!r} given twice (first at "
                                  f"line {seen[key]}); YAML would keep only the last")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None, sets: list[str] | None = None) -> TrainConfig:
    """Read a YAML preset, apply dotted overrides, validate every key."""
    raw: dict = {}
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:   # a folder, an unreadable or a binary file
            raise ConfigError(f"config file {path}: cannot be read as UTF-8 YAML: {e}") from None
        where = str(path)
    raw = apply_overrides(raw, list(sets or []))
    return from_dict(raw, where)


def resolve_model_config(sec: ModelSection):
    """Architecture config: the named preset with `overrides` replaced; unknown fields are errors."""
    if sec.arch != "rwkv7":
        raise ConfigError(f"model.arch: unknown architecture {sec.arch!r} (known: rwkv7)")
    from trainer.models.rwkv7 import PRESETS

    if sec.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {sec.preset!r} (known: {', '.join(PRESETS)})")
    base = PRESETS[sec.preset]
    names = {f.name for f in dataclasses.fields(base)}
    for k in sec.overrides:
        if k not in names:
            raise ConfigError(f"model: unknown key {k!r} (RWKV7Config fields: {', '.join(sorted(names))})")
    hints = typing.get_type_hints(type(base))
    ov = {k: _coerce(v, hints[k], f"model.{k}") for k, v in sec.overrides.items()}
    for k, v in ov.items():   # sizes: 0 divided by zero in the model's config, negatives failed in torch
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ConfigError(f"model.{k} must be at least 1, got {v}")
    if "n_embd" in ov:  # LoRA and FFN widths follow the new width unless given explicitly
        ov = {**{d: None for d in ("dim_w", "dim_a", "dim_v", "dim_g", "dim_ffn")}, **ov}
    try:
        return dataclasses.replace(base, **ov)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
