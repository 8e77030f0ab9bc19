"""Memory-mapped shard loader: fixed-length token windows from the pipeline's Arrow shards.

The corpus is `DATA/index.json` plus Arrow IPC shards (stream or file format; one document per row,
`input_ids: list<uint16>`). Each shard is mapped with `pa.memory_map`, taken whole as one buffer, and
the file closed right away: the mapping lives on while buffers use it (no descriptor per shard, so a
corpus of 46,500 shards stays under `ulimit -n`; Python's `mmap.mmap` would not do: before 3.13 it
keeps a dup of the descriptor). `ipc.open_file` (or `ipc.open_stream`, the format `datasets` uses)
reads that buffer; the `input_ids` column's offsets and values buffers are viewed as numpy arrays
without copying, so a window read touches only its own pages.

Opening reads the metadata and the offsets only (O(documents)): each shard's size must equal
index.json's `bytes`, each record batch's offsets must start >= 0, never decrease and end inside its
values. Token ids are checked against the index's `vocab_size` by every window read (O(window)), and
for whole shards only by `verify_checksums` (which reads every byte anyway, for the sha256).

Per component, the documents (in shard order) are joined with token 0 after each one into one virtual
stream; window p of a component is stream[p*D : p*D + D + 1] with D = data_ctx_len (inputs are the
first D tokens, targets the last D). The last `val_fraction` of each component's windows is held out
for validation.

Sampling is a pure function of the global sample index i (so the order does not depend on the number
of ranks or loader workers, and the loader position is just "samples consumed"):
  1. component c(i): seeded uniform draws in blocks of 8192 against the cumulative mixture
     probabilities, p_c ∝ weight_c × train_windows_c (weight = how many times a component is seen,
     as in the manifest);
  2. j = how many earlier samples chose c; epoch e = j // n_c, q = j % n_c;
  3. window = Feistel permutation of [0, n_c) keyed by (seed, c, e), applied to q.
Global batch s holds samples [s*G, (s+1)*G); rank r, micro-step m takes G/(world*accum) consecutive
ones; loader worker w of W produces this rank's micro-batches m ≡ w (mod W). Nothing overlaps, and a
resume at "samples consumed" repeats nothing and skips nothing.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import torch

INDEX_SCHEMA_VERSION = 1
EOD = 0
BLOCK = 8192  # samples per block of component draws


class DataError(ValueError):
    """The corpus cannot be used: missing or corrupt index or shard, bad schema, bad mixture."""


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def check_schema(schema: pa.Schema, where: str) -> None:
    """Columns `id` (string), `component` (string or dictionary of strings), `input_ids` (list<uint16>)."""
    names = set(schema.names)
    for col in ("id", "component", "input_ids"):
        if col not in names:
            raise DataError(f"{where}: missing column {col!r} (has {sorted(names)})")
    if not _is_string(schema.field("id").type):
        raise DataError(f"{where}: column 'id' must be string, is {schema.field('id').type}")
    ct = schema.field("component").type
    if not (_is_string(ct) or (pa.types.is_dictionary(ct) and _is_string(ct.value_type))):
        raise DataError(f"{where}: column 'component' must be string or dictionary<string>, is {ct}")
    it = schema.field("input_ids").type
    if not ((pa.types.is_list(it) or pa.types.is_large_list(it)) and it.value_type == pa.uint16()):
        raise DataError(f"{where}: column 'input_ids' must be list<uint16>, is {it}")


def map_file(path: str | Path) -> pa.Buffer:
    """The whole file as one read-only buffer over a memory map (zero-copy). The file is closed before
    this returns: Arrow keeps the mapping while a buffer refers to it and unmaps it after the last one
    goes, so no descriptor stays open (an open pa.memory_map holds one per file)."""
    mm = pa.memory_map(str(path), "r")
    try:
        return mm.read_buffer(mm.size())
    finally:
        mm.close()


def open_batches(src: pa.Buffer | pa.NativeFile) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """Schema and record batches of an Arrow IPC file or stream (the pipeline writes the stream
    format, which `datasets.Dataset.from_file` reads). Over a mapped buffer (or a pa.memory_map) both
    readers return batches whose buffers are slices of the map: nothing is copied."""
    try:
        reader = ipc.open_file(src)
        return reader.schema, [reader.get_batch(b) for b in range(reader.num_record_batches)]
    except pa.ArrowInvalid:
        if isinstance(src, pa.NativeFile):
            src.seek(0)
        reader = ipc.open_stream(src)
        return reader.schema, list(reader)


def check_offsets(offsets: np.ndarray, n_values: int, where: str) -> None:
    """A list column's offsets ([rows + 1]) must start >= 0, never decrease and end within its `n_values`
    values. Arrow does not validate them when it reads IPC, and the token count only pins the first and
    the last: a changed offset inside would give documents of negative or huge length (wrong windows).
    Comparisons, not np.diff: a difference of two int32 offsets can wrap around."""
    if len(offsets) == 0:
        return
    if offsets[0] < 0:
        raise DataError(f"{where}: input_ids offsets start at {offsets[0]} < 0 (corrupt offsets buffer)")
    if offsets[-1] > n_values:
        raise DataError(f"{where}: input_ids offsets end at {offsets[-1]}, past its {n_values} values "
                        f"(corrupt offsets buffer)")
    down = np.flatnonzero(offsets[1:] < offsets[:-1])
    if len(down):
        r = int(down[0])
        raise DataError(f"{where}: input_ids offsets decrease at row {r} ({offsets[r]} then {offsets[r + 1]}; "
                        f"corrupt offsets buffer)")


def _scan_shard(path: Path) -> tuple[str, list[int] | None]:
    """verify_checksums' pass over one shard: its sha256, then the largest token id of each record batch
    (read right after the hash, so mostly from the page cache). None for a shard that does not parse:
    the open reports why."""
    digest = sha256_file(path)
    try:
        schema, batches = open_batches(map_file(path))
        check_schema(schema, str(path))
    except (pa.ArrowException, OSError, ValueError):
        return digest, None
    values = [b.column("input_ids").values.to_numpy(zero_copy_only=True) for b in batches]
    return digest, [int(v.max()) if len(v) else -1 for v in values]


def load_index(data_dir: str | Path) -> dict:
    """Read and validate DATA/index.json (schema version, tokenizer, shard list, components)."""
    data_dir = Path(data_dir)
    path = data_dir / "index.json"
    if not path.exists():
        raise DataError(f"{path}: index not found (build the corpus with pipeline/build.py or `make corpus`)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(index, dict):
        raise DataError(f"{path}: top level must be an object")
    if index.get("schema_version") != INDEX_SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {index.get('schema_version')!r}, "
                        f"this trainer reads {INDEX_SCHEMA_VERSION}")
    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    tok = index.get("tokenizer")
    if not isinstance(tok, dict) or tok.get("eod_id") != EOD or not count(tok.get("vocab_size")) \
            or tok["vocab_size"] < 1:
        raise DataError(f"{path}: 'tokenizer' must give eod_id 0 and an integer vocab_size >= 1, got {tok!r}")
    shards = index.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{path}: 'shards' must be a non-empty list")
    for i, s in enumerate(shards):
        for key in ("path", "documents", "tokens", "sha256"):
            if not isinstance(s, dict) or key not in s:
                raise DataError(f"{path}: shards[{i}] lacks {key!r}")
        if not isinstance(s["path"], str) or not s["path"] or not isinstance(s["sha256"], str):
            raise DataError(f"{path}: shards[{i}].path and .sha256 must be non-empty strings, got {s['path']!r} "
                            f"and {s['sha256']!r}")
        for key in ("documents", "tokens", "bytes"):
            if key in s and not count(s[key]):
                raise DataError(f"{path}: shards[{i}].{key} must be an integer >= 0, got {s[key]!r}")
    comps = index.get("components", {})
    if not isinstance(comps, dict) or not all(isinstance(c, dict) for c in comps.values()):
        raise DataError(f"{path}: 'components' must be an object of objects (name -> weight, counts)")
    if not isinstance(index.get("totals", {}), dict):
        raise DataError(f"{path}: 'totals' must be an object")
    return index


@dataclass
class _Component:
    name: str
    doc_seg: np.ndarray     # [n_docs] int32: which (shard, record batch) segment holds the document
    doc_start: np.ndarray   # [n_docs] int32 (int64 if a shard uses large_list): first token in the segment's values
    doc_len: np.ndarray     # [n_docs] like doc_start: both are bounded by the list offsets' type
    cum: np.ndarray         # [n_docs + 1] int64: stream position of each document (len + 1 per doc)
    n_windows: int
    n_train: int            # windows [0, n_train) train; [n_train + 1, n_windows) validate (when any)


class ShardCorpus:
    """The memory-mapped corpus: validated shards, per-component document tables, window reads."""

    def __init__(self, data_dir: str | Path, data_ctx_len: int, val_fraction: float = 0.01,
                 mixture: dict[str, float] | None = None, verify_checksums: bool = False):
        self.data_dir = Path(data_dir)
        self.D = int(data_ctx_len)
        self.val_fraction = float(val_fraction)
        self.verify_checksums = verify_checksums
        self.index = load_index(self.data_dir)
        self.vocab_size = int(self.index["tokenizer"]["vocab_size"])
        # what the data order depends on, which a resume checks: the shards (in order, contents by sha256) and the
        # index's component weights. `fingerprint` (what older checkpoints hold) hashes the whole component table,
        # so a rebuild that changed only its other entries (stage counts, languages) refused a resume
        shards = [(s["path"], s["sha256"]) for s in self.index["shards"]]
        comps = self.index.get("components", {})
        self.fingerprint = _sha256_json({"shards": shards, "components": comps})
        self.order_fingerprint = _sha256_json({"shards": shards,
                                               "weights": {c: e.get("weight", 1.0) for c, e in comps.items()}})
        self._values: list[np.ndarray] | None = None
        self._maps: list = []
        self._seg_where: np.ndarray | None = None  # [n_segments, 2] int32: (shard, record batch) of a segment
        seg_comp, seg_starts, seg_lens, names = self._open(verify=verify_checksums)
        self.components = self._build_components(seg_comp, seg_starts, seg_lens, names)
        self.weights = self._mixture(mixture or {})
        names_w = [c for c in self.components if self.weights.get(c, 0.0) > 0]
        self.train_components = names_w
        n = np.array([self.components[c].n_train for c in names_w], dtype=np.float64)
        w = np.array([self.weights[c] for c in names_w], dtype=np.float64)
        w = w / w.max()  # finite, max 1: weight x windows cannot overflow (weights of 1e308 are finite)
        self.probs = (w * n) / (w * n).sum()
        self.cdf = np.cumsum(self.probs)
        self.cdf[-1] = 1.0

    # --- opening and validation -------------------------------------------------------------------

    def _open(self, verify: bool):
        idx_path = self.data_dir / "index.json"
        seg_comp, seg_starts, seg_lens = [], [], []
        names: dict[str, int] = {}
        values = []
        shards = self.index["shards"]
        paths = [self.data_dir / s["path"] for s in shards]
        wheres = [f"{path} (listed at {idx_path} shards[{i}])" for i, path in enumerate(paths)]
        first: dict[str, int] = {}
        for i, (path, where) in enumerate(zip(paths, wheres)):
            if not path.exists():
                raise DataError(f"{where}: shard file is missing")
            size = path.stat().st_size  # catches a truncated or appended-to shard without reading it
            if "bytes" in shards[i] and size != shards[i]["bytes"]:
                raise DataError(f"{where}: {size} bytes on disk, the index says {shards[i]['bytes']} "
                                f"(truncated or rewritten since the corpus was built)")
            j = first.setdefault(os.path.realpath(path), i)
            if j != i:
                raise DataError(f"{where}: the same file as shards[{j}]; its documents would be read twice")
        top: list[list[int] | None] = [None] * len(paths)  # per shard and record batch: the largest token id
        if verify:  # hashlib releases the GIL on large reads: threads hash several shards at once
            with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1, len(paths) or 1)) as pool:
                digests, top = zip(*pool.map(_scan_shard, paths))
            for s, digest, where in zip(shards, digests, wheres):
                if digest != s["sha256"]:
                    raise DataError(f"{where}: sha256 {digest} does not match the index ({s['sha256']})")
        seg_where = []
        for i, (path, where, s) in enumerate(zip(paths, wheres, shards)):
            try:
                buf = map_file(path)
                schema, batches = open_batches(buf)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{where}: not a readable Arrow IPC file or stream: {e}") from None
            check_schema(schema, where)
            self._maps.append(buf)
            rows = tokens = 0
            for b, batch in enumerate(batches):
                ids = batch.column("input_ids")
                if ids.null_count or ids.values.null_count:
                    raise DataError(f"{where}: record batch {b} has null input_ids")
                offsets = ids.offsets.to_numpy(zero_copy_only=True)           # [rows + 1]
                values.append(ids.values.to_numpy(zero_copy_only=True))       # uint16 view of the mmap
                check_offsets(offsets, len(values[-1]), f"{where}: record batch {b}")
                seg_where.append((i, b))
                if verify:  # whole shards only here: it reads every token (the windows check what they read)
                    m = top[i][b] if top[i] is not None else int(values[-1].max()) if len(values[-1]) else -1
                    if m >= self.vocab_size:
                        raise DataError(f"{where}: record batch {b} holds token id {m}, not below the index's "
                                        f"vocab_size {self.vocab_size}")
                comp = batch.column("component")
                if not pa.types.is_dictionary(comp.type):
                    comp = pc.dictionary_encode(comp)
                if comp.null_count:
                    raise DataError(f"{where}: record batch {b} has null components")
                local = comp.dictionary.to_pylist()
                remap = np.array([names.setdefault(n, len(names)) for n in local], dtype=np.int32)
                codes = remap[comp.indices.to_numpy(zero_copy_only=False)] if len(local) else \
                    np.zeros(0, dtype=np.int32)
                seg_comp.append(codes)
                # in the offsets' type (int32 for list<>): checked to lie in [0, len(values)], so neither the
                # starts nor their differences can overflow it; the starts stay a view of the mapping
                seg_starts.append(offsets[:-1])
                seg_lens.append(np.diff(offsets))
                rows += len(batch)
                tokens += int(offsets[-1] - offsets[0])
            if rows != s["documents"] or tokens != s["tokens"]:
                raise DataError(f"{where}: holds {rows} documents / {tokens} tokens, index says "
                                f"{s['documents']} / {s['tokens']}")
        if not any(len(c) for c in seg_comp):   # nothing to sample from (np.concatenate would fail on no segments)
            raise DataError(f"{idx_path}: its {len(shards)} shard(s) hold no documents")
        totals = self.index.get("totals")
        if totals is not None:
            docs, toks = sum(s["documents"] for s in shards), sum(s["tokens"] for s in shards)
            if (docs, toks) != (totals.get("documents"), totals.get("tokens")):
                raise DataError(f"{idx_path}: its shards hold {docs} documents / {toks} tokens, its totals say "
                                f"{totals.get('documents')!r} / {totals.get('tokens')!r}")
        self._values = values
        self._seg_where = np.array(seg_where, dtype=np.int32).reshape(-1, 2)
        return seg_comp, seg_starts, seg_lens, {v: k for k, v in names.items()}

    def _build_components(self, seg_comp, seg_starts, seg_lens, names) -> dict[str, _Component]:
        """Per-component document tables from the per-segment lists, which it empties as it goes (each
        list is freed once joined: the peak memory per document is what matters at corpus scale)."""
        seg = np.repeat(np.arange(len(seg_comp), dtype=np.int32), [len(c) for c in seg_comp])  # [n_docs]
        comp = np.concatenate(seg_comp)
        seg_comp.clear()
        starts = np.concatenate(seg_starts)
        seg_starts.clear()
        lens = np.concatenate(seg_lens)
        seg_lens.clear()
        out = {}
        for code in sorted(names):
            m = comp == code
            dl = lens[m]
            cum = np.zeros(len(dl) + 1, dtype=np.int64)
            cum[1:] = dl  # in place, in int64: len + 1 per document, summed
            cum[1:] += 1
            np.cumsum(cum[1:], out=cum[1:])
            n_windows = max(0, int((cum[-1] - 1) // self.D))
            n_train = n_windows
            if self.val_fraction > 0 and n_windows >= 3:
                # window n_train is left out: the last training window's final target token would be the
                # first validation window's first input token
                n_val = min(max(1, int(round(n_windows * self.val_fraction))), n_windows - 2)
                n_train = n_windows - n_val - 1
            out[names[code]] = _Component(names[code], seg[m], starts[m], dl, cum, n_windows, n_train)
        return out

    def _mixture(self, override: dict[str, float]) -> dict[str, float]:
        """Component -> weight: index.json's, replaced by ``override`` (``data.mixture``). Every
        weight must be a finite number >= 0 (NaN or inf would make the probabilities NaN and the
        sampler draw one component only), and one must be > 0."""
        comps = self.index.get("components", {})

        def number(w, where: str) -> float:
            try:
                x = float(w)
            except (TypeError, ValueError):
                x = math.nan
            if not (math.isfinite(x) and x >= 0):
                raise DataError(f"{where} must be a finite number >= 0, got {w!r}")
            return x

        idx = self.data_dir / "index.json"
        weights = {c: number(comps.get(c, {}).get("weight", 1.0), f"{idx}: components[{c!r}].weight")
                   for c in self.components}
        for c, w in override.items():
            if c not in self.components:
                raise DataError(f"data.mixture: component {c!r} is not in the corpus "
                                f"(has {', '.join(self.components)})")
            weights[c] = number(w, f"data.mixture: weight of {c!r}")
        for c, w in weights.items():
            if w > 0 and self.components[c].n_train <= 0:
                raise DataError(f"component {c!r} has weight {w} but fewer than {self.D + 1} tokens "
                                f"for even one training window of data_ctx_len {self.D}")
        if not any(w > 0 for w in weights.values()):
            raise DataError("data.mixture: every component has weight 0")
        return weights

    # --- pickling for loader workers: the mmaps are reopened lazily ----------------------------

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_values"] = None
        st["_maps"] = []
        return st

    def _ensure_open(self):
        if self._values is None:
            values = []
            for s in self.index["shards"]:
                buf = map_file(self.data_dir / s["path"])
                self._maps.append(buf)
                for batch in open_batches(buf)[1]:
                    values.append(batch.column("input_ids").values.to_numpy(zero_copy_only=True))
            self._values = values

    # --- windows ------------------------------------------------------------------------------

    def read_window(self, comp: str, p: int, out: np.ndarray) -> np.ndarray:
        """Copy stream[p*D : p*D + D + 1] of a component into `out` ([D + 1] integer array)."""
        self._ensure_open()
        c = self.components[comp]
        pos = p * self.D
        end = pos + self.D + 1
        d = int(np.searchsorted(c.cum, pos, side="right")) - 1
        o = 0
        while pos < end:
            off = pos - int(c.cum[d])            # position inside document d's stream slice
            n = int(c.doc_len[d])
            if off < n:
                take = min(n - off, end - pos)
                s = int(c.doc_start[d]) + off
                out[o:o + take] = self._values[int(c.doc_seg[d])][s:s + take]
            else:                                  # the separator after document d
                take = 1
                out[o] = EOD
                d += 1
            o += take
            pos += take
        if out.max() >= self.vocab_size:  # O(window): ids past the vocab would fail deep in torch (a device assert)
            raise self._token_error(comp, p)
        return out

    def _token_error(self, comp: str, p: int) -> DataError:
        """The DataError for window p of `comp`, which holds a token id >= vocab_size: the first such
        document, named by shard, record batch, row and id."""
        c = self.components[comp]
        idx_path = self.data_dir / "index.json"
        first = int(np.searchsorted(c.cum, p * self.D, side="right")) - 1
        last = int(np.searchsorted(c.cum, p * self.D + self.D, side="right"))
        for d in range(first, last):
            seg, start, n = int(c.doc_seg[d]), int(c.doc_start[d]), int(c.doc_len[d])
            m = int(self._values[seg][start:start + n].max()) if n else -1
            if m >= self.vocab_size:
                shard, b = (int(x) for x in self._seg_where[seg])
                path = self.data_dir / self.index["shards"][shard]["path"]
                batch = open_batches(map_file(path))[1][b]
                row = int(np.searchsorted(batch.column("input_ids").offsets.to_numpy(), start, side="right")) - 1
                return DataError(f"{path} (listed at {idx_path} shards[{shard}]): record batch {b}, row {row} "
                                 f"(document {batch.column('id')[row].as_py()!r}) holds token id {m}, not below "
                                 f"the index's vocab_size {self.vocab_size}")
        return DataError(f"component {comp!r} window {p} holds a token id >= vocab_size {self.vocab_size}")

    def read_windows(self, items) -> torch.Tensor:
        """[len(items), D + 1] int64 token windows for (component, window index) pairs."""
        out = np.empty((len(items), self.D + 1), dtype=np.int64)
        for row, (c, p) in enumerate(items):
            self.read_window(c, p, out[row])
        return torch.from_numpy(out)

    def val_windows(self, n: int | None = None) -> list[tuple[str, int]]:
        """The first n (default all) held-out windows in a fixed order that interleaves the components: a keyed
        Feistel permutation of all of them, computed for the n taken only (listing and shuffling every held-out
        window took 25 s and 1.2 GB per call at World v3 scale, ~7.6M windows, to pick val_windows = 32)."""
        names = [name for name, c in self.components.items() if c.n_train < c.n_windows]
        counts = np.array([self.components[c].n_windows - self.components[c].n_train - 1 for c in names],
                          dtype=np.int64)   # [components with held-out windows]
        ends = np.cumsum(counts)
        total = int(ends[-1]) if len(ends) else 0
        k = total if n is None else min(int(n), total)
        pos = feistel_permute(np.arange(k, dtype=np.int64), total, key=0x76616C)   # [k] in [0, total)
        comp = np.searchsorted(ends, pos, side="right")
        first = np.array([self.components[c].n_train + 1 for c in names], dtype=np.int64)
        return [(names[c], int(first[c] + q - (ends[c] - counts[c]))) for c, q in zip(comp.tolist(), pos.tolist())]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


@functools.lru_cache(maxsize=4096)
def _round_keys(key: int) -> tuple:
    return tuple(_mix64(np.array([(key * 4 + r) % (1 << 64)], dtype=np.uint64))[0] for r in range(4))


def feistel_permute(q: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, n) applied to q: 4-round Feistel network on the smallest even bit
    width covering n, with cycle walking (re-apply while out of range; expected < 4 rounds)."""
    q = np.asarray(q, dtype=np.uint64)
    if n <= 1:
        return q.astype(np.int64)
    bits = max(2, math.ceil(math.log2(n)))
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = _round_keys(key)

    def once(x):
        left, right = x >> half, x & mask
        for k in keys:
            with np.errstate(over="ignore"):
                f = _mix64(right ^ k) & mask
            left, right = right, left ^ f
        return (left << half) | right

    x = once(q)
    bad = x >= np.uint64(n)
    while bad.any():
        x[bad] = once(x[bad])
        bad = x >= np.uint64(n)
    return x.astype(np.int64)


class MixtureSampler:
    """Global sample index -> (component, window): a pure, seeded function (see the module docstring)."""

    def __init__(self, corpus: ShardCorpus, seed: int):
        self.corpus = corpus
        self.seed = int(seed)
        self.names = corpus.train_components
        self.n = np.array([corpus.components[c].n_train for c in self.names], dtype=np.int64)
        self._before: list[np.ndarray] = [np.zeros(len(self.names), dtype=np.int64)]  # counts before block k
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(component code, rank among same-component draws inside the block) for block k."""
        if k not in self._blocks:
            rng = np.random.Generator(np.random.PCG64([self.seed, 0x6D6978, k]))
            choice = np.searchsorted(self.corpus.cdf, rng.random(BLOCK), side="right")
            choice = np.minimum(choice, len(self.names) - 1)
            rank = np.empty(BLOCK, dtype=np.int64)
            for c in range(len(self.names)):
                where = np.flatnonzero(choice == c)
                rank[where] = np.arange(len(where))
            if len(self._blocks) > 64:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[k] = (choice, rank)
        return self._blocks[k]

    def _counts_before(self, k: int) -> np.ndarray:
        while len(self._before) <= k:
            j = len(self._before) - 1
            choice, _ = self._block(j)
            self._before.append(self._before[j] + np.bincount(choice, minlength=len(self.names)))
        return self._before[k]

    def locate(self, i: np.ndarray) -> list[tuple[str, int]]:
        """Sample indices -> (component name, window index), vectorised per (component, epoch)."""
        i = np.asarray(i, dtype=np.int64).reshape(-1)
        comp = np.empty(len(i), dtype=np.int64)
        j = np.empty(len(i), dtype=np.int64)
        k_all, r_all = np.divmod(i, BLOCK)
        for k in np.unique(k_all):
            m = k_all == k
            choice, rank = self._block(int(k))
            comp[m] = choice[r_all[m]]
            j[m] = self._counts_before(int(k))[comp[m]] + rank[r_all[m]]
        e, q = np.divmod(j, self.n[comp])
        p = np.empty(len(i), dtype=np.int64)
        for c, ep in set(zip(comp.tolist(), e.tolist())):
            m = (comp == c) & (e == ep)
            key = (self.seed * 1_000_003 + c) * 1_000_003 + ep
            p[m] = feistel_permute(q[m], int(self.n[c]), key)
        return [(self.names[c], int(w)) for c, w in zip(comp.tolist(), p.tolist())]


@dataclass
class Layout:
    """How a global batch is split: G = micro_batch_size × world_size × accumulate samples per step."""
    micro_batch_size: int
    world_size: int = 1
    rank: int = 0
    accumulate: int = 1

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size * self.accumulate

    def sample_ids(self, start_sample: int, m: int) -> np.ndarray:
        """Global sample indices of this rank's m-th micro-batch counted from `start_sample`."""
        step, micro = divmod(m, self.accumulate)
        first = start_sample + step * self.global_batch + (micro * self.world_size + self.rank) * self.micro_batch_size
        return first + np.arange(self.micro_batch_size, dtype=np.int64)


class TrainWindows(torch.utils.data.IterableDataset):
    """This rank's micro-batches ([B, D + 1] int64) from sample `start_sample` on, forever."""

    def __init__(self, corpus: ShardCorpus, seed: int, layout: Layout, start_sample: int = 0):
        self.corpus, self.seed, self.layout, self.start_sample = corpus, seed, layout, int(start_sample)

    def batch(self, m: int) -> torch.Tensor:
        ids = self.layout.sample_ids(self.start_sample, m)
        return self.corpus.read_windows(self._sampler().locate(ids))

    def _sampler(self) -> MixtureSampler:
        if getattr(self, "_s", None) is None:
            self._s = MixtureSampler(self.corpus, self.seed)
        return self._s

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_s"] = None
        return st

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (0, 1) if info is None else (info.id, info.num_workers)
        m = w
        while True:
            yield self.batch(m)
            m += W


def _worker_message(msg: str) -> str:
    """The original message of a DataError raised in a loader worker: torch re-raises it in the main process as
    DataError("Caught DataError in DataLoader worker process N.\\nOriginal Traceback ...: <message>")."""
    marker = f"\n{DataError.__module__}.{DataError.__qualname__}: "
    i = msg.rfind(marker)
    return msg[i + len(marker):].strip() if msg.startswith("Caught DataError") and i >= 0 else msg


def train_batches(loader):
    """Iterate a train loader; a DataError from a loader worker keeps its own one-line message (torch wraps
    it in the worker's traceback, which the CLI would print whole)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except DataError as e:
            raise DataError(_worker_message(str(e))) from None
        yield batch


def make_train_loader(corpus: ShardCorpus, seed: int, layout: Layout, start_sample: int, num_workers: int):
    ds = TrainWindows(corpus, seed, layout, start_sample)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0,
                                       prefetch_factor=4 if num_workers > 0 else None)


def val_batches(corpus: ShardCorpus, layout: Layout, n_windows: int) -> list[tuple[torch.Tensor, int]]:
    """This rank's share of the validation set as (micro-batch [b, D + 1], windows that count): the first
    n_windows held-out windows (the same set for any micro-batch size and number of ranks), rank r taking
    every world-th one. Every rank gets the same number of micro-batches, since under DDP/FSDP each forward
    is a collective: a rank with fewer windows pads with batches that count 0."""
    items = corpus.val_windows(n_windows)
    mine = items[layout.rank::layout.world_size]
    B = layout.micro_batch_size
    out = [(corpus.read_windows(mine[s:s + B]), len(mine[s:s + B])) for s in range(0, len(mine), B)]
    per_rank = math.ceil(len(items) / layout.world_size)  # the most windows any rank has
    n_batches = math.ceil(per_rank / B)  # the same on every rank
    if items:
        out += [(corpus.read_windows(items[:1]), 0)] * (n_batches - len(out))
    return out
