"""MinHash signatures of shingle sets, vectorised over a whole batch of documents.

Text is normalised (lower case, runs of whitespace -> one space), the batch is laid out as one
UTF-32 code-point array with offsets, and one numba kernel (GIL released) walks it:

  shingle hash  h(g) = fmix64(FNV-style fold of the n code points / n word hashes) >> 32   (uint32)
  permutation k pi_k(x) = (a_k * x + b_k mod 2^64) >> 32                                    (uint32)
  signature     sig[d, k] = min over shingles g of d of pi_k(h(g))

pi_k is Dietzfelbinger's multiply-add-shift family (strongly universal for 32-bit keys, "Universal
hashing and k-wise independent random variables via integer arithmetic without primes", STACS 1996),
so P[sig[A,k] == sig[B,k]] ~= |A & B| / |A | B| (Broder 1997). It replaces datasketch's
(a x + b) mod (2^61 - 1) with one 64-bit multiply that vectorises (AVX-512 vpmullq).
`signatures_reference` computes the same numbers with Python sets and ints: the kernel is tested
against it bit for bit.

Empty documents get the all-0xFFFFFFFF signature (EMPTY), which the LSH stage never buckets.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from .config import MinHashConfig

M64 = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
WORD_SEED = 0x9E3779B97F4A7C15
EMPTY = np.uint32(0xFFFFFFFF)
SPACE = 32


def normalize(text: str) -> str:
    """Lower case and collapse every run of Unicode whitespace into one space, trimmed."""
    return " ".join(text.lower().split())


def permutations(cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-permutation (a odd, b) uint64 parameters drawn from cfg.seed.  # [num_perm] x2"""
    rng = np.random.default_rng(cfg.seed)
    a = rng.integers(0, 1 << 63, size=cfg.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 1 << 63, size=cfg.num_perm, dtype=np.uint64) * np.uint64(2)
    b |= rng.integers(0, 2, size=cfg.num_perm, dtype=np.uint64)
    return a, b


# ---------------------------------------------------------------------------------------------
# Plain reference (Python ints, per-shingle loop): defines the numbers the kernel must match.


def _fmix64_py(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & M64
    h ^= h >> 33
    h = (h * 0xC4CEB93FE1A85EC3) & M64
    h ^= h >> 33
    return h


def _fold_py(values, seed: int) -> int:
    h = seed
    for v in values:
        h = ((h ^ v) * FNV_PRIME) & M64
    return h


def shingles_reference(text: str, cfg: MinHashConfig) -> set[int]:
    """uint32 shingle hashes of one document, as a Python set."""
    norm = normalize(text)
    n = cfg.shingle_size
    if not norm:
        return set()
    if cfg.shingle_kind == "char":
        units = [ord(c) for c in norm]
    else:
        units = [_fmix64_py(_fold_py([ord(c) for c in w], WORD_SEED)) & 0xFFFFFFFF for w in norm.split(" ")]
    if len(units) <= n:
        return {_fmix64_py(_fold_py(units, FNV_OFFSET)) >> 32}
    return {_fmix64_py(_fold_py(units[i : i + n], FNV_OFFSET)) >> 32 for i in range(len(units) - n + 1)}


def jaccard_reference(a: str, b: str, cfg: MinHashConfig) -> float:
    """Exact Jaccard similarity of the two documents' shingle sets."""
    sa, sb = shingles_reference(a, cfg), shingles_reference(b, cfg)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def signatures_reference(texts: list[str], cfg: MinHashConfig) -> np.ndarray:
    """Plain-Python MinHash signatures.  # [n, num_perm] uint32"""
    a, b = permutations(cfg)
    out = np.full((len(texts), cfg.num_perm), EMPTY, dtype=np.uint32)
    for d, t in enumerate(texts):
        for x in shingles_reference(t, cfg):
            v = np.array([((int(ak) * x + int(bk)) & M64) >> 32 for ak, bk in zip(a, b)], dtype=np.uint32)
            np.minimum(out[d], v, out=out[d])
    return out


# ---------------------------------------------------------------------------------------------
# numba kernel (same arithmetic; uint64 wraps like `& M64`).


@numba.njit(inline="always")
def _fmix64(h):
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB93FE1A85EC3)
    h ^= h >> np.uint64(33)
    return h


@numba.njit(nogil=True, cache=True)
def _minhash_kernel(cp, offsets, n, word, a, b, out):
    """cp [total] uint32 code points, offsets [D+1] int64, a/b [P] uint64, out [D, P] uint32."""
    prime = np.uint64(FNV_PRIME)
    num_perm = a.shape[0]
    maxlen = 0
    for d in range(offsets.shape[0] - 1):
        maxlen = max(maxlen, offsets[d + 1] - offsets[d])
    units = np.empty(maxlen + 1, dtype=np.uint64)  # code points or word hashes of one doc
    hs = np.empty(maxlen + 1, dtype=np.uint64)  # shingle hashes of one doc
    for d in range(offsets.shape[0] - 1):
        s, e = offsets[d], offsets[d + 1]
        for k in range(num_perm):
            out[d, k] = np.uint32(0xFFFFFFFF)
        if e == s:
            continue
        m = 0
        if word:
            h = np.uint64(WORD_SEED)
            for i in range(s, e):
                c = cp[i]
                if c == SPACE:
                    units[m] = _fmix64(h) & np.uint64(0xFFFFFFFF)
                    m += 1
                    h = np.uint64(WORD_SEED)
                else:
                    h = (h ^ np.uint64(c)) * prime
            units[m] = _fmix64(h) & np.uint64(0xFFFFFFFF)
            m += 1
        else:
            for i in range(s, e):
                units[m] = np.uint64(cp[i])
                m += 1
        g = n if m > n else m
        ns = m - g + 1
        for i in range(ns):
            h = np.uint64(FNV_OFFSET)
            for j in range(g):
                h = (h ^ units[i + j]) * prime
            hs[i] = _fmix64(h) >> np.uint64(32)
        for k in range(num_perm):
            ak, bk = a[k], b[k]
            mn = np.uint64(0xFFFFFFFF)
            for i in range(ns):
                v = (ak * hs[i] + bk) >> np.uint64(32)
                mn = min(mn, v)
            out[d, k] = np.uint32(mn)


def _layout(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Normalise and concatenate a batch.  -> cp [total] uint32, offsets [n+1] int64"""
    norm = [normalize(t) for t in texts]
    offsets = np.zeros(len(norm) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, norm), dtype=np.int64, count=len(norm)), out=offsets[1:])
    cp = np.frombuffer("".join(norm).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # lone surrogates from JSON
    return cp, offsets


def signatures(texts: list[str], cfg: MinHashConfig, perms=None) -> np.ndarray:
    """MinHash signatures of a batch.  # [n, num_perm] uint32"""
    a, b = perms if perms is not None else permutations(cfg)
    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint32)
    if not texts:
        return out
    word = cfg.shingle_kind == "word"
    threads = max(1, min(cfg.threads, len(texts) // 64))
    if threads == 1:
        cp, offsets = _layout(texts)
        _minhash_kernel(cp, offsets, cfg.shingle_size, word, a, b, out)
        return out
    bounds = np.linspace(0, len(texts), threads + 1).astype(int)

    def part(i: int) -> None:
        lo, hi = bounds[i], bounds[i + 1]
        cp, offsets = _layout(texts[lo:hi])
        _minhash_kernel(cp, offsets, cfg.shingle_size, word, a, b, out[lo:hi])

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(part, range(threads)))
    return out
