"""Loader throughput: tokens/s on one core for trainer.data (mmap, zero-copy windows) vs a `datasets` peer.

Both produce the same windows (checked): the sampler's (component, window) list for the first N
samples of a seeded run, each window data_ctx_len + 1 tokens of documents joined with 0. The peer
reads the documents a window covers with `datasets.Dataset.from_file(shard)` row access (numpy
format), the usual way trainers read Arrow shards. One process, one thread (torch/numpy threads
pinned to 1), so the number is per core. Target: 10x what one H200 consumes training 0.1B
(BENCHMARKS.md: ~200k tokens/s), i.e. >= 2M tokens/s per core.

    python bench/loader.py [--data DIR] [--ctx 4096] [--batch 8] [--batches 200]
Without --data a synthetic corpus (random tokens, document lengths 50..5000) is written to a temp dir.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.data import Layout, MixtureSampler, ShardCorpus, TrainWindows  # noqa: E402
from trainer.testing import random_docs, write_corpus  # noqa: E402

H200_01B_TOKENS_PER_S = 200_000


class DatasetsPeer:
    """Same windows through `datasets`: rows fetched by index, then joined with 0 and sliced."""

    def __init__(self, corpus: ShardCorpus):
        import datasets

        self.corpus = corpus
        self.ds = [datasets.Dataset.from_file(str(corpus.data_dir / s["path"])).with_format("numpy")
                   for s in corpus.index["shards"]]
        import pyarrow as pa

        from trainer.data import open_batches

        segs = []  # per record batch, in the corpus's segment order: (shard, first row, row offsets)
        for i, s in enumerate(corpus.index["shards"]):
            row = 0
            for batch in open_batches(pa.memory_map(str(corpus.data_dir / s["path"])))[1]:
                segs.append((i, row, batch.column("input_ids").offsets.to_numpy()[:-1]))
                row += batch.num_rows
        self.shard_of, self.row_of = {}, {}
        for name, c in corpus.components.items():  # document -> (shard, row)
            shard = np.array([segs[g][0] for g in c.doc_seg], dtype=np.int64)
            rows = np.array([segs[g][1] + int(np.searchsorted(segs[g][2], st)) for g, st in zip(c.doc_seg, c.doc_start)])
            self.shard_of[name], self.row_of[name] = shard, rows

    def window(self, comp: str, p: int) -> np.ndarray:
        c = self.corpus.components[comp]
        D = self.corpus.D
        pos, end = p * D, p * D + D + 1
        d = int(np.searchsorted(c.cum, pos, side="right")) - 1
        parts = []
        start = pos - int(c.cum[d])
        while int(c.cum[d]) < end:
            ids = self.ds[int(self.shard_of[comp][d])][int(self.row_of[comp][d])]["input_ids"]
            parts += [ids.astype(np.int64), np.zeros(1, dtype=np.int64)]
            d += 1
        return np.concatenate(parts)[start:start + D + 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--peer-batches", type=int, default=10)
    ap.add_argument("--out", default="bench/results/loader.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory()
        docs = random_docs(6000, ["web", "code", "books"], seed=0, min_len=50, max_len=5000)
        data = write_corpus(Path(tmp.name) / "data", docs, docs_per_shard=1000)
    t = time.perf_counter()
    corpus = ShardCorpus(data, args.ctx, val_fraction=0.001)
    open_s = time.perf_counter() - t
    total_tokens = sum(s["tokens"] for s in corpus.index["shards"])
    layout = Layout(args.batch)
    ds = TrainWindows(corpus, 0, layout)
    ds.batch(0)  # warm the page cache and the sampler's first block

    t = time.perf_counter()
    for m in range(args.batches):
        ds.batch(m)
    dt = time.perf_counter() - t
    ours = args.batches * args.batch * args.ctx / dt

    peer = DatasetsPeer(corpus)
    sampler = MixtureSampler(corpus, 0)
    picks = sampler.locate(np.arange(args.peer_batches * args.batch))
    ref = torch.cat([ds.batch(m) for m in range(args.peer_batches)])
    t = time.perf_counter()
    got = [peer.window(c, p) for c, p in picks]
    dt_peer = time.perf_counter() - t
    same = bool(torch.equal(torch.from_numpy(np.stack(got)), ref))
    theirs = len(picks) * args.ctx / dt_peer

    res = {"corpus": str(args.data or "synthetic"), "corpus_tokens": total_tokens, "shards": len(corpus.index["shards"]),
           "open_and_verify_s": round(open_s, 3), "data_ctx_len": args.ctx, "micro_batch": args.batch,
           "ours_tokens_per_s_per_core": round(ours), "datasets_peer_tokens_per_s_per_core": round(theirs),
           "ratio_vs_peer": round(ours / theirs, 1), "same_windows_as_peer": same,
           "target_tokens_per_s": 10 * H200_01B_TOKENS_PER_S, "x_target": round(ours / (10 * H200_01B_TOKENS_PER_S), 2),
           "cpu": platform.processor() or platform.machine(), "note": "2-core box shared with other jobs: noisy"}
    print(f"{'loader':<24}{'tokens/s/core':>16}")
    print(f"{'trainer.data (mmap)':<24}{ours:>16,.0f}")
    print(f"{'datasets row access':<24}{theirs:>16,.0f}")
    print(f"ratio {ours / theirs:.1f}x, same windows: {same}; target {10 * H200_01B_TOKENS_PER_S:,} -> {ours / (10 * H200_01B_TOKENS_PER_S):.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpf = out.with_suffix(".tmp")
    tmpf.write_text(json.dumps(res, indent=1))
    os.replace(tmpf, out)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
