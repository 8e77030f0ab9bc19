"""MinHash near-duplicate removal: signatures per block, LSH buckets, connected components.

    from pipeline.dedup import MinHashConfig, NearDedup
    nd = NearDedup(MinHashConfig(threshold=0.8, num_perm=128))
    sig = nd.signatures(texts)                              # [n, num_perm] uint32, pure
    removed, dup_of = nd.duplicates([(keys, sig), ...])     # int64 [m] each, sorted by removed

In every cluster of near-duplicates the smallest key (manifest order) is kept; every other member
is removed with `duplicate_of` = that smallest key. Files: config.py (settings, band/row choice),
minhash.py (signatures), lsh.py (bands, buckets, one-process clustering), components.py
(large-star/small-star connected components), ray_exec.py (the same on Ray), __main__.py (CLI).

How it scales to a billion documents (N = 1e9, P = num_perm = 128, B = 14 bands x 9 rows at
threshold 0.8 with verification, D = duplicate-involved documents, usually 10-30 % of N):

- Signatures: O(total characters x P) multiply-min operations, embarrassingly parallel inside the
  pipeline's per-block tasks; 10-12k documents of 2 KB per second per core measured here
  (35-40 MB/s), so 1e9 documents are ~25 core-hours. Output 4P bytes per document = 512 GB, left in the blocks'
  object store / spilled, never gathered.
- Band shuffle: each block emits B rows of (band key 8 B, doc key 8 B) plus, with `verify`, the
  low 8 bits of the signature (P B, b-bit minwise hashing): 14 x 144 B x 1e9 = 2 TB moved once.
  Partitioned by band key into partitions sized from the data (~64 MiB of band rows each, at most
  2048; map tasks of >= 100k documents, more where needed so every piece is >= 1 MiB and none comes back inline to the
  driver; at most 2 x CPUs maps in flight; ray_exec.py), so a reduce task holds 1/partitions of the rows; it sorts them
  (O(rows log rows)), emits one star edge per bucket member beyond the first (at most D x B
  edges), checks each edge's b-bit Jaccard estimate, and compresses its edges with a local
  union-find to at most one edge per node it saw.
- Connected components: large-star/small-star rounds (Kiveris et al. 2014), each a shuffle of the
  current edges (16 B per directed edge, both directions, ~2D edges): a handful of rounds for the
  shallow components of near-duplicate graphs (O(log^2 N) worst case; a 2000-node path takes
  < 40). The driver sees one checksum per task per round, then the (removed, duplicate_of) pairs,
  the stage's output (16 B per removed document; written per partition instead at that scale).
- Memory per task is its partition's share, so adding partitions (and machines) keeps every task
  bounded; no process holds all signatures or all edges.
- Small inputs run all of it in one process (band keys, per-band sorts, numba union-find): no Ray
  start-up. `mode="auto"` uses Ray when it is already initialised or the input has at least
  `ray_min_docs` documents. Measured here (bench/results/dedup_scale.json): 1M documents,
  3.5 GB of JSONL, 90 s and 1.7 GB peak RSS in one process; 129 s on a local Ray (start-up
  included), with the identical removal list.
"""

from __future__ import annotations

import numpy as np

from .config import MinHashConfig, optimal_bands_rows
from .lsh import duplicates_local
from .minhash import permutations, signatures

__all__ = ["MinHashConfig", "NearDedup", "optimal_bands_rows"]


class NearDedup:
    """Signatures and cluster resolution for one configuration."""

    def __init__(self, cfg: MinHashConfig | None = None):
        self.cfg = cfg or MinHashConfig()
        self._perms = permutations(self.cfg)
        self.last_stats: dict = {}

    def signatures(self, texts: list[str]) -> np.ndarray:
        """MinHash signatures of a batch of documents.  # [n, num_perm] uint32"""
        return signatures(texts, self.cfg, self._perms)

    def use_ray(self, n_docs: int) -> bool:
        """Whether `duplicates` runs on Ray for an input of n_docs documents."""
        if self.cfg.mode != "auto":
            return self.cfg.mode == "ray"
        import ray

        return ray.is_initialized() or n_docs >= self.cfg.ray_min_docs

    def duplicates(self, blocks, on_band=None) -> tuple[np.ndarray, np.ndarray]:
        """Near-duplicates across blocks of (keys [n] int64, signatures [n, num_perm]).

        Blocks may also be Ray ObjectRefs of such tuples (Ray mode). Keys must be unique across
        blocks. Returns (removed_keys, duplicate_of_keys), int64 [m], sorted by removed key.
        on_band(done, bands): called after each LSH band in local mode (a progress bar; Ray mode runs the bands as one
        dataflow and does not call it).
        """
        blocks = [tuple(b) if isinstance(b, list) else b for b in blocks]
        refs = [b for b in blocks if not isinstance(b, tuple)]  # ray.ObjectRef
        n = sum(len(b[0]) for b in blocks if isinstance(b, tuple))
        if refs or self.use_ray(n):
            from .ray_exec import duplicates_ray

            removed, dup, self.last_stats = duplicates_ray(blocks, self.cfg)
            self.last_stats["mode"] = "ray"
            return removed, dup
        blocks = [b for b in blocks if len(b[0])]  # a file with no documents may carry any shape, e.g. (0, 0)
        keys = np.concatenate([np.asarray(b[0], np.int64) for b in blocks]) if blocks else np.zeros(0, np.int64)
        sig = (
            np.concatenate([np.asarray(b[1], np.uint32) for b in blocks])
            if blocks
            else np.zeros((0, self.cfg.num_perm), np.uint32)
        )
        self.last_stats = {"mode": "local"}
        return duplicates_local(keys, sig, self.cfg, on_band)
