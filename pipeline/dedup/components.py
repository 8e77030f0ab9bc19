"""Connected components of a partitioned edge list: the large-star / small-star alternation.

Kiveris, Lattanzi, Mirrokni, Rastogi, Vassilvitskii, "Connected Components in MapReduce and
Beyond" (SoCC 2014). Each node u with neighbour set G(u) (edges stored in both directions,
partitioned by hash of u, so one partition sees every neighbour of its own nodes and nothing else):

  large-star(u): m = min(G(u) + {u});  emit {v, m} for every v in G(u) with v > u
  small-star(u): N = {v in G(u): v < u} + {u}, m = min(N);  emit {v, m} for every v in N, v != m

Alternating the two keeps the connectivity of the graph and converges, in O(log^2 n) rounds (few in
practice), to one star per component whose centre is the component's smallest node. Then every
edge (u, v) with v < u reads "u is removed, duplicate of v". Each round is one shuffle of the edge
list; memory per partition is its share of the edges. The functions here are pure numpy over one
partition; `ray_exec.py` runs them as Ray tasks, and `star_components` runs them in one process as
the executable specification (tested against union-find).
"""

from __future__ import annotations

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)


def partition_of(x: np.ndarray, parts: int) -> np.ndarray:
    """Partition of each node key (a multiplicative hash, so consecutive keys spread).  # [e] int"""
    h = x.astype(np.uint64) * _MIX
    return ((h >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)


def both_directions(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges as unique directed pairs in both directions, without self loops."""
    a, b = np.concatenate([u, v]), np.concatenate([v, u])
    keep = a != b
    pair = np.unique(np.stack([a[keep], b[keep]], 1), axis=0) if keep.any() else np.zeros((0, 2), np.int64)
    return pair[:, 0].astype(np.int64), pair[:, 1].astype(np.int64)


def _group_min(u: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """For edges sorted by u: the minimum of vals over each u's group, broadcast to the edges."""
    start = np.ones(len(u), dtype=bool)
    start[1:] = u[1:] != u[:-1]
    idx = np.flatnonzero(start)
    mins = np.minimum.reduceat(vals, idx) if len(u) else vals
    return np.repeat(mins, np.diff(np.append(idx, len(u))))


def large_star(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One large-star step over the edges (both directions) of the nodes u this partition owns."""
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    m = np.minimum(_group_min(u, v), u)
    sel = v > u
    return v[sel], m[sel]


def small_star(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One small-star step over the edges (both directions) of the nodes u this partition owns."""
    sel = v < u
    u, v = u[sel], v[sel]
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    m = _group_min(u, v)  # < u, since only smaller neighbours are kept
    first = np.ones(len(u), dtype=bool)
    first[1:] = u[1:] != u[:-1]
    keep = v != m
    return np.concatenate([v[keep], u[first]]), np.concatenate([m[keep], m[first]])


def checksum(u: np.ndarray, v: np.ndarray) -> tuple[int, int]:
    """(edge count, order-free hash sum) of a directed edge set, to detect the fixed point."""
    h = (u.astype(np.uint64) * _MIX) ^ (v.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
    h ^= h >> np.uint64(29)
    return len(u), int(h.sum(dtype=np.uint64))


def star_components(
    u: np.ndarray, v: np.ndarray, parts: int = 4, max_rounds: int = 64
) -> tuple[np.ndarray, np.ndarray, int]:
    """Large-star/small-star in one process, partition by partition as the Ray version does.

    Returns (removed, duplicate_of, rounds) with removed sorted, as `lsh.components`.
    """
    a, b = both_directions(u, v)
    prev = None
    for rnd in range(1, max_rounds + 1):
        for step in (large_star, small_star):
            pa, pb = [], []
            p = partition_of(a, parts)
            for i in range(parts):
                x, y = step(a[p == i], b[p == i])
                pa.append(x)
                pb.append(y)
            a, b = both_directions(np.concatenate(pa), np.concatenate(pb))
        cs = checksum(a, b)
        if cs == prev:
            sel = b < a
            order = np.argsort(a[sel], kind="stable")
            return a[sel][order], b[sel][order], rnd
        prev = cs
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
