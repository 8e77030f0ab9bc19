"""Read stage: stream documents out of one input file, in bounded memory.

Every format yields ``Row``s in file order with a 1-based ``line`` (jsonl line, parquet/arrow
row number, 1 for a txt file). A row that cannot become a document carries a drop ``reason``
instead of text: ``bad_json``, ``missing_text``, ``not_utf8``, ``empty``, ``oversized``, and
``unreadable`` where a file breaks off (``safe_rows``). The caller counts and quarantines
those; nothing raises.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest import ComponentSpec


@dataclass
class Row:
    line: int
    text: str | None
    id: str | None = None
    reason: str | None = None
    raw: bytes | str | None = None
    """For dropped rows: the start of the offending input, for the quarantine file."""
    data: bytes | None = None
    """For documents: the text as UTF-8 (already made to validate it; reused for hashing)."""


@dataclass(frozen=True)
class Unit:
    """One unit of work: component ``ci``'s ``fi``-th input file (an Arrow file of an hf_disk
    dataset counts as one file). Its documents get keys ``ci << 48 | fi << 32 | line``."""

    ci: int
    fi: int
    path: str
    format: str
    rel: str
    """Path relative to the manifest root (or the URL): stable across machines, used in ids."""

    @property
    def name(self) -> str:
        return f"c{self.ci:04d}_f{self.fi:05d}"

    @property
    def key_base(self) -> int:
        return (self.ci << 48) | (self.fi << 32)


def hf_disk_files(folder: str) -> list[str]:
    """The Arrow files of a ``datasets`` ``save_to_disk`` folder, in dataset order."""
    state = os.path.join(folder, "state.json")
    if os.path.exists(state):
        with open(state) as f:
            names = [d["filename"] for d in json.load(f)["_data_files"]]
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".arrow"))
    return [os.path.join(folder, n) for n in names]


def units_for(ci: int, comp: ComponentSpec, root: str) -> list[Unit]:
    units: list[Unit] = []
    for path in comp.files:
        files = hf_disk_files(path) if comp.format == "hf_disk" else [path]
        for p in files:
            rel = p if "://" in p else os.path.relpath(p, root)
            units.append(Unit(ci, len(units), p, comp.format, rel))
    return units


def _open_binary(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb", buffering=1 << 20)


_CHUNK = 1 << 20
_GZ_OUT = 1 << 24
"""Most decompressed bytes one zlib call may return (bounds memory on a gzip bomb)."""


def _decompressed(f, fmt: str) -> Iterator[bytes]:
    """The decompressed bytes of a gzip or zstd file in chunks, by hand rather than through
    ``GzipFile``/``stream_reader``: those drop the decompressed tail when a file breaks off
    (gzip) or end silently inside an unfinished frame (zstd). Multi-member gzip and multi-frame
    zstd files continue with a fresh decompressor on ``unused_data``; zero padding between gzip
    members is skipped as ``gzip`` does. A file that ends inside a member/frame raises
    ``EOFError`` after everything decoded before the break was yielded."""
    if fmt == "jsonl.gz":
        import zlib

        def new():
            return zlib.decompressobj(31)  # 31 = gzip header and trailer
    else:
        import zstandard

        new = zstandard.ZstdDecompressor().decompressobj
    gz = fmt == "jsonl.gz"
    d, started = new(), False
    while data := f.read(_CHUNK):
        while data:
            if not started and gz:
                data = data.lstrip(b"\0")
                if not data:
                    break
            started = True
            if gz:
                out = d.decompress(data, _GZ_OUT)
                tail = d.unconsumed_tail
            else:
                out, tail = d.decompress(data), b""
            if out:
                yield out
            if d.eof:
                data, d, started = d.unused_data, new(), False
            else:
                data = tail
    if started:
        raise EOFError(f"{fmt} file ended inside a compressed "
                       f"{'member' if gz else 'frame'} (truncated)")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines ending in ``\\n`` (kept, as file iteration keeps it) out of arbitrary chunks; a last
    line without ``\\n`` is yielded at the end. An error of ``chunks`` propagates before the
    unfinished line is yielded, so only complete lines precede it."""
    pend: list[bytes] = []
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) > 1:
            pend.append(parts[0])
            yield b"".join(pend) + b"\n"
            for part in parts[1:-1]:
                yield part + b"\n"
            pend = []
        if parts[-1]:
            pend.append(parts[-1])
    if pend:
        yield b"".join(pend)


def _lines(path: str, fmt: str) -> Iterator[bytes]:
    f = _open_binary(path)
    try:
        if fmt in ("jsonl.gz", "jsonl.zst"):
            yield from _split_lines(_decompressed(f, fmt))
        else:
            yield from f
    finally:
        f.close()


def _doc_row(line: int, text, doc_id, max_bytes: int, raw) -> Row:
    if not isinstance(text, str):
        return Row(line, None, None, "missing_text", raw)
    if not text.strip():
        return Row(line, None, None, "empty", raw)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud800" escapes cannot be tokenized
        return Row(line, None, None, "not_utf8", raw)
    if len(data) > max_bytes:
        return Row(line, None, None, "oversized", raw)
    return Row(line, text, None if doc_id is None else str(doc_id), data=data)


def read_jsonl(path: str, fmt: str, text_field: str, id_field: str | None,
               max_bytes: int) -> Iterator[Row]:
    loads = json.loads
    for n, raw in enumerate(_lines(path, fmt), 1):
        if len(raw) > 4 * max_bytes + 64:
            yield Row(n, None, None, "oversized", raw[:200])
            continue
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield Row(n, None, None, "not_utf8", raw[:200])
            continue
        if not s.strip():
            yield Row(n, None, None, "empty", s)
            continue
        try:
            obj = loads(s)
        except ValueError:
            yield Row(n, None, None, "bad_json", s[:200])
            continue
        if not isinstance(obj, dict):
            yield Row(n, None, None, "bad_json", s[:200])
            continue
        yield _doc_row(n, obj.get(text_field), obj.get(id_field) if id_field else None,
                       max_bytes, s[:200])


def _plain_text_column(col: pa.Array) -> pa.Array:
    """Dictionary-encoded and view-typed text/binary columns (``dictionary<string>`` from
    categorical parquet columns, ``string_view``) as their plain large types, so they are read
    rather than dropped as ``missing_text``."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_string_view(t):
        return col.cast(pa.large_string())
    if pa.types.is_binary_view(t):
        return col.cast(pa.large_binary())
    return col


def _read_batches(batches: Iterator[pa.RecordBatch], text_field: str, id_field: str | None,
                  max_bytes: int, path: str) -> Iterator[Row]:
    n = 0
    for b in batches:
        if text_field not in b.schema.names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {b.schema.names})")
        texts = _plain_text_column(b.column(text_field))
        if not pa.types.is_string(texts.type) and not pa.types.is_large_string(texts.type):
            if pa.types.is_binary(texts.type) or pa.types.is_large_binary(texts.type):
                vals = texts.to_pylist()
                texts_py = []
                for v in vals:
                    try:
                        texts_py.append(None if v is None else v.decode("utf-8"))
                    except UnicodeDecodeError:
                        texts_py.append(v)  # stays bytes: dropped as not_utf8 below
            else:
                texts_py = [None] * len(texts)
        else:
            texts_py = texts.to_pylist()
        ids = b.column(id_field).to_pylist() if id_field and id_field in b.schema.names else None
        for j, t in enumerate(texts_py):
            n += 1
            if isinstance(t, bytes):
                yield Row(n, None, None, "not_utf8", t[:200])
                continue
            yield _doc_row(n, t, ids[j] if ids else None, max_bytes,
                           t[:200] if isinstance(t, str) else repr(t))


def read_rows(unit: Unit, comp: ComponentSpec) -> Iterator[Row]:
    """All rows of ``unit`` in order (raises only if the file itself cannot be opened)."""
    max_bytes = comp.filters.max_doc_bytes
    if unit.format in ("jsonl", "jsonl.gz", "jsonl.zst"):
        yield from read_jsonl(unit.path, unit.format, comp.text_field, comp.id_field, max_bytes)
    elif unit.format == "parquet":
        cols = [comp.text_field] + ([comp.id_field] if comp.id_field else [])
        with _open_binary(unit.path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in cols if c in pf.schema_arrow.names] or [comp.text_field]
            yield from _read_batches(pf.iter_batches(batch_size=1024, columns=cols), comp.text_field,
                                     comp.id_field, max_bytes, unit.path)
    elif unit.format == "hf_disk":
        with pa.memory_map(unit.path) as src:
            reader = pa.ipc.open_stream(src)
            yield from _read_batches(iter(reader), comp.text_field, comp.id_field, max_bytes, unit.path)
    elif unit.format == "txt":
        with _open_binary(unit.path) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            yield Row(1, None, None, "oversized", data[:200])
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            yield Row(1, None, None, "not_utf8", data[:200])
            return
        yield _doc_row(1, text, None, max_bytes, text[:200])
    else:
        raise ValueError(f"unknown format {unit.format!r}")


def safe_rows(unit: Unit, comp: ComponentSpec) -> Iterator[Row]:
    """``read_rows``, but a file that cannot be opened or breaks off (truncated gzip, corrupt
    zstd or parquet, vanished URL) ends with one ``unreadable`` row naming the error at the
    line where reading stopped; the rows before it are kept. The job never crashes on input."""
    line = 0
    try:
        for row in read_rows(unit, comp):
            line = row.line
            yield row
    except Exception as e:  # any reader error is bad input, not a bug of this stage
        yield Row(line + 1, None, None, "unreadable", f"{type(e).__name__}: {e}"[:200])
