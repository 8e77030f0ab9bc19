"""The near-dedup stage on Ray: band shuffle, candidate edges, distributed connected components.

  1. map (one task per input block): band keys [n, bands]; rows (band key, doc key[, low 8 bits of the signature])
     are split into P partitions by band key and returned as P objects (num_returns=P).
  2. reduce (one task per band partition): star edges inside each bucket, signature verification,
     then a local union-find that compresses the partition's edges to a forest (node -> local min);
     the edges are split by node into P partitions for step 3.
  3. large-star / small-star rounds (components.py): each round is P tasks, task i receiving the
     i-th output of every task of the previous round; each returns P edge partitions and a checksum.
     The driver only sees the P checksums per round and stops at the fixed point.
  4. the final edges (u -> component minimum, u > minimum) are gathered, which is the result.

No process holds all signatures (each map task holds one block, each reduce task 1/P of the band
rows) or all edges (each round task holds 1/P of them); the driver holds object references and the
final (removed, duplicate_of) arrays.
"""

from __future__ import annotations

import numpy as np
import ray

from . import components as cc
from .config import MinHashConfig
from .lsh import band_keys, bucket_edges, components, low_bits, min_agreeing, star_edges


def _split(parts: int, part: np.ndarray, *cols: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return [tuple(c[order[bounds[i] : bounds[i + 1]]] for c in cols) for i in range(parts)]


def _map_block(block, cfg: MinHashConfig, parts: int):
    keys, sig = block
    keys = np.asarray(keys, dtype=np.int64)
    sig = np.ascontiguousarray(sig, dtype=np.uint32)  # [n, P]
    if len(keys) == 0:  # a file with no surviving documents: any saved shape, e.g. (0, 0)
        sig = np.zeros((0, cfg.num_perm), np.uint32)
    if len(np.unique(keys)) != len(keys):
        raise ValueError("document keys must be unique (a block repeats one)")
    bk = band_keys(sig, cfg)  # [n, bands]
    rows = np.repeat(np.arange(len(keys)), cfg.bands)
    flat = bk.reshape(-1)
    live = flat != 0
    flat, rows = flat[live], rows[live]
    part = ((flat >> np.uint64(40)) % np.uint64(parts)).astype(np.int64)
    cols = (flat, keys[rows]) + ((low_bits(sig, cfg.verify_bits)[rows],) if cfg.verify else ())
    out = _split(parts, part, *cols)
    return out if parts > 1 else out[0]


def _reduce_bands(cfg: MinHashConfig, parts: int, *pieces):
    bk = np.concatenate([p[0] for p in pieces])
    keys = np.concatenate([p[1] for p in pieces])
    pos = np.arange(len(keys), dtype=np.int64)
    if cfg.verify:
        u, v = bucket_edges(bk, keys, pos, np.concatenate([p[2] for p in pieces]), min_agreeing(cfg))
        u, v = keys[u], keys[v]
    else:
        u, v = star_edges(bk, keys)
    ru, rv = components(u, v)  # local forest: each node -> its local minimum
    a, b = cc.both_directions(ru, rv)
    out = _split(parts, cc.partition_of(a, parts), a, b)
    return out if parts > 1 else out[0]


def _round(kind: str, parts: int, *pieces):
    a = np.concatenate([p[0] for p in pieces])
    b = np.concatenate([p[1] for p in pieces])
    x, y = (cc.large_star if kind == "large" else cc.small_star)(a, b)
    a, b = cc.both_directions(x, y)
    out = _split(parts, cc.partition_of(a, parts), a, b)
    return (*out, cc.checksum(a, b)) if parts > 1 else (out[0], cc.checksum(a, b))


def duplicates_ray(blocks, cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """(removed, duplicate_of, stats) for blocks of (keys [n] int64, signatures [n, P]) or ObjectRefs."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    parts = cfg.partitions or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    mapper = ray.remote(num_returns=parts)(_map_block)
    reducer = ray.remote(num_returns=parts)(_reduce_bands)
    rounder = ray.remote(num_returns=parts + 1)(_round)

    def as_list(r):
        return r if parts > 1 else [r]

    maps = [as_list(mapper.remote(blk, cfg, parts)) for blk in blocks]
    reds = [as_list(reducer.remote(cfg, parts, *[m[i] for m in maps])) for i in range(parts)]
    edges = [[r[i] for r in reds] for i in range(parts)]  # edges[i]: pieces routed to partition i
    prev, rounds = None, 0
    while True:
        rounds += 1
        if rounds > cfg.max_rounds:
            raise RuntimeError(f"connected components did not converge in {cfg.max_rounds} rounds")
        for kind in ("large", "small"):
            outs = [rounder.remote(kind, parts, *edges[i]) for i in range(parts)]
            edges = [[o[i] for o in outs] for i in range(parts)]
        sums = ray.get([o[parts] for o in outs])
        cs = (sum(s[0] for s in sums), sum(s[1] for s in sums) % (1 << 64))
        if cs == prev:
            break
        prev = cs
    finals = ray.get([p for row in edges for p in row])
    a = np.concatenate([f[0] for f in finals]) if finals else np.zeros(0, np.int64)
    b = np.concatenate([f[1] for f in finals]) if finals else np.zeros(0, np.int64)
    sel = b < a
    order = np.argsort(a[sel], kind="stable")
    return a[sel][order], b[sel][order], {"partitions": parts, "rounds": rounds}
