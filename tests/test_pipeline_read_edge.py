"""Reader edge cases: a huge jsonl line is skipped in bounded memory (``line_oversized``), ``oversized``
is judged on the text and not on the line, a UTF-8 BOM at the start of a file is dropped, and a wrong
``text_field`` for a parquet/Arrow schema fails the build with the file's real columns."""

from __future__ import annotations

import gzip
import json
import os
import random
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline import read, stages
from pipeline.manifest import ComponentSpec, FilterConfig, ManifestError
from pipeline.read import Unit, read_rows, safe_rows

BOM = b"\xef\xbb\xbf"


def _comp(fmt: str, max_doc_bytes: int = 1000, **kw) -> ComponentSpec:
    return ComponentSpec(name="t", paths=["x"], format=fmt, filters=FilterConfig(max_doc_bytes=max_doc_bytes), **kw)


def _write(path, data: bytes, fmt: str) -> str:
    if fmt == "jsonl.gz":
        data = gzip.compress(data, compresslevel=1)
    elif fmt == "jsonl.zst":
        data = zstandard.ZstdCompressor(level=1).compress(data)
    path.write_bytes(data)
    return str(path)


def _rows(path: str, fmt: str, comp: ComponentSpec) -> list[read.Row]:
    return list(safe_rows(Unit(0, 0, path, fmt, os.path.basename(path)), comp))


def _rows_and_peak(path: str, fmt: str) -> tuple[list[read.Row], int]:
    """The rows of one file and the peak of Python-allocated bytes while reading it (tracemalloc)."""
    tracemalloc.start()
    try:
        rows = _rows(path, fmt, _comp(fmt))
        return rows, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _split_reference(data: bytes, limit: int) -> list[tuple[bool, bytes]]:
    """(cut, bytes) per line of the whole ``data``: the line with its ``\\n``, or its first 200 bytes
    when it is longer than ``limit`` without the ``\\n``."""
    parts = data.split(b"\n")
    out = []
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if last and not p:
            break
        out.append((True, p[:200]) if len(p) > limit else (False, p if last else p + b"\n"))
    return out


def test_split_lines_matches_plain_reference():
    rng = random.Random(3)
    for _ in range(300):
        lens = [rng.choice([0, 1, 5, 199, 200, 201, 300, 1000]) for _ in range(rng.randint(0, 8))]
        data = b"\n".join(bytes(rng.choice(b"ab{}") for _ in range(n)) for n in lens)
        if rng.random() < 0.5:
            data += b"\n"
        limit = rng.choice([0, 1, 3, 199, 200, 250, 5000])
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12)))) if len(data) > 1 else []
        chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        got = [(type(x) is read._Cut, bytes(x)) for x in read._split_lines(iter(chunks), limit)]
        assert got == _split_reference(data, limit), (lens, limit, cuts)


@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_huge_line_is_skipped_without_holding_it(tmp_path, monkeypatch, fmt, last):
    monkeypatch.setattr(read, "_CHUNK", 1 << 18)  # small reads and zlib outputs: the peak is a few of them
    monkeypatch.setattr(read, "_GZ_OUT", 1 << 18)
    monkeypatch.setattr(read, "LINE_BYTES_FLOOR", 0)  # guard 4 * 1000 + 64 bytes
    size = 16 << 20
    huge = b'{"text": "' + random.Random(1).randbytes(size // 2).hex().encode() + b'"}'
    lines = [b'{"text": "first document"}', huge, b'{"text": "third document"}']
    if last:
        lines = lines[:2]
    path = _write(tmp_path / f"f.{fmt}", b"\n".join(lines) + (b"" if last else b"\n"), fmt)
    head = huge[:200]
    del huge, lines
    rows, peak = _rows_and_peak(path, fmt)
    want = [(1, None, "first document"), (2, "line_oversized", None)] + ([] if last else [(3, None, "third document")])
    assert [(r.line, r.reason, r.text) for r in rows] == want
    assert rows[1].raw == head
    assert peak < size // 4, f"reader peak {peak / 2**20:.1f} MiB for an {size / 2**20:.0f} MiB line"


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_compression_bomb_line_is_bounded(tmp_path, monkeypatch, fmt):
    """A 256 MiB run of one byte compresses to a few KB; decompressing it must not materialise it (the peak
    is a few decompressor outputs: ~67 MiB for gzip at _GZ_OUT = 16 MiB, ~48 MiB for zstd). zstd had
    no output cap per call (one 1 MiB read could expand to gigabytes); gzip's is _GZ_OUT."""
    monkeypatch.setattr(read, "LINE_BYTES_FLOOR", 0)
    size = 256 << 20
    data = b'{"text": "first document"}\n{"text": "' + b"a" * size + b'"}\n{"text": "third document"}\n'
    path = _write(tmp_path / f"f.{fmt}", data, fmt)
    del data
    rows, peak = _rows_and_peak(path, fmt)
    assert [(r.line, r.reason) for r in rows] == [(1, None), (2, "line_oversized"), (3, None)]
    assert peak < size // 3, f"reader peak {peak / 2**20:.0f} MiB for a {size >> 20} MiB line"


def test_oversized_is_judged_on_the_text_not_the_line(tmp_path, monkeypatch):
    text = "A forum post about bicycles, gears and chains, with some details. " * 45  # ~3 KB
    big = "A long post about tricycles and their many wheels, in great detail. " * 300  # ~20 KB
    recs = [{"text": text, "html": "<div>" + "x" * 70000 + "</div>"}, {"text": big}, {"text": text + " again"}]
    path = _write(tmp_path / "f.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in recs), "jsonl")
    comp = _comp("jsonl", max_doc_bytes=16384)
    rows = _rows(path, "jsonl", comp)
    assert [(r.line, r.reason) for r in rows] == [(1, None), (2, "oversized"), (3, None)]
    assert rows[0].text == text
    # past the memory guard the line gets its own reason, counted and quarantined with its start
    monkeypatch.setattr(read, "LINE_BYTES_FLOOR", 0)
    assert read.max_line_bytes(16384) == 4 * 16384 + 64
    (tmp_path / "ingest").mkdir()
    meta = stages.ingest_unit(Unit(0, 0, path, "jsonl", "f.jsonl"), comp, str(tmp_path), None)
    assert meta["read"] == {"in": 3, "out": 1, "dropped": {"line_oversized": 1, "oversized": 1}}
    q = {x["reason"]: x for x in meta["quarantine"]}
    assert q["line_oversized"]["line"] == 1 and q["line_oversized"]["sample"] == json.dumps(recs[0])[:200]
    assert q["oversized"]["line"] == 2


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_bom_at_file_start_is_dropped_for_jsonl(tmp_path, fmt):
    docs = [{"text": "First document about rivers."}, {"text": "Second document about compilers."}]
    body = BOM + b"\r\n".join(json.dumps(d).encode() for d in docs) + b"\r\n" + BOM + b'{"text": "x"}\r\n'
    rows = _rows(_write(tmp_path / f"a.{fmt}", body, fmt), fmt, _comp(fmt))
    # only the file's first line: a BOM later in the file is not a byte-order mark but bad input
    assert [(r.line, r.reason, r.text) for r in rows] == [(1, None, docs[0]["text"]), (2, None, docs[1]["text"]),
                                                          (3, "bad_json", None)]


def test_bom_split_across_chunks_and_bom_only_files(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "_CHUNK", 1)  # the BOM arrives one byte per chunk
    p = _write(tmp_path / "a.jsonl", BOM + b'{"text": "one"}\n{"text": "two"}', "jsonl")
    assert [(r.line, r.text) for r in _rows(p, "jsonl", _comp("jsonl"))] == [(1, "one"), (2, "two")]
    p = _write(tmp_path / "b.jsonl", BOM, "jsonl")
    assert _rows(p, "jsonl", _comp("jsonl")) == []
    p = _write(tmp_path / "c.jsonl", b"\n\n", "jsonl")  # shorter than a BOM: lines still counted
    assert [(r.line, r.reason) for r in _rows(p, "jsonl", _comp("jsonl"))] == [(1, "empty"), (2, "empty")]


def test_bom_at_file_start_is_dropped_for_txt(tmp_path):
    text = "A plain text book with a byte order mark.\r\n"
    p = _write(tmp_path / "b.txt", BOM + text.encode(), "txt")
    assert [(r.line, r.reason, r.text) for r in _rows(p, "txt", _comp("txt"))] == [(1, None, text)]
    p = _write(tmp_path / "e.txt", BOM, "txt")
    assert [(r.line, r.reason) for r in _rows(p, "txt", _comp("txt"))] == [(1, "empty")]
    # the BOM does not count against max_doc_bytes
    p = _write(tmp_path / "m.txt", BOM + b"x" * 1000, "txt")
    assert [(r.line, r.reason) for r in _rows(p, "txt", _comp("txt"))] == [(1, None)]


def test_missing_text_column_in_parquet_or_arrow_schema_is_a_config_error(tmp_path):
    import datasets

    texts = [f"Source file number {i} with enough characters." for i in range(50)]
    pq.write_table(pa.table({"content": texts, "path": [str(i) for i in range(50)]}), tmp_path / "c.parquet")
    pq.write_table(pa.table({"content": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(tmp_path / "ds"))
    arrow = read.hf_disk_files(str(tmp_path / "ds"))[0]
    for path, fmt in ((str(tmp_path / "c.parquet"), "parquet"), (str(tmp_path / "empty.parquet"), "parquet"),
                      (arrow, "hf_disk")):
        with pytest.raises(ManifestError) as e:
            _rows(path, fmt, _comp(fmt, text_field="contents"))
        msg = str(e.value)
        assert path in msg and "'contents'" in msg and "'content'" in msg and "component 't'" in msg
    rows = list(read_rows(Unit(0, 0, str(tmp_path / "c.parquet"), "parquet", "c"),
                          _comp("parquet", text_field="content", id_field="path")))
    assert [r.id for r in rows] == [str(i) for i in range(50)] and rows[0].text == texts[0]


def test_wrong_text_field_fails_the_build_with_one_message(tmp_path, capsys):
    from pipeline.build import main

    data = tmp_path / "data"
    data.mkdir()
    texts = [f"Source file number {i} with enough characters to pass the filters." for i in range(20)]
    pq.write_table(pa.table({"content": texts}), data / "code.parquet")
    m = tmp_path / "m.yaml"
    m.write_text("name: pq\nroot: data\ncomponents:\n  - name: code\n    paths: [code.parquet]\n"
                 "    text_field: contents\n")
    rc = main(["--manifest", str(m), "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and err.startswith("error:") and str(data / "code.parquet") in err
    assert "columns: ['content']" in err
    assert not (tmp_path / "out" / "index.json").exists()


def test_multi_member_gzip_with_output_cap_matches_gzip_decompress(monkeypatch):
    """A member that ends after an earlier call was cut by the output cap ``_GZ_OUT``: zlib then still
    holds the input after the member in ``unconsumed_tail`` as well as in ``unused_data``; joining them
    read the following members twice (duplicated documents, or a corrupt stream dropping the rest).
    Random multi-member files, NUL padding between members, and cap/read sizes small enough that a
    boundary falls everywhere, against ``gzip.decompress``."""
    import io

    rng = random.Random(11)
    for _ in range(400):
        members = []
        for _ in range(rng.randint(1, 4)):
            n = rng.randint(0, 2000)
            raw = (bytes(rng.choice(b"ab\n") for _ in range(n)) if rng.random() < 0.5
                   else b"x" * rng.randint(1, 40) * rng.randint(1, 100))
            members.append(gzip.compress(raw, compresslevel=rng.choice([1, 9]))
                           + b"\0" * rng.choice([0, 0, 1, 5]))
        blob = b"".join(members)
        monkeypatch.setattr(read, "_GZ_OUT", rng.randint(1, 500))
        monkeypatch.setattr(read, "_CHUNK", rng.choice([1, 7, 64, 1 << 20]))
        want, got = gzip.decompress(blob), b""
        for out in read._decompressed(io.BytesIO(blob), "jsonl.gz"):
            got += out
            if len(got) > len(want):  # a repeated stream can grow without bound
                break
        assert got == want, (read._GZ_OUT, read._CHUNK, [len(m) for m in members])


def _unchecked_strings(vals: list[bytes], large: bool = False) -> pa.Array:
    """A string column whose data is not validated (as other writers produce): invalid UTF-8 allowed."""
    import numpy as np

    offs = np.cumsum([0] + [len(v) for v in vals]).astype(np.int64 if large else np.int32)
    return pa.Array.from_buffers(pa.large_string() if large else pa.string(), len(vals),
                                 [None, pa.py_buffer(offs.tobytes()), pa.py_buffer(b"".join(vals))])


@pytest.mark.parametrize("fmt", ["parquet", "hf_disk"])
@pytest.mark.parametrize("large", [False, True])
def test_invalid_utf8_in_a_string_column_drops_only_its_row(tmp_path, fmt, large):
    """One invalid UTF-8 value in a parquet/Arrow string column made ``to_pylist`` fail for the batch:
    the rest of the file became one ``unreadable`` row at the wrong line. Now that row alone is
    ``not_utf8`` with its own line; an invalid id does not cost the file either."""
    n = 1300  # more than one parquet batch (1024 rows)
    texts = [f"valid document number {i}".encode() for i in range(n)]
    texts[1100] = b"bad \xff\xfe bytes"
    ids = [f"id{i}".encode() for i in range(n)]
    ids[5] = b"id-\xff"
    t = pa.table({"text": _unchecked_strings(texts, large), "id": _unchecked_strings(ids, large)})
    if fmt == "parquet":
        path = str(tmp_path / "x.parquet")
        pq.write_table(t, path)
    else:
        path = str(tmp_path / "x.arrow")
        with pa.OSFile(path, "wb") as s, pa.ipc.new_stream(s, t.schema) as w:
            w.write_table(t, max_chunksize=1000)
    rows = _rows(path, fmt, _comp(fmt, id_field="id"))
    assert len(rows) == n
    assert [(r.line, r.reason) for r in rows if r.reason] == [(1101, "not_utf8")]
    assert rows[1100].raw == b"bad \xff\xfe bytes"
    assert [r.text for r in rows if r.reason is None] == [v.decode() for i, v in enumerate(texts) if i != 1100]
    assert rows[4].id == "id4" and rows[6].id == "id6" and rows[5].text == "valid document number 5"
    assert rows[5].id == "id-\\xff"  # kept, escaped (read.source_id)


def test_id_that_cannot_be_utf8_keeps_the_row_with_an_escaped_id(tmp_path):
    """A lone-surrogate id (``"\\udc80"`` escape) passed ``_doc_row`` unchecked and failed the Arrow write of
    the ingest file, aborting the build with a bare UnicodeEncodeError. The row is kept, its id escaped."""
    lines = [{"text": "a fine document", "id": "ok-1"}, {"text": "another fine document", "id": "bad-\udc80"},
             {"text": "a third document", "id": 7}]
    path = _write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in lines).encode(), "jsonl")
    comp = _comp("jsonl", id_field="id")
    assert [r.id for r in _rows(path, "jsonl", comp)] == ["ok-1", "bad-\\udc80", "7"]
    (tmp_path / "ingest").mkdir()
    meta = stages.ingest_unit(Unit(0, 0, path, "jsonl", "a.jsonl"), comp, str(tmp_path), None)
    assert meta["read"] == {"in": 3, "out": 3, "dropped": {}}
    with pa.memory_map(str(tmp_path / "ingest" / "c0000_f00000.arrow")) as src:
        t = pa.ipc.open_stream(src).read_all()
    assert sorted(t.column("source_id").to_pylist()) == sorted(["ok-1", "bad-\\udc80", "7"])


def test_zeros_before_the_first_gzip_member_are_unreadable_not_empty(tmp_path, monkeypatch):
    """NUL padding was skipped before the first member too: an all-zero .jsonl.gz (a crash's or a failed
    preallocated download's file) read as empty with nothing counted. ``gzip.decompress`` refuses it, and
    so does the reader now (one ``unreadable`` row); padding after a member is still skipped."""
    member = gzip.compress(b'{"text": "a fine document"}\n')
    for chunk in (1 << 20, 3):
        monkeypatch.setattr(read, "_CHUNK", chunk)
        for i, blob in enumerate([b"\0" * 65536, b"\0", b"\0\0" + member]):
            with pytest.raises(gzip.BadGzipFile):
                gzip.decompress(blob)
            path = str(tmp_path / f"z{i}.jsonl.gz")
            (tmp_path / f"z{i}.jsonl.gz").write_bytes(blob)
            rows = _rows(path, "jsonl.gz", _comp("jsonl.gz"))
            assert [(r.line, r.reason) for r in rows] == [(1, "unreadable")], (chunk, i)
        (tmp_path / "p.jsonl.gz").write_bytes(member + b"\0" * 100 + member + b"\0" * 9)
        rows = _rows(str(tmp_path / "p.jsonl.gz"), "jsonl.gz", _comp("jsonl.gz"))
        assert [(r.line, r.reason, r.text) for r in rows] == [(1, None, "a fine document"), (2, None, "a fine document")]


def test_every_bad_input_row_is_located_and_the_cap_says_how_many_more(tmp_path, monkeypatch):
    """Only the first 5 bad rows per reason were listed, so lines 12-40 of 20 invalid ones appeared in no
    output. Every bad input row now has a file:line record (the first 5 with a text sample); past
    QUARANTINE_LOCATIONS one record counts the rest. Filter drops stay samples."""
    good = json.dumps({"text": "A perfectly ordinary sentence about the weather and the sea."}).encode()
    lines = [good if i % 2 == 0 else b'{"text": "bad \xff byte"}' for i in range(40)]
    path = _write(tmp_path / "f.jsonl", b"\n".join(lines) + b"\n", "jsonl")
    (tmp_path / "ingest").mkdir()
    comp = _comp("jsonl")
    meta = stages.ingest_unit(Unit(0, 0, path, "jsonl", "f.jsonl"), comp, str(tmp_path), None)
    assert meta["read"]["dropped"] == {"not_utf8": 20}
    q = [x for x in meta["quarantine"] if x["reason"] == "not_utf8"]
    assert [x["line"] for x in q] == list(range(2, 41, 2))
    assert sum("sample" in x for x in q) == stages.QUARANTINE_PER_REASON and "sample" in q[0]

    monkeypatch.setattr(stages, "QUARANTINE_LOCATIONS", 3)
    (tmp_path / "w2" / "ingest").mkdir(parents=True)
    meta = stages.ingest_unit(Unit(0, 0, path, "jsonl", "f.jsonl"), comp, str(tmp_path / "w2"), None)
    q = [x for x in meta["quarantine"] if x["reason"] == "not_utf8"]
    assert [x.get("line") for x in q] == [2, 4, 6, None] and q[-1]["unlisted_rows"] == 17


def test_a_file_with_more_lines_than_a_key_numbers_is_an_error(tmp_path, monkeypatch):
    """Document keys hold the line in 32 bits: a longer file would have spilled into the file bits (wrong ids,
    colliding keys). Shown with the limit lowered to 3 lines."""
    monkeypatch.setattr(stages, "MAX_LINE", 3)
    path = _write(tmp_path / "f.jsonl", b"".join(json.dumps({"text": f"document number {i} " * 20}).encode() + b"\n"
                                                  for i in range(5)), "jsonl")
    (tmp_path / "ingest").mkdir()
    with pytest.raises(stages.InputTooLong, match=r"f\.jsonl: line 4 is past the 3 lines"):
        stages.ingest_unit(Unit(0, 0, path, "jsonl", "f.jsonl"), _comp("jsonl"), str(tmp_path), None)
    assert not list((tmp_path / "ingest").iterdir())       # nothing published


def test_a_deeply_nested_json_line_is_bad_json_and_reading_goes_on(tmp_path):
    """json.loads raises RecursionError (not ValueError) on deep nesting: that line alone is bad_json; the
    lines after it are still read (it used to end the file as one ``unreadable`` row, dropping them)."""
    deep = '{"text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    data = "\n".join([json.dumps({"text": "first document"}), deep, json.dumps({"text": "third document"})]) + "\n"
    path = _write(tmp_path / "deep.jsonl", data.encode(), "jsonl")
    rows = _rows(path, "jsonl", _comp("jsonl", max_doc_bytes=10**6))
    assert [(r.line, r.reason, r.text) for r in rows] == [(1, None, "first document"), (2, "bad_json", None),
                                                          (3, None, "third document")]


def test_a_zstd_stream_with_a_long_window_is_read(tmp_path):
    """`cat x.jsonl | zstd --long=31` writes a 2 GiB window into the frame header; the reader's default limit
    (128 MiB) turned the whole file into one ``unreadable`` row ("Frame requires too much memory")."""
    lines = [json.dumps({"text": f"document {i} with a few words"}).encode() + b"\n" for i in range(50)]
    params = zstandard.ZstdCompressionParameters(window_log=28, compression_level=1)  # 256 MiB > 128 MiB default
    co = zstandard.ZstdCompressor(compression_params=params).compressobj()  # streamed: the window stays in the header
    blob = co.compress(b"".join(lines)) + co.flush()
    assert zstandard.get_frame_parameters(blob).window_size == 2**28
    (tmp_path / "long.jsonl.zst").write_bytes(blob)
    rows = _rows(str(tmp_path / "long.jsonl.zst"), "jsonl.zst", _comp("jsonl.zst"))
    assert [r.reason for r in rows] == [None] * 50 and rows[-1].text == "document 49 with a few words"
