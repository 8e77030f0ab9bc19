"""The near-dedup stage on Ray: band shuffle, candidate edges, distributed connected components.

  1. map (one task per group of consecutive input blocks, ~`map_docs` documents): band keys [n, bands]; rows
     (band key, doc key[, low b bits of the signature]) are split into P partitions by band key and returned
     as P objects (num_returns=P). At most `max_in_flight` map tasks run at once; every MERGE_MAPS finished
     ones are merged, partition by partition, into one object each (as Ray's push-based shuffle does).
  2. reduce (one task per band partition): star edges inside each bucket, signature verification,
     then a local union-find that compresses the partition's edges to a forest (node -> local min).
  3. large-star / small-star rounds (components.py) over Q partitions sized from the forest's edge
     count (the forests, grouped, are first split into Q pieces each by node): each round is Q tasks, task i receiving the i-th output of every task of the previous round;
     each returns Q edge partitions and a checksum. The driver only sees the Q checksums per round
     and stops at the fixed point.
  4. the final edges (u -> component minimum, u > minimum) are gathered, which is the result.

Why the sizes: Ray returns an object under 100 KiB inline into the memory of the process that
submitted the task, and every ObjectRef that process owns costs it ~1.9 KB (measured, object in the
store). So the driver must own few refs, and the pieces it owns must be large: P is chosen from the
band rows' bytes (not the CPU count) and blocks are grouped so each map piece is >= `min_piece_kib`.
During the shuffle the driver owns at most (max_in_flight + MERGE_MAPS + map tasks / MERGE_MAPS) x P
refs and no band rows. At 3e9 documents (6 TB of band rows): P = 2048 (3 GB of rows per reduce task),
2,800 map tasks of 1.07M documents (1 MiB pieces), at most 32 in flight: ~310k refs, ~600 MB; the
component rounds (Q ~ 430 for ~29 GB of forest edges) own Q^2 ~ 190k refs of ~150 KB pieces per
round. Before (P = 2 x CPUs, one map task
per block) it was 50k blocks x 2,560 refs, most with their rows inline. No process holds all
signatures or all edges; the result does not depend on P, Q, the grouping or the merges (buckets
never straddle partitions and each task sorts its input).
"""

from __future__ import annotations

import numpy as np
import ray

from . import components as cc
from .config import MinHashConfig
from .lsh import band_keys, bucket_edges, components, low_bits, min_agreeing, star_edges

MERGE_MAPS = 32
"""Finished map tasks whose pieces are concatenated, partition by partition, into one object each."""
REF_BUDGET = 65_536
"""Refs of running map tasks' pieces the driver may own by default (~1.9 KB each measured: ~120 MB)."""


def _split(parts: int, part: np.ndarray, *cols: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return [tuple(c[order[bounds[i] : bounds[i + 1]]] for c in cols) for i in range(parts)]


def _concat(*pieces: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate(cols) for cols in zip(*pieces))


def row_bytes(cfg: MinHashConfig) -> int:
    """Bytes of one band row in the shuffle: band key, doc key and, with `verify`, the b-bit signature."""
    return 16 + (cfg.num_perm * cfg.verify_bits // 8 if cfg.verify else 0)


def group(sizes: list[int], target: int) -> list[list[int]]:
    """Consecutive indices collected until their sizes reach target; a last group under target / 2 joins
    the one before it."""
    groups: list[list[int]] = []
    total = target
    for i, n in enumerate(sizes):
        if total >= target:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    if len(groups) > 1 and total < target // 2:
        last = groups.pop()
        groups[-1] += last
    return groups


def _partitions(nbytes: int, cfg: MinHashConfig) -> int:
    """Partitions of about cfg.partition_mib each for `nbytes` of shuffled rows, within [1, max_partitions]."""
    return int(min(cfg.max_partitions, max(1, -(-nbytes // (cfg.partition_mib << 20)))))


def plan(sizes: list[int], cfg: MinHashConfig) -> tuple[int, list[list[int]]]:
    """(band partitions P, groups of consecutive block indices, one map task each) for blocks of `sizes` docs.

    P = cfg.partitions, else ceil(band-row bytes / partition_mib) within [1, max_partitions]. A group
    collects blocks until it has max(map_docs, docs making each of its P pieces >= min_piece_kib)
    documents; a short last group joins the one before it, so its pieces are not small either.
    """
    doc_bytes = cfg.bands * row_bytes(cfg)
    total = sum(sizes) * doc_bytes
    parts = cfg.partitions or _partitions(total, cfg)
    return parts, group(sizes, max(cfg.map_docs, -(-parts * (cfg.min_piece_kib << 10) // doc_bytes)))


def plan_components(edges: list[int], cfg: MinHashConfig) -> tuple[int, list[list[int]]]:
    """(component partitions Q, groups of consecutive reduce outputs, one split task each) for reduce tasks
    of `edges` directed edges (16 B each): Q = cfg.component_partitions, else ceil(edge bytes /
    partition_mib) within [1, max_partitions]; a group's Q pieces are >= min_piece_kib where possible."""
    q = cfg.component_partitions or _partitions(sum(edges) * 16, cfg)
    return q, group(edges, max(1, -(-q * (cfg.min_piece_kib << 10) // 16)))


def in_flight_cap(cfg: MinHashConfig, parts: int, cpus: int) -> int:
    """Map tasks running at once: cfg.max_in_flight, else 2 x CPUs but at most REF_BUDGET / parts."""
    return cfg.max_in_flight or max(1, min(2 * cpus, REF_BUDGET // parts))


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


def _map_group(cfg: MinHashConfig, parts: int, *blocks):
    """_map_block over several blocks, piece i of the result = piece i of every block, concatenated."""
    outs = [_map_block(b, cfg, parts) for b in blocks]
    if parts == 1:
        return _concat(*outs)
    return [_concat(*[o[i] for o in outs]) for i in range(parts)]


def _reduce_bands(cfg: MinHashConfig, *pieces):
    """Band rows of one partition -> (its edge forest in both directions (a, b) int64 [e], e)."""
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
    return (a, b), len(a)


def _split_edges(parts: int, *pieces):
    a, b = _concat(*pieces)
    out = _split(parts, cc.partition_of(a, parts), a, b)
    return out if parts > 1 else out[0]


def _round(kind: str, parts: int, *pieces):
    a, b = _concat(*pieces)
    x, y = (cc.large_star if kind == "large" else cc.small_star)(a, b)
    a, b = cc.both_directions(x, y)
    out = _split(parts, cc.partition_of(a, parts), a, b)
    return (*out, cc.checksum(a, b)) if parts > 1 else (out[0], cc.checksum(a, b))


def _count(block) -> int:
    return len(block[0])


def _shuffle_bands(blocks, groups: list[list[int]], parts: int, cap: int, cfg: MinHashConfig) -> tuple[list[list], int]:
    """Submit the map tasks (at most `cap` running), merge finished ones. Returns (pieces, merged maps):
    pieces[i] are the refs of partition i's band rows."""
    mapper = ray.remote(num_returns=parts)(_map_group)
    merger = ray.remote(_concat)
    pieces: list[list] = [[] for _ in range(parts)]
    running: dict = {}  # a ref of each running map task -> all its refs
    done: list[list] = []
    merged = 0

    def settle(wait_for: int) -> None:
        nonlocal merged
        while len(running) > wait_for:
            ready, _ = ray.wait(list(running), num_returns=len(running) - wait_for, fetch_local=False)
            done.extend(running.pop(r) for r in ready)
        while len(done) >= MERGE_MAPS:
            batch, done[:] = done[:MERGE_MAPS], done[MERGE_MAPS:]
            merged += len(batch)
            for i in range(parts):
                pieces[i].append(merger.remote(*[m[i] for m in batch]))

    for g in groups:
        settle(cap - 1)
        out = mapper.remote(cfg, parts, *[blocks[j] for j in g])
        out = out if parts > 1 else [out]
        running[out[-1]] = out
    settle(0)
    for m in done:  # fewer than MERGE_MAPS left: not worth another copy
        for i in range(parts):
            pieces[i].append(m[i])
    return pieces, merged


def duplicates_ray(blocks, cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """(removed, duplicate_of, stats) for blocks of (keys [n] int64, signatures [n, P]) or ObjectRefs."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    if not blocks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), {"partitions": 0, "map_tasks": 0, "rounds": 0}
    count = ray.remote(_count)
    sizes = [len(b[0]) if isinstance(b, tuple) else count.remote(b) for b in blocks]
    refs = [s for s in sizes if not isinstance(s, int)]
    got = iter(ray.get(refs))
    sizes = [s if isinstance(s, int) else next(got) for s in sizes]
    parts, groups = plan(sizes, cfg)
    cap = in_flight_cap(cfg, parts, int(ray.cluster_resources().get("CPU", 1)))
    blocks = [ray.put(b) if isinstance(b, tuple) else b for b in blocks]  # one copy each, whatever the grouping
    pieces, merged = _shuffle_bands(blocks, groups, parts, cap, cfg)

    reducer = ray.remote(num_returns=2)(_reduce_bands)
    reds = [reducer.remote(cfg, *pieces[i]) for i in range(parts)]
    del pieces
    q, split_groups = plan_components(ray.get([r[1] for r in reds]), cfg)
    splitter = ray.remote(num_returns=q)(_split_edges)
    outs = [splitter.remote(q, *[reds[j][0] for j in g]) for g in split_groups]
    outs = outs if q > 1 else [[o] for o in outs]
    edges = [[o[i] for o in outs] for i in range(q)]  # edges[i]: pieces routed to partition i
    del reds
    rounder = ray.remote(num_returns=q + 1)(_round)
    prev, rounds = None, 0
    while True:
        rounds += 1
        if rounds > cfg.max_rounds:
            raise RuntimeError(f"connected components did not converge in {cfg.max_rounds} rounds")
        for kind in ("large", "small"):
            outs = [rounder.remote(kind, q, *edges[i]) for i in range(q)]
            edges = [[o[i] for o in outs] for i in range(q)]
        sums = ray.get([o[q] for o in outs])
        cs = (sum(s[0] for s in sums), sum(s[1] for s in sums) % (1 << 64))
        if cs == prev:
            break
        prev = cs
    finals = ray.get([p for row in edges for p in row])
    a = np.concatenate([f[0] for f in finals]) if finals else np.zeros(0, np.int64)
    b = np.concatenate([f[1] for f in finals]) if finals else np.zeros(0, np.int64)
    sel = b < a
    order = np.argsort(a[sel], kind="stable")
    stats = {"partitions": parts, "map_tasks": len(groups), "max_in_flight": cap, "merged_maps": merged,
             "component_partitions": q, "split_tasks": len(split_groups), "rounds": rounds}
    return a[sel][order], b[sel][order], stats
