"""LSH banding, candidate edges and in-process clustering.

A signature [num_perm] is cut into `bands` bands of `rows` values; each band is hashed to one
uint64 band key that also mixes in the band index, so keys of all bands live in one space and can
be shuffled together by key. Documents with equal band keys form a bucket. Without verification a
bucket of k members yields k-1 "star" edges (member -> smallest key in the bucket) instead of k(k-1)/2
pairs: the same connected components with linear edges. With `verify`, an edge needs the two full
signatures to agree in >= threshold of their positions (the MinHash estimate of Jaccard, on b-bit values,
see `MinHashConfig.verify_bits`), which drops band collisions of dissimilar documents. Then a star is not
enough (members similar to each other but not to the leader would lose their edge), so each bucket is
walked in key order: a member joins the first earlier "representative" it verifies against, or becomes a
representative itself (`bucket_edges`); one representative per bucket in the usual case, and the result
does not depend on the order of the input. A member similar only to a non-representative member of a
bucket is not linked through that bucket (checking every pair would be quadratic in the bucket size).

Clusters are connected components of the kept edges; each is represented by its smallest key, and
every other member is removed with `duplicate_of` = that key.
"""

from __future__ import annotations

import numba
import numpy as np

from .config import MinHashConfig
from .minhash import EMPTY, _fmix64


@numba.njit(nogil=True, cache=True)
def _band_keys_kernel(sig, bands, rows, out):
    """sig [n, P] uint32 -> out [n, bands] uint64; EMPTY signatures -> 0 (never bucketed)."""
    prime = np.uint64(0x100000001B3)
    for d in range(sig.shape[0]):
        empty = True
        for k in range(sig.shape[1]):
            if sig[d, k] != np.uint32(0xFFFFFFFF):
                empty = False
                break
        for j in range(bands):
            if empty:
                out[d, j] = np.uint64(0)
                continue
            h = (np.uint64(0xCBF29CE484222325) ^ np.uint64(j)) * prime
            for r in range(rows):
                h = (h ^ np.uint64(sig[d, j * rows + r])) * prime
            h = _fmix64(h)
            out[d, j] = h if h != np.uint64(0) else np.uint64(1)


def check_signatures(sig: np.ndarray, cfg: MinHashConfig) -> None:
    """Signatures must be [n, num_perm]: the band kernel does not bounds-check its reads."""
    if sig.ndim != 2 or sig.shape[1] != cfg.num_perm:
        raise ValueError(f"signatures have shape {tuple(sig.shape)}, expected [n, {cfg.num_perm}] (num_perm)")


def band_keys(sig: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """Band keys of signatures; 0 marks an empty document.  # [n, bands] uint64"""
    check_signatures(sig, cfg)
    out = np.empty((sig.shape[0], cfg.bands), dtype=np.uint64)
    _band_keys_kernel(np.ascontiguousarray(sig, dtype=np.uint32), cfg.bands, cfg.rows, out)
    return out


def band_keys_reference(sig: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """Python-int version of `band_keys`.  # [n, bands] uint64"""
    from .minhash import M64, _fmix64_py

    out = np.zeros((sig.shape[0], cfg.bands), dtype=np.uint64)
    for d in range(sig.shape[0]):
        if (sig[d] == EMPTY).all():
            continue
        for j in range(cfg.bands):
            h = ((0xCBF29CE484222325 ^ j) * 0x100000001B3) & M64
            for v in sig[d, j * cfg.rows : (j + 1) * cfg.rows]:
                h = ((h ^ int(v)) * 0x100000001B3) & M64
            out[d, j] = _fmix64_py(h) or 1
    return out


def star_edges(bkey: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bucket members -> smallest key of their bucket (the unverified edges).

    bkey [m] uint64 band keys (0 = skip), keys [m] int64 document keys (one row per doc and band).
    Returns (u, v) int64 [e] with u > v: u shares a bucket whose smallest key is v.
    """
    ks, starts = _buckets(bkey, keys, keys)
    leader = np.repeat(ks[starts[:-1]], np.diff(starts))
    sel = ks != leader
    return ks[sel], leader[sel]


def _buckets(bkey: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows sorted by (band key, document key), empty band keys dropped, and the bucket starts [b + 1].
    A key twice in one bucket means two documents share it (a document has one band key per band)."""
    live = bkey != 0
    order = np.lexsort((keys[live], bkey[live]))
    bk, ks, rs = bkey[live][order], keys[live][order], rows[live][order]
    start = np.ones(len(bk), dtype=bool)
    start[1:] = bk[1:] != bk[:-1]
    if (~start[1:] & (ks[1:] == ks[:-1])).any():
        raise ValueError("document keys must be unique (one appears twice in a bucket)")
    return rs, np.append(np.flatnonzero(start), len(bk)).astype(np.int64)


def min_agreeing(cfg: MinHashConfig) -> float:
    """Equal b-bit values (of num_perm) a verified pair needs: estimate_jaccard >= threshold, solved for the
    count, less a hair so a pair exactly at the threshold passes despite float rounding."""
    chance = 2.0**-cfg.verify_bits
    return cfg.num_perm * (cfg.threshold * (1.0 - chance) + chance) - 1e-6


@numba.njit(nogil=True, cache=True)
def _bucket_edges_kernel(starts, rows, low, need, out_u, out_v):
    """Buckets are rows[starts[b]:starts[b + 1]] in key order; low [n, P] b-bit values by row. Each member
    is compared with the bucket's representatives so far, joins the first it agrees with in >= need
    positions (edge member -> representative) or becomes one. Returns the number of edges written."""
    e = 0
    reps = np.empty(rows.shape[0], np.int64)
    for b in range(starts.shape[0] - 1):
        n_rep = 0
        for i in range(starts[b], starts[b + 1]):
            r = rows[i]
            joined = False
            for q in range(n_rep):
                rep = reps[q]
                agree = 0
                for k in range(low.shape[1]):
                    if low[r, k] == low[rep, k]:
                        agree += 1
                if agree >= need:
                    out_u[e] = r
                    out_v[e] = rep
                    e += 1
                    joined = True
                    break
            if not joined:
                reps[n_rep] = r
                n_rep += 1
    return e


def bucket_edges(bkey: np.ndarray, keys: np.ndarray, rows: np.ndarray, low: np.ndarray,
                 need: float) -> tuple[np.ndarray, np.ndarray]:
    """Verified edges between rows sharing a band key (see the module docstring).

    bkey [m] uint64 (0 = skip), keys [m] int64 document keys (the order within a bucket), rows [m] int64
    indices into low [n, P] (b-bit values). Returns (u, v) rows [e]: u verified against representative v.
    """
    rs, starts = _buckets(bkey, keys, rows)
    u = np.empty(len(rs), np.int64)
    v = np.empty(len(rs), np.int64)
    e = _bucket_edges_kernel(starts, rs, np.ascontiguousarray(low), need, u, v)
    return u[:e], v[:e]


def bucket_edges_reference(bkey, keys, rows, low, need):
    """Plain-Python `bucket_edges`."""
    rs, starts = _buckets(bkey, keys, rows)
    us, vs = [], []
    for b in range(len(starts) - 1):
        reps: list[int] = []
        for r in rs[starts[b]:starts[b + 1]].tolist():
            rep = next((q for q in reps if int((low[r] == low[q]).sum()) >= need), None)
            if rep is None:
                reps.append(r)
            else:
                us.append(r)
                vs.append(rep)
    return np.array(us, np.int64), np.array(vs, np.int64)


def agreement(sig_u: np.ndarray, sig_v: np.ndarray) -> np.ndarray:
    """Fraction of equal MinHash values row by row (estimated Jaccard).  # [e] float"""
    return (sig_u == sig_v).mean(axis=1) if len(sig_u) else np.zeros(0)


def low_bits(sig: np.ndarray, bits: int) -> np.ndarray:
    """The lowest `bits` bits of each MinHash value, what the verification compares.  # [n, P]"""
    return sig.astype({8: np.uint8, 16: np.uint16, 32: np.uint32}[bits])


def estimate_jaccard(low_u: np.ndarray, low_v: np.ndarray, bits: int) -> np.ndarray:
    """Jaccard estimate from b-bit values: (matches - 2^-b) / (1 - 2^-b).  # [e] float"""
    chance = 2.0**-bits
    return (agreement(low_u, low_v) - chance) / (1.0 - chance)


@numba.njit(nogil=True, cache=True)
def _union_find(n, u, v):
    """Components of edges (u, v) over nodes 0..n-1; returns the smallest node of each component."""
    parent = np.arange(n)
    for e in range(u.shape[0]):
        a, b = u[e], v[e]
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        if a < b:
            parent[b] = a
        elif b < a:
            parent[a] = b
    for i in range(n):  # roots are component minima; parents point to smaller nodes
        parent[i] = parent[parent[i]]
    return parent


def components(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of an edge list over int64 keys (union-find, one process).

    Returns (removed [m], duplicate_of [m]) int64, sorted by removed: every non-minimal member of a
    component with the component's smallest key.
    """
    if len(u) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, inv = np.unique(np.concatenate([u, v]), return_inverse=True)  # sorted: index order = key order
    root = _union_find(len(nodes), inv[: len(u)].astype(np.int64), inv[len(u) :].astype(np.int64))
    sel = root != np.arange(len(nodes))
    return nodes[sel], nodes[root[sel]]


def components_reference(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain-Python union-find of `components`."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in zip(u.tolist(), v.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    pairs = sorted((x, find(x)) for x in parent if find(x) != x)
    return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)


def duplicates_local(keys: np.ndarray, sig: np.ndarray, cfg: MinHashConfig,
                     on_band=None) -> tuple[np.ndarray, np.ndarray]:
    """All of LSH + verification + components in one process.  keys [n] int64, sig [n, P] uint32.
    on_band(done, bands): called after each band (a progress bar)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    check_signatures(sig, cfg)
    if len(np.unique(keys)) != len(keys):
        raise ValueError("document keys must be unique")
    bk = band_keys(sig, cfg)  # [n, bands]
    rows = np.arange(len(keys), dtype=np.int64)
    low, need = (low_bits(sig, cfg.verify_bits), min_agreeing(cfg)) if cfg.verify else (None, 0.0)
    us, vs = [], []
    for j in range(cfg.bands):  # one band at a time bounds the sort's memory to n rows
        if cfg.verify:
            u, v = bucket_edges(bk[:, j], keys, rows, low, need)
            u, v = keys[u], keys[v]
        else:
            u, v = star_edges(bk[:, j], keys)
        us.append(u)
        vs.append(v)
        if on_band is not None:
            on_band(j + 1, cfg.bands)
    removed, dup = components(np.concatenate(us), np.concatenate(vs))
    return removed, dup
