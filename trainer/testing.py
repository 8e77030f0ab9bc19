"""Test and benchmark helpers: small corpora in the pipeline's exact output format, and random model weights.

`write_corpus(out, docs)` produces `out/index.json` + `out/shards/NNNNN.arrow` as pipeline/build.py
does: Arrow IPC stream format (what `datasets` reads; `fmt="file"` for the IPC file format), uncompressed, columns id (string), component (dictionary<string>),
input_ids (list<uint16>), one document per row, and an index with schema_version 1, the tokenizer,
per-shard path/documents/tokens/bytes/sha256 and per-component weights and counts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from trainer.data import sha256_file

SCHEMA = pa.schema([("id", pa.string()), ("component", pa.dictionary(pa.int32(), pa.string())),
                    ("input_ids", pa.list_(pa.uint16()))])


def write_corpus(out: str | Path, docs: list[tuple[str, str, list[int] | np.ndarray]],
                 docs_per_shard: int = 100, weights: dict[str, float] | None = None,
                 rows_per_batch: int | None = None, vocab_size: int = 65536, fmt: str = "stream") -> Path:
    """docs: (id, component, token ids) in order. Returns the folder."""
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    shards, comps = [], {}
    for s in range(0, len(docs), docs_per_shard):
        part = docs[s:s + docs_per_shard]
        path = out / "shards" / f"{s // docs_per_shard:05d}.arrow"
        table = pa.table({
            "id": pa.array([d[0] for d in part], pa.string()),
            "component": pa.array([d[1] for d in part], pa.string()).dictionary_encode(),
            "input_ids": pa.array([np.asarray(d[2], dtype=np.uint16) for d in part], pa.list_(pa.uint16())),
        }).cast(SCHEMA)
        tmp = path.with_suffix(".tmp")
        new = ipc.new_stream if fmt == "stream" else ipc.new_file
        with pa.OSFile(str(tmp), "wb") as sink, new(sink, SCHEMA) as w:
            w.write_table(table, max_chunksize=rows_per_batch)
        os.replace(tmp, path)
        ntok = int(sum(len(d[2]) for d in part))
        shards.append({"path": f"shards/{path.name}", "documents": len(part), "tokens": ntok,
                       "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        for _, c, ids in part:
            e = comps.setdefault(c, {"weight": (weights or {}).get(c, 1.0), "documents": 0, "tokens": 0,
                                     "stages": {}})
            e["documents"] += 1
            e["tokens"] += len(ids)
    index = {"schema_version": 1,
             "tokenizer": {"name": "rwkv_vocab_v20230424", "sha256": "", "eod_id": 0, "vocab_size": vocab_size},
             "manifest": {"name": "test"}, "shards": shards, "components": comps,
             "totals": {"documents": len(docs), "tokens": int(sum(s["tokens"] for s in shards))}}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return out


def random_docs(n: int, components: list[str], seed: int = 0, min_len: int = 1, max_len: int = 300,
                vocab: int = 65535) -> list[tuple[str, str, np.ndarray]]:
    """n documents of random non-zero token ids, components assigned round-robin."""
    rng = np.random.default_rng(seed)
    return [(f"doc{i}", components[i % len(components)],
             rng.integers(1, vocab + 1, rng.integers(min_len, max_len + 1)).astype(np.uint16)) for i in range(n)]


def randomize_weights(model, seed: int):
    """Nonzero random values for every tensor of an RWKV7 (in place; returns it), scaled so activations stay
    O(1): token-shift mixes in (0.05, 0.95), norm scales near 1, matrices / sqrt(fan-in)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if k.endswith((".x_r", ".x_w", ".x_k", ".x_v", ".x_a", ".x_g")):
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.9 + 0.05)
            elif k.endswith("bias"):
                p.copy_(0.2 * r)
            elif k.endswith("weight") and p.dim() == 1:  # LayerNorm / GroupNorm scales
                p.copy_(1 + 0.2 * r)
            elif p.dim() == 2 and not k.endswith("r_k"):
                p.copy_(r / p.shape[-1] ** 0.5)
            else:
                p.copy_(r)
    return model
