"""The pipeline's stages as plain functions over one unit of work (no Ray in here).

ingest_unit    read → filter → content hash (+ MinHash signatures) for one input file;
               writes ``work/ingest/<unit>.arrow``, its quarantine records to
               ``<unit>.quarantine.jsonl`` (when it has any) + a ``.json`` completion marker.
exact_duplicates / near_duplicates
               global decisions over all ingested units (smaller key wins = earliest in
               manifest order), written once to ``work/dedup.arrow``.
tokenize_unit  drops the unit's removed keys and tokenizes the rest with the World
               tokenizer; writes ``work/tok/<unit>.arrow`` + marker.
write_shard    concatenates row ranges of tokenized units into ``shards/NNNNN.arrow``.

Every output appears by atomic rename, and the ``.json`` marker is written last, so a unit
either has both files or is redone. All outputs are pure functions of the inputs, which is
what makes reruns byte-identical whatever the scheduling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from pipeline import filters
from pipeline.manifest import ComponentSpec, NearDedupSettings
from pipeline.read import Unit, input_stamp, safe_rows

QUARANTINE_PER_REASON = 5
"""Rows per (unit, reason) whose quarantine record carries a text sample (the first 200 characters)."""
QUARANTINE_LOCATIONS = 100_000
"""Bad input rows (read stage) per (unit, reason) listed by file:line; past that one record says how many more
there were. Filter drops (a policy, not bad input) are listed only as samples. Counts are always exact."""
BATCH_ROWS = 2048
BATCH_BYTES = 64 << 20
"""Ingest and tokenize batches end at BATCH_ROWS documents or once their text reaches BATCH_BYTES of UTF-8,
whichever comes first: ingest's peak memory is ~4x a batch's text, and 2048 books (~0.5 MB each) made ~4 GB
per task. Batching changes no output: every stage works per document, quarantine records are in line order."""
LIST_TOKENS = 2**30
"""Most tokens in one record batch of token lists (their offsets are int32); a batch of documents holding
more is written as several."""

INGEST_SCHEMA = pa.schema([("key", pa.int64()), ("id", pa.string()), ("source_id", pa.string()),
                           ("text", pa.large_string()), ("hash", pa.binary(16))])
SHARD_SCHEMA = pa.schema([("id", pa.string()), ("component", pa.string()),
                          ("input_ids", pa.list_(pa.uint16())), ("source_id", pa.string())])
"""`id` is ``component/file:line``, unique in the corpus by construction; `source_id` is the input's own id
(the component's ``id_field``, null without one), which inputs may repeat across files."""
TOK_SCHEMA = pa.schema([("key", pa.int64())] + list(SHARD_SCHEMA))


def fsync_file(path: str) -> None:
    """Flush a finished temp file to disk before it is renamed into place (the rename alone can leave an
    empty or partial file under the final name after a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str):
    """A binary file to write ``path`` through: a temp name, fsynced and renamed into place on a clean exit
    (a failed write leaves the temp file, which the build's sweep removes)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


class _ArrowOut:
    """An Arrow IPC stream written to a temp name and renamed into place on close."""

    def __init__(self, path: str, schema: pa.Schema):
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"
        self.sink = pa.OSFile(self.tmp, "wb")
        self.writer = pa.ipc.new_stream(self.sink, schema)

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self.writer.write_batch(batch)

    def close(self) -> None:
        self.writer.close()
        self.sink.close()
        fsync_file(self.tmp)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temp file: nothing is published."""
        self.writer.close()
        self.sink.close()
        os.remove(self.tmp)


class InputError(RuntimeError):
    """An input the build cannot use as it is; the message names the file."""


class InputChanged(InputError):
    """An input's size or modification time changed while the build read it."""


class InputTooLong(InputError):
    """A file with more lines (rows) than a document key numbers: MAX_LINE."""


MAX_LINE = 2**32 - 1
"""Largest line (row) number of one file: a document key holds it in its low 32 bits (component and file above)."""


def _check_unchanged(unit: Unit) -> None:
    """Raise ``InputChanged`` naming the file if it no longer has the stamp the build fingerprinted
    (``Unit.stamp``): what was read may be neither the old nor the new contents."""
    if unit.stamp is None:
        return
    try:
        now = input_stamp(unit.path)
    except (OSError, ValueError) as e:
        now = [f"cannot stat: {e}"]
    if list(now) != list(unit.stamp):
        raise InputChanged(f"{unit.path}: input changed while the build read it ([size, mtime] "
                           f"{list(unit.stamp)} -> {list(now)}); re-run once it is stable")


def read_arrow(path: str) -> pa.Table:
    """A zero-copy table over a memory-mapped Arrow IPC stream file."""
    return pa.ipc.open_stream(pa.memory_map(path)).read_all()


class Clock:
    """Wall and CPU seconds per stage, accumulated lap by lap (``lap(None)`` only restarts)."""

    def __init__(self):
        self.wall: Counter = Counter()
        self.cpu: Counter = Counter()
        self._t, self._c = time.perf_counter(), time.process_time()

    def lap(self, stage: str | None) -> None:
        t, c = time.perf_counter(), time.process_time()
        if stage is not None:
            self.wall[stage] += t - self._t
            self.cpu[stage] += c - self._c
        self._t, self._c = t, c


@dataclass
class StageCount:
    """Documents in/out of one stage for one component, with drop reasons."""

    docs_in: int = 0
    docs_out: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"in": self.docs_in, "out": self.docs_out, "dropped": dict(sorted(self.dropped.items()))}


def id_prefix(component: str, rel: str) -> str:
    """A document's id is ``id_prefix(component, file) + str(line)``, e.g. ``wiki/part-0.jsonl:17``."""
    return f"{component}/{rel}:"


def quarantine_path(work: str, unit_name: str) -> str:
    return os.path.join(work, "ingest", unit_name + ".quarantine.jsonl")


def quarantine_bytes(records: list[dict]) -> bytes:
    """Quarantine records as the lines of quarantine.jsonl."""
    return "".join(json.dumps(q, ensure_ascii=False, sort_keys=True) + "\n" for q in records).encode()


def meta_counts_only(meta: dict, work: str, unit_name: str) -> dict:
    """A unit's meta as it travels to the driver: its quarantine records dropped (they are in the unit's
    quarantine file). The marker of an older build kept the records inside: they are written to that file
    now and counted."""
    records = meta.pop("quarantine", None)
    if records is not None and "quarantine_records" not in meta:
        if records:
            atomic_write_bytes(quarantine_path(work, unit_name), quarantine_bytes(records))
        meta["quarantine_records"] = len(records)
    return meta


def ingest_unit(unit: Unit, comp: ComponentSpec, work: str, near: NearDedupSettings | None) -> dict:
    """Read, filter and hash one input file; returns (and writes) the unit's meta record. Raises
    ``InputChanged`` (publishing nothing) if the file's size or mtime is no longer ``unit.stamp``.

    The unit's quarantine records go to ``quarantine_path`` (the build concatenates those files in unit
    order): the marker and what a Ray task returns carry only their number, ``quarantine_records``. The
    records themselves are also in the returned dict, as ``quarantine``, when this call made them (not when
    it found the unit finished)."""
    marker = os.path.join(work, "ingest", unit.name + ".json")
    if os.path.exists(marker):
        return read_json(marker)
    nd = None
    if near is not None and near.enabled:
        from pipeline.dedup import MinHashConfig, NearDedup

        nd = NearDedup(MinHashConfig(threshold=near.threshold, **near.params))
    read, filt = StageCount(), StageCount()
    quarantine: list[dict] = []
    qcount: Counter = Counter()     # read stage: bad input rows per reason
    fcount: Counter = Counter()     # filter stage: samples per reason
    clock = Clock()
    bytes_read = bytes_kept = 0
    out = _ArrowOut(os.path.join(work, "ingest", unit.name + ".arrow"), INGEST_SCHEMA)
    sig_parts: list[np.ndarray] = []
    key_base = unit.key_base
    prefix = id_prefix(comp.name, unit.rel)
    rows = safe_rows(unit, comp)
    done = False
    while not done:
        clock.lap(None)
        keys, ids, source_ids, texts, datas = [], [], [], [], []
        batch_bytes = 0
        for row in rows:
            if row.line > MAX_LINE:
                out.abort()
                raise InputTooLong(f"{unit.path}: line {row.line:,} is past the {MAX_LINE:,} lines (rows) one file may "
                                   f"have (document keys number them in 32 bits): split the file")
            read.docs_in += 1
            if row.reason is not None:
                read.dropped[row.reason] += 1
                n = qcount[row.reason] = qcount[row.reason] + 1
                if n <= QUARANTINE_LOCATIONS:
                    rec = {"component": comp.name, "file": unit.rel, "line": row.line, "stage": "read",
                           "reason": row.reason}
                    if n <= QUARANTINE_PER_REASON:
                        raw = row.raw.decode("utf-8", "replace") if isinstance(row.raw, bytes) else row.raw
                        rec["sample"] = (raw or "")[:200]
                    quarantine.append(rec)
                continue
            keys.append(key_base | row.line)
            ids.append(f"{prefix}{row.line}")
            source_ids.append(row.id)
            texts.append(row.text)
            datas.append(row.data)
            batch_bytes += len(row.data)
            if len(texts) >= BATCH_ROWS or batch_bytes >= BATCH_BYTES:
                break
        else:
            done = True
        read.docs_out += len(texts)
        clock.lap("read")
        keep = []
        for j, t in enumerate(texts):
            bytes_read += len(t)
            reason = filters.check(t, comp.filters)
            if reason is None:
                keep.append(j)
            else:
                filt.dropped[reason] += 1
                if fcount[reason] < QUARANTINE_PER_REASON:
                    fcount[reason] += 1
                    quarantine.append({"component": comp.name, "file": unit.rel, "line": keys[j] & 0xFFFFFFFF,
                                       "stage": "filter", "reason": reason, "sample": t[:200]})
        filt.docs_in += len(texts)
        filt.docs_out += len(keep)
        keys = [keys[j] for j in keep]
        ids = [ids[j] for j in keep]
        source_ids = [source_ids[j] for j in keep]
        texts = [texts[j] for j in keep]
        encoded = [datas[j] for j in keep]
        clock.lap("filter")
        bytes_kept += sum(map(len, encoded))
        digest = xxhash.xxh3_128_digest
        hashes = [digest(b) for b in encoded]
        clock.lap("exact_dedup")
        if nd is not None and texts:
            sig_parts.append(np.asarray(nd.signatures(texts)))
            clock.lap("near_dedup")
        out.write(pa.record_batch([pa.array(keys, pa.int64()), pa.array(ids, pa.string()),
                                   pa.array(source_ids, pa.string()), pa.array(texts, pa.large_string()),
                                   pa.array(hashes, pa.binary(16))], schema=INGEST_SCHEMA))
        clock.lap("ingest_write")
    try:
        _check_unchanged(unit)
    except InputChanged:
        out.abort()
        raise
    out.close()
    quarantine.sort(key=lambda q: q["line"])  # read and filter records of all batches in line order (stable)
    for reason, n in sorted(qcount.items()):
        if n > QUARANTINE_LOCATIONS:
            quarantine.append({"component": comp.name, "file": unit.rel, "stage": "read", "reason": reason,
                               "unlisted_rows": n - QUARANTINE_LOCATIONS})
    if nd is not None:
        sigs = np.concatenate(sig_parts) if sig_parts else np.zeros((0, nd.cfg.num_perm), np.uint32)  # [n, P]
        tmp = os.path.join(work, "ingest", f"{unit.name}.sig.tmp{os.getpid()}.npy")
        np.save(tmp, sigs)
        fsync_file(tmp)
        os.replace(tmp, os.path.join(work, "ingest", unit.name + ".sig.npy"))
    if quarantine:
        atomic_write_bytes(quarantine_path(work, unit.name), quarantine_bytes(quarantine))
    meta = {"unit": unit.name, "component": comp.name, "ci": unit.ci, "fi": unit.fi, "file": unit.rel,
            "read": read.as_dict(), "filter": filt.as_dict(), "chars_read": bytes_read,
            "bytes_kept": bytes_kept, "quarantine_records": len(quarantine), "seconds": dict(clock.wall),
            "cpu_seconds": dict(clock.cpu),
            "near_dedup": bool(nd is not None)}
    atomic_write_json(marker, meta)
    return {**meta, "quarantine": quarantine}


def _hash_words(h: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """[n] binary(16) → two [n] uint64 words (hi, lo)."""
    buf = np.frombuffer(h.buffers()[1], np.uint64, count=2 * len(h) + 2 * h.offset)[2 * h.offset:]
    return buf[0::2], buf[1::2]


def exact_duplicates(ingest_paths: list[str], part: int = 0, parts: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(removed_keys, duplicate_of_keys): a document whose content hash was already seen at a
    smaller key is removed. Both [m] int64, sorted by removed key.

    Only hashes with ``hi % parts == part`` are considered, so ``parts`` tasks (each holding
    1/parts of the 24 bytes per document in memory) together find every duplicate: equal
    contents have equal hashes and land in the same part.
    """
    keys, his, los = [], [], []
    for p in ingest_paths:
        t = read_arrow(p)
        if t.num_rows == 0:
            continue
        k = t.column("key").to_numpy()
        hi = np.concatenate([_hash_words(c)[0] for c in t.column("hash").chunks])
        lo = np.concatenate([_hash_words(c)[1] for c in t.column("hash").chunks])
        if parts > 1:
            mine = hi % np.uint64(parts) == part
            k, hi, lo = k[mine], hi[mine], lo[mine]
        keys.append(k)
        his.append(hi)
        los.append(lo)
    if not sum(len(x) for x in keys):  # no documents, or none whose hash falls in this part
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    k = np.concatenate(keys)
    hi, lo = np.concatenate(his), np.concatenate(los)
    order = np.lexsort((k, lo, hi))  # by hash, then key
    k, hi, lo = k[order], hi[order], lo[order]
    same = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])  # [n-1] row i+1 repeats row i's hash
    first = np.maximum.accumulate(np.where(np.r_[True, ~same], np.arange(len(k)), 0))
    dup = np.r_[False, same]
    removed, of = k[dup], k[first[dup]]
    o = np.argsort(removed, kind="stable")
    return removed[o], of[o]


def sorted_member(keys: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin(keys, sorted_set)`` for an ascending ``sorted_set``: [n] bool by binary search, O(n log m).
    ``np.isin`` sorts ``sorted_set`` again on every call (O(m log m) time and ~36 B per element of it), which
    the per-file and per-batch callers here paid over all removed keys each time."""
    if not len(sorted_set) or not len(keys):
        return np.zeros(len(keys), bool)
    pos = np.searchsorted(sorted_set, keys)  # [n]
    return sorted_set[np.minimum(pos, len(sorted_set) - 1)] == keys


def load_signatures(ingest_path: str, removed_exact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys [n] int64, MinHash signatures [n, num_perm]) of one ingest file's documents that survived exact
    dedup; the signatures were written beside it by the ingest stage. ``removed_exact`` is sorted."""
    keys = read_arrow(ingest_path).column("key").to_numpy()
    sigs = np.load(ingest_path[: -len(".arrow")] + ".sig.npy")
    live = ~sorted_member(keys, removed_exact)
    return keys[live], sigs[live]


def near_duplicates(ingest_paths: list[str], removed_exact: np.ndarray,
                    near: NearDedupSettings, on_band=None) -> tuple[np.ndarray, np.ndarray]:
    """MinHash near duplicates among documents that survived exact dedup. In Ray mode each file's
    signatures are loaded by a task and handed on as an ObjectRef: the driver never holds them.
    on_band: see NearDedup.duplicates."""
    from pipeline.dedup import MinHashConfig, NearDedup

    nd = NearDedup(MinHashConfig(threshold=near.threshold, **near.params))
    if nd.cfg.mode == "ray":
        import ray

        load = ray.remote(load_signatures)
        removed_ref = ray.put(removed_exact)
        blocks = [load.remote(p, removed_ref) for p in ingest_paths]
    else:
        blocks = [b for b in (load_signatures(p, removed_exact) for p in ingest_paths) if len(b[0])]
    if not blocks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    removed, of = nd.duplicates(blocks, on_band)
    return np.asarray(removed, np.int64), np.asarray(of, np.int64)


def encode_arrow_texts_reference(tokenizer, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n_tokens] uint16, offsets [n + 1] int64) via the tokenizer's public batch API."""
    ids, offs = tokenizer.encode_batch_flat(texts.to_pylist(), num_workers=1)
    return np.asarray(ids, np.uint16), np.asarray(offs, np.int64)


def encode_arrow_texts(tokenizer, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Same as ``encode_arrow_texts_reference``, but the tokenizer's batch kernel reads the
    UTF-8 bytes straight from the Arrow buffers: no Python string per document, no copy."""
    if len(texts) == 0 or texts.null_count:
        return encode_arrow_texts_reference(tokenizer, texts)
    if not pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.large_string())
    bufs = texts.buffers()
    offs = np.frombuffer(bufs[1], np.int64)[texts.offset: texts.offset + len(texts) + 1]  # [n + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    ids, tok_offs = tokenizer.encode_docs(data, offs)
    return ids, np.asarray(tok_offs, np.int64)


def _text_batches(table: pa.Table, rows: int, nbytes: int):
    """Zero-copy slices of ``table``'s record batches, in order: each at most ``rows`` rows and at most ``nbytes``
    bytes of text plus its first document (a cut before each document holding a multiple of ``nbytes``)."""
    for batch in table.to_batches(max_chunksize=rows):
        text = batch.column("text")
        if not pa.types.is_large_string(text.type):   # ingest files of older builds hold string (int32 offsets)
            text = text.cast(pa.large_string())
        offs = np.frombuffer(text.buffers()[1], np.int64)[text.offset: text.offset + len(text) + 1]  # [n + 1]
        offs = offs - offs[0]
        cuts = np.unique(np.concatenate([[0], np.searchsorted(offs, np.arange(nbytes, offs[-1], nbytes),
                                                              side="right") - 1]))
        for a, b in zip(cuts.tolist(), [*cuts[1:].tolist(), batch.num_rows]):
            if b > a:
                yield batch.slice(a, b - a)


def tokenize_unit(unit_name: str, work: str, removed: np.ndarray, tokenizer) -> dict:
    """Tokenize the unit's surviving documents; ``removed`` holds the unit's removed keys, sorted."""
    marker = os.path.join(work, "tok", unit_name + ".json")
    if os.path.exists(marker):
        return read_json(marker)
    t0, c0 = time.perf_counter(), time.process_time()
    src = read_arrow(os.path.join(work, "ingest", unit_name + ".arrow"))
    meta_in = read_json(os.path.join(work, "ingest", unit_name + ".json"))
    comp = meta_in["component"]
    out = _ArrowOut(os.path.join(work, "tok", unit_name + ".arrow"), TOK_SCHEMA)
    docs_in = docs_out = tokens = nbytes = 0
    for batch in _text_batches(src, BATCH_ROWS, BATCH_BYTES):
        keys = batch.column("key").to_numpy()
        docs_in += len(keys)
        live = ~sorted_member(keys, removed)
        if not live.any():
            continue
        batch = batch.filter(pa.array(live))
        texts = batch.column("text")
        flat, offs = encode_arrow_texts(tokenizer, texts)  # [n_tokens] uint16, [n + 1] int64
        lengths = np.diff(offs)
        nbytes += int(pc.sum(pc.binary_length(texts)).as_py() or 0)
        # rows [a, b) per record batch, each under LIST_TOKENS tokens (int32 list offsets); normally one batch
        cuts = np.unique(np.concatenate([[0], np.searchsorted(offs, np.arange(LIST_TOKENS, offs[-1], LIST_TOKENS),
                                                              side="right") - 1]))
        for a, b in zip(cuts, [*cuts[1:], len(offs) - 1]):
            part = batch.slice(a, b - a)
            ids = pa.ListArray.from_arrays(pa.array((offs[a:b + 1] - offs[a]).astype(np.int32)),
                                           pa.array(flat[offs[a]:offs[b]], pa.uint16()))
            out.write(pa.record_batch([part.column("key"), part.column("id"),
                                       pa.array([comp] * part.num_rows, pa.string()), ids, part.column("source_id")],
                                      schema=TOK_SCHEMA))
        docs_out += batch.num_rows
        tokens += int(lengths.sum())
    out.close()
    meta = {"unit": unit_name, "component": comp, "docs_in": docs_in, "docs_out": docs_out,
            "tokens": tokens, "chars": nbytes, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0}
    atomic_write_json(marker, meta)
    return meta


def write_shard(index: int, pieces: list[tuple[str, int, int]], out_dir: str) -> dict:
    """Write shard ``index`` from (tok_unit_path, row_start, row_stop) pieces, in order."""
    rel = f"shards/{index:05d}.arrow"
    path = os.path.join(out_dir, rel)
    marker = os.path.join(out_dir, "work", "shards", f"{index:05d}.json")
    if os.path.exists(marker) and os.path.exists(path):
        return read_json(marker)
    t0, c0 = time.perf_counter(), time.process_time()
    tables = [read_arrow(p).slice(a, b - a).select(SHARD_SCHEMA.names) for p, a, b in pieces]
    table = pa.concat_tables(tables).combine_chunks() if tables else SHARD_SCHEMA.empty_table()
    tmp = f"{path}.tmp{os.getpid()}"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, SHARD_SCHEMA) as w:
        w.write_table(table, max_chunksize=65536)
    sha256 = sha256_file(tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    lens = table.column("input_ids").combine_chunks().value_lengths() if table.num_rows else pa.array([], pa.int32())
    meta = {"path": rel, "documents": table.num_rows, "tokens": int(pc.sum(lens).as_py() or 0),
            "bytes": os.path.getsize(path), "sha256": sha256, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0}
    atomic_write_json(marker, meta)
    return meta
