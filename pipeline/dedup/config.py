"""Typed configuration of the near-dedup stage and the LSH band/row choice.

The band/row choice follows datasketch's `MinHashLSH` (Leskovec, Rajaraman, Ullman, *Mining of
Massive Datasets*, ch. 3.4): two documents with Jaccard similarity s share at least one of b bands
of r rows with probability 1 - (1 - s^r)^b; (b, r) with b*r <= num_perm minimise the weighted area
of false positives (s < threshold) plus false negatives (s >= threshold) under that S-curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from scipy.integrate import quad

MAX_NUM_PERM = 4096
"""Largest num_perm taken: the (bands, rows) search is quadratic-ish in it (1.3 s at 4096; 10**400 never
returned), and 4096 64-bit values per document is far past any published setting (datasketch 128)."""


def _false_positive_area(threshold: float, b: int, r: int) -> float:
    return quad(lambda s: 1 - (1 - s ** float(r)) ** float(b), 0.0, threshold)[0]


def _false_negative_area(threshold: float, b: int, r: int) -> float:
    return quad(lambda s: (1 - s ** float(r)) ** float(b), threshold, 1.0)[0]


@lru_cache(maxsize=64)
def optimal_bands_rows(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) minimising fp_weight*FP + fn_weight*FN, exactly as datasketch chooses them."""
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            err = fp_weight * _false_positive_area(threshold, b, r) + fn_weight * _false_negative_area(
                threshold, b, r
            )
            if err < best:
                best, opt = err, (b, r)
    return opt


@dataclass
class MinHashConfig:
    """Near-duplicate removal settings (signatures, LSH, verification, execution)."""

    threshold: float = 0.8
    """Jaccard similarity of shingle sets above which two documents are near-duplicates."""
    num_perm: int = 128
    """MinHash permutations = signature length (uint32 values)."""
    shingle_size: int = 5
    """n of the n-grams (characters or words)."""
    shingle_kind: str = "char"
    """"char": character n-grams of the normalised text (works for scripts without spaces);
    "word": n-grams of whitespace-separated words."""
    seed: int = 1
    """Seed of the permutation parameters; signatures are comparable only under the same seed."""
    bands: int | None = None
    """LSH bands; derived from threshold and num_perm (datasketch's rule) when None."""
    rows: int | None = None
    """Rows per band; derived together with bands when None."""
    verify: bool = True
    """Keep an LSH candidate pair only if its full-signature Jaccard estimate (from `verify_bits`-bit values,
    corrected for chance agreement) is >= threshold: removes band collisions of dissimilar documents. Each
    bucket member is checked against the bucket's representatives so far (see `lsh.bucket_edges`)."""
    verify_bits: int = 8
    """Bits of each MinHash value the check compares (b-bit minwise hashing, Li & Koenig 2010:
    P[low b bits equal] = J + (1 - J) 2^-b, corrected for); 8 bits cut the check's share of the Ray
    shuffle to 1/4 of full signatures for ~no loss (std of the estimate at J = 0.9: 0.0266 vs 0.0265)."""
    fp_weight: float | None = None
    """Weight of the false-positive area when deriving bands/rows; None: 0.1 with `verify` (its
    false positives are removed by the check, so the bands lean to recall: 14 x 9 at 0.8/128,
    P[candidate | J=0.9] = 0.999), else 0.5 (datasketch's default: 9 x 13, P = 0.93)."""
    fn_weight: float | None = None
    """Weight of the false-negative area; None: 1 - fp_weight."""
    threads: int = 1
    """Threads for `signatures` (the kernels release the GIL); 1 inside Ray tasks."""
    mode: str = "auto"
    """"local": one process; "ray": Ray tasks; "auto": Ray when `ray.is_initialized()` or the input
    has at least `ray_min_docs` documents, else local (small inputs never start Ray)."""
    ray_min_docs: int = 20_000_000
    """Input size from which "auto" starts Ray even when it is not running."""
    partitions: int | None = None
    """Band-shuffle partitions on Ray (reduce tasks); None: from the data, ceil(band-row bytes / partition_mib)
    within [1, max_partitions] (a band row is 16 B + num_perm * verify_bits / 8 B with `verify`)."""
    partition_mib: int = 64
    """Target size of one partition (MiB of band rows, or of edges for the connected components) when
    `partitions` / `component_partitions` are None; a task's memory is a few times this."""
    max_partitions: int = 2048
    """Upper bound on derived partition counts: the driver owns (map tasks in flight + merged maps) x
    partitions refs of ~1.9 KB each, and map tasks grow so that their pieces stay >= min_piece_kib.
    2048 keeps 3e9 documents at 3 GB of band rows per reduce task and 1.07M documents per map task."""
    map_docs: int = 100_000
    """Documents per map task on Ray: consecutive signature blocks are grouped up to this (or more, so that
    each of a map task's pieces is at least `min_piece_kib`)."""
    min_piece_kib: int = 1024
    """Smallest map output piece aimed for: Ray returns objects under 100 KiB inline into the driver's memory."""
    max_in_flight: int | None = None
    """Map tasks submitted but not finished, at most; None = 2 x the cluster's CPUs, but no more than
    65,536 / partitions (each holds `partitions` refs in the driver)."""
    component_partitions: int | None = None
    """Partitions of the connected-components rounds on Ray; None: from the edge count (16 B per directed
    edge / partition_mib, within [1, max_partitions])."""
    max_rounds: int = 64
    """Upper bound on large-star/small-star rounds of the distributed connected components."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 2 <= self.num_perm <= MAX_NUM_PERM or self.shingle_size < 1:
            raise ValueError(f"num_perm must be in [2, {MAX_NUM_PERM}] and shingle_size >= 1, got "
                             f"{str(self.num_perm)[:20]} and {str(self.shingle_size)[:20]}")
        if self.shingle_kind not in ("char", "word"):
            raise ValueError(f"shingle_kind must be 'char' or 'word', got {self.shingle_kind!r}")
        if self.mode not in ("auto", "local", "ray"):
            raise ValueError(f"mode must be auto, local or ray, got {self.mode!r}")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("give both bands and rows, or neither")
        if self.bands is not None and (self.bands < 1 or self.rows < 1):
            raise ValueError(f"bands and rows must be >= 1, got bands={self.bands} rows={self.rows}")
        for name in ("partitions", "component_partitions", "max_in_flight"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if min(self.partition_mib, self.max_partitions, self.map_docs, self.max_rounds) < 1 or self.min_piece_kib < 0:
            raise ValueError("partition_mib, max_partitions, map_docs and max_rounds must be >= 1, min_piece_kib >= 0")
        if self.seed < 0:  # numpy's SeedSequence takes none: it failed later, in the first signature batch
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.verify_bits not in (8, 16, 32):
            raise ValueError(f"verify_bits must be 8, 16 or 32, got {self.verify_bits}")
        if self.fp_weight is None:
            self.fp_weight = 0.1 if self.verify else 0.5
        if self.fn_weight is None:
            self.fn_weight = 1.0 - self.fp_weight
        if self.bands is None:
            self.bands, self.rows = optimal_bands_rows(
                float(self.threshold), int(self.num_perm), self.fp_weight, self.fn_weight
            )
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands*rows = {self.bands * self.rows} > num_perm = {self.num_perm}")
