"""Read stage: stream documents out of one input file, in bounded memory.

Every format yields ``Row``s in file order with a 1-based ``line`` (jsonl line, parquet/arrow
row number, 1 for a txt file). A row that cannot become a document carries a drop ``reason``
instead of text: ``bad_json``, ``missing_text``, ``not_utf8``, ``empty``, ``oversized`` (the text
is over ``max_doc_bytes``), ``line_oversized`` (a jsonl line over the memory guard
``max_line_bytes``, skipped without being held whole), and ``unreadable`` where a file breaks
off (``safe_rows``). The caller counts and quarantines those. The one error raised is a
``ManifestError`` for a parquet/Arrow file whose schema lacks the component's ``text_field``: a
wrong setting for every row, not bad input. A UTF-8 byte-order mark at the start of a jsonl or
txt file is dropped. A document's own id (``id_field``) is kept as text; an id that cannot be
UTF-8 (a lone surrogate from a ``"\\udc80"`` escape, invalid bytes in a parquet/Arrow column)
does not drop the document: its id is kept with those characters backslash-escaped
(``bad-\\udc80``, ``bad-\\xff``), see ``source_id``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest import MAX_UNITS, ComponentSpec, ManifestError


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
    stamp: tuple | None = None
    """``input_stamp`` of the file when the build fingerprinted it; the ingest stage checks the file
    still has it after reading (``None``: not checked)."""

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


def input_stamp(path: str) -> list:
    """[size, modification time] of an input (local: os.stat, ns; URL: what fsspec reports, ETag
    preferred): what the build's fingerprint records, so that an input edited in place is noticed.
    Raises ``OSError``/``ValueError`` when it cannot be read."""
    if "://" not in path:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    info = fs.info(p)
    version = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created")
                    if info.get(k) is not None), None)
    return [info.get("size"), None if version is None else str(version)]


def units_for(ci: int, comp: ComponentSpec, root: str) -> list[Unit]:
    units: list[Unit] = []
    for path in comp.files:
        files = hf_disk_files(path) if comp.format == "hf_disk" else [path]
        for p in files:
            rel = p if "://" in p else os.path.relpath(p, root)
            units.append(Unit(ci, len(units), p, comp.format, rel))
    if len(units) >= MAX_UNITS:  # the manifest checks local files; this also covers what it cannot list
        raise ManifestError(f"component {comp.name!r}: at most {MAX_UNITS - 1} files per component (document "
                            f"keys number them in 16 bits), got {len(units)}; split it")
    return units


def _open_binary(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb", buffering=1 << 20)


_CHUNK = 1 << 20
_GZ_OUT = 1 << 24
"""Most decompressed bytes one zlib call may return (bounds memory on a gzip bomb)."""
ZSTD_MAX_WINDOW = 2**31
"""Largest zstd window the reader accepts (zstd's own maximum, ``--long=31``); the decoder's buffer grows with the
data it holds, up to this, for files that ask for it."""
_ZST_IN = 512
"""Compressed bytes given to the zstd decompressor per call: bounds one call's output (~16 MiB for
pure run-length data) as ``_GZ_OUT`` does for gzip; measured no slower than whole chunks (640-850 vs
550 MB/s out on a 39 MB jsonl)."""


def _decompressed(f, fmt: str) -> Iterator[bytes]:
    """The decompressed bytes of a gzip or zstd file in chunks, by hand rather than through
    ``GzipFile``/``stream_reader``: those drop the decompressed tail when a file breaks off
    (gzip) or end silently inside an unfinished frame (zstd). Multi-member gzip and multi-frame
    zstd files continue with a fresh decompressor on ``unused_data``; zero padding between gzip
    members (and after the last) is skipped as ``gzip`` does; zeros before the first member are
    not gzip (``gzip.decompress`` refuses them too) and raise. A file that ends inside a member/frame raises
    ``EOFError`` after everything decoded before the break was yielded."""
    if fmt == "jsonl.gz":
        import zlib

        def new():
            return zlib.decompressobj(31)  # 31 = gzip header and trailer
    else:
        import zstandard

        # windows up to 2 GiB: a stream compressed with `zstd --long=31` says so in its frame header, and the
        # default limit (128 MiB) made the whole file one 'unreadable' row
        new = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj
    gz = fmt == "jsonl.gz"
    d, started, members = new(), False, 0
    while data := f.read(_CHUNK):
        while data:
            if not started and gz and members:  # padding after a member; before the first it is no gzip
                data = data.lstrip(b"\0")
                if not data:
                    break
            started = True
            if gz:
                out = d.decompress(data, _GZ_OUT)
                tail = d.unconsumed_tail
            else:  # no output cap in zstandard: feed small slices (an RLE block turns 3 bytes into 128 KiB)
                out, tail = d.decompress(data[:_ZST_IN]), data[_ZST_IN:]
            if out:
                yield out
            if d.eof:
                # the input after the member/frame: for zlib all of it is in unused_data (an
                # unconsumed_tail left from an earlier output-capped call is stale and repeats it);
                # zstd's unused_data is the rest of the slice fed, tail the slice not yet fed
                data, d, started = d.unused_data if gz else d.unused_data + tail, new(), False
                members += 1
            else:
                data = tail
    if started:
        raise EOFError(f"{fmt} file ended inside a compressed "
                       f"{'member' if gz else 'frame'} (truncated)")


LINE_BYTES_FLOOR = 64 << 20
"""Smallest memory guard for one raw jsonl line (see ``max_line_bytes``)."""
_HEAD = 200
"""Bytes of a dropped row kept as its quarantine sample."""
_BOM = b"\xef\xbb\xbf"


def max_line_bytes(max_doc_bytes: int) -> int:
    """The memory guard for one raw jsonl line: longer lines are dropped as ``line_oversized``
    after reading at most this many bytes of them. ``max_doc_bytes`` judges the text alone
    (``oversized``); the line also holds JSON escapes and other fields (metadata, HTML), so the
    guard is generous: 4x the text limit (JSON escapes of non-ASCII text are at most 3x its UTF-8
    size, ``\\n``-style escapes 2x; only ``\\u00XX`` escapes of ASCII control characters are
    larger) + 64 bytes of keys, and never below ``LINE_BYTES_FLOOR`` (64 MiB) so that rows with
    a small text limit can still carry large metadata. Parsing a line takes about 3x its size
    (bytes, str, parsed object), so this also bounds a reader's memory."""
    return max(4 * max_doc_bytes + 64, LINE_BYTES_FLOOR)


class _Cut(bytes):
    """The first ``_HEAD`` bytes of a line longer than the guard (the rest was skipped)."""


def _head(pend: list[bytes], part: bytes) -> bytes:
    """The first ``_HEAD`` bytes of ``pend`` + ``part`` without joining them whole."""
    return b"".join([p[:_HEAD] for p in pend] + [part[:_HEAD]])[:_HEAD]


def _split_lines(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """Lines ending in ``\\n`` (kept, as file iteration keeps it) out of arbitrary chunks; a last
    line without ``\\n`` is yielded at the end. A line of more than ``limit`` bytes (not counting
    its ``\\n``) is not assembled: its first ``_HEAD`` bytes are yielded as a ``_Cut`` once its end
    is found, and at most ``limit`` bytes of it plus one chunk are held at a time. An error of
    ``chunks`` propagates before the unfinished line is yielded, so only complete lines precede
    it."""
    pend: list[bytes] = []
    plen = 0
    cut: bytes | None = None  # head of the current line once it went over the limit
    for chunk in chunks:
        parts = chunk.split(b"\n")
        last = parts.pop()
        if parts:
            first = parts[0]
            if cut is not None:
                yield _Cut((cut + first[:_HEAD])[:_HEAD])
                cut = None
            elif plen + len(first) > limit:
                yield _Cut(_head(pend, first))
            elif pend:
                yield b"".join(pend) + first + b"\n"
            else:
                yield first + b"\n"
            pend, plen = [], 0
            for part in parts[1:]:
                yield _Cut(part[:_HEAD]) if len(part) > limit else part + b"\n"
        if cut is not None:
            if len(cut) < _HEAD:  # a limit below _HEAD: the sample still gets _HEAD bytes
                cut = (cut + last[:_HEAD])[:_HEAD]
        elif last:
            if plen + len(last) > limit:
                cut = _head(pend, last)
                pend, plen = [], 0
            else:
                pend.append(last)
                plen += len(last)
    if cut is not None:
        yield _Cut(cut)
    elif pend:
        yield b"".join(pend)


def _without_bom(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks`` with a UTF-8 byte-order mark at the very start removed."""
    it = iter(chunks)
    head = b""
    try:
        for chunk in it:
            head += chunk
            if len(head) >= len(_BOM):
                break
    except Exception:
        if head:  # shorter than a BOM: the bytes before the error still count
            yield head
        raise
    yield head[len(_BOM):] if head.startswith(_BOM) else head
    yield from it


def _lines(path: str, fmt: str, limit: int) -> Iterator[bytes]:
    f = _open_binary(path)
    try:
        if fmt in ("jsonl.gz", "jsonl.zst"):
            chunks = _decompressed(f, fmt)
        else:
            chunks = iter(lambda: f.read(_CHUNK), b"")
        yield from _split_lines(_without_bom(chunks), limit)
    finally:
        f.close()


def source_id(v) -> str | None:
    """A document's own id as UTF-8-encodable text: ``bytes`` decoded as UTF-8, other values through
    ``str``; characters that UTF-8 cannot hold (lone surrogates) and invalid bytes are written as
    backslash escapes, so that the row is kept with a recognisable id rather than failing the
    Arrow write of its whole file."""
    if v is None:
        return None
    s = v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


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
    return Row(line, text, source_id(doc_id), data=data)


def read_jsonl(path: str, fmt: str, text_field: str, id_field: str | None,
               max_bytes: int, line_bytes: int | None = None) -> Iterator[Row]:
    """Rows of a jsonl file; ``max_bytes`` limits the text, ``line_bytes`` (default
    ``max_line_bytes(max_bytes)``) the raw line."""
    loads = json.loads
    limit = max_line_bytes(max_bytes) if line_bytes is None else line_bytes
    for n, raw in enumerate(_lines(path, fmt, limit), 1):
        if raw.__class__ is _Cut:
            yield Row(n, None, None, "line_oversized", bytes(raw))
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
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
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


def _check_text_column(names: list[str], unit: Unit, comp: ComponentSpec) -> None:
    """A parquet/Arrow file without the text column is a wrong ``text_field`` for all its rows."""
    if comp.text_field not in names:
        raise ManifestError(f"{unit.path}: component {comp.name!r}: text_field {comp.text_field!r} is "
                            f"not a column of this {unit.format} file (columns: {names})")


def _utf8_or_bytes(v: bytes) -> str | bytes:
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return v


def _column_values(col: pa.Array) -> list:
    """The Python values of a text or id column: ``str`` where the value is valid UTF-8, its
    ``bytes`` where it is not. Arrow does not validate string data from other writers, and
    ``to_pylist`` of a string column with one invalid value fails for the whole batch; such a
    batch is read again through a binary view of the same buffers (a cast without copy or
    check), value by value. Other types keep their Python values (``None`` stays ``None``)."""
    col = _plain_text_column(col)
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return col.to_pylist()
        except UnicodeDecodeError:
            col = col.cast(pa.large_binary() if pa.types.is_large_string(t) else pa.binary())
            t = col.type
    vals = col.to_pylist()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return [v if v is None else _utf8_or_bytes(v) for v in vals]
    return vals


def _read_batches(batches: Iterator[pa.RecordBatch], text_field: str, id_field: str | None,
                  max_bytes: int) -> Iterator[Row]:
    """Rows of parquet/Arrow batches. A text that is not valid UTF-8 drops its own row as
    ``not_utf8``; a text column of another type (numbers, lists) gives ``missing_text``."""
    n = 0
    for b in batches:
        texts = _plain_text_column(b.column(text_field))
        t = texts.type
        if any(f(t) for f in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                              pa.types.is_large_binary)):
            texts_py = _column_values(texts)
        else:
            texts_py = [None] * len(texts)
        ids = _column_values(b.column(id_field)) if id_field and id_field in b.schema.names else None
        for j, t in enumerate(texts_py):
            n += 1
            if isinstance(t, bytes):
                yield Row(n, None, None, "not_utf8", t[:200])
                continue
            yield _doc_row(n, t, ids[j] if ids else None, max_bytes,
                           t[:200] if isinstance(t, str) else repr(t))


def read_rows(unit: Unit, comp: ComponentSpec) -> Iterator[Row]:
    """All rows of ``unit`` in order (raises if the file cannot be opened or read, and
    ``ManifestError`` if a parquet/Arrow file lacks the ``text_field`` column)."""
    max_bytes = comp.filters.max_doc_bytes
    if unit.format in ("jsonl", "jsonl.gz", "jsonl.zst"):
        yield from read_jsonl(unit.path, unit.format, comp.text_field, comp.id_field, max_bytes)
    elif unit.format == "parquet":
        cols = [comp.text_field] + ([comp.id_field] if comp.id_field else [])
        with _open_binary(unit.path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            _check_text_column(names, unit, comp)
            cols = [c for c in cols if c in names]
            yield from _read_batches(pf.iter_batches(batch_size=1024, columns=cols), comp.text_field,
                                     comp.id_field, max_bytes)
    elif unit.format == "hf_disk":
        with pa.memory_map(unit.path) as src:
            reader = pa.ipc.open_stream(src)
            _check_text_column(reader.schema.names, unit, comp)
            yield from _read_batches(iter(reader), comp.text_field, comp.id_field, max_bytes)
    elif unit.format == "txt":
        with _open_binary(unit.path) as f:
            data = f.read(max_bytes + 1 + len(_BOM))
        if data.startswith(_BOM):
            data = data[len(_BOM):]
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
    line where reading stopped; the rows before it are kept. The job never crashes on input; a
    ``ManifestError`` (wrong ``text_field`` for a parquet/Arrow schema) is a setting, not input,
    and propagates so the build fails with it."""
    line = 0
    try:
        for row in read_rows(unit, comp):
            line = row.line
            yield row
    except ManifestError:
        raise
    except Exception as e:  # any reader error is bad input, not a bug of this stage
        yield Row(line + 1, None, None, "unreadable", f"{type(e).__name__}: {e}"[:200])
