"""Stages without Ray: readers for every format, filters, exact dedup against a plain reference."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash
import zstandard

from pipeline import filters, stages
from pipeline.manifest import ComponentSpec, FilterConfig
from pipeline.read import Unit, read_rows

LINES = [
    b'{"id": "a", "text": "first document here"}',
    b'not json at all',
    b'{"id": "b", "body": "no text field"}',
    b'{"id": "c", "text": "caf\xe9"}',
    b'',
    b'{"id": "d", "text": ""}',
    b'[1, 2, 3]',
    b'{"id": "e", "text": "' + b"x" * 300 + b'"}',
    b'{"id": "f", "text": "\\ud800 lone surrogate"}',
    b'{"id": "g", "text": "last one"}',
]
EXPECT = [(1, None), (2, "bad_json"), (3, "missing_text"), (4, "not_utf8"), (5, "empty"), (6, "empty"),
          (7, "bad_json"), (8, "oversized"), (9, "not_utf8"), (10, None)]


def _comp(fmt: str, **kw) -> ComponentSpec:
    return ComponentSpec(name="t", paths=["x"], format=fmt, id_field="id",
                         filters=FilterConfig(max_doc_bytes=200), **kw)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_jsonl_readers_report_bad_rows_with_line_numbers(tmp_path, fmt):
    data = b"\n".join(LINES) + b"\n"
    path = tmp_path / f"f.{fmt}"
    if fmt == "jsonl.gz":
        data = gzip.compress(data)
    elif fmt == "jsonl.zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    rows = list(read_rows(Unit(0, 0, str(path), fmt, path.name), _comp(fmt)))
    assert [(r.line, r.reason) for r in rows] == EXPECT
    assert rows[0].text == "first document here" and rows[0].id == "a"
    assert rows[-1].text == "last one"


def test_parquet_hf_disk_and_txt_readers(tmp_path):
    import datasets

    recs = [{"id": "p1", "text": "alpha doc"}, {"id": "p2", "text": None}, {"id": "p3", "text": " "},
            {"id": "p4", "text": "omega doc"}]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "f.parquet")
    rows = list(read_rows(Unit(0, 0, str(tmp_path / "f.parquet"), "parquet", "f.parquet"), _comp("parquet")))
    assert [(r.line, r.reason, r.id) for r in rows] == [(1, None, "p1"), (2, "missing_text", None),
                                                        (3, "empty", None), (4, None, "p4")]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    from pipeline.read import hf_disk_files

    files = hf_disk_files(str(tmp_path / "ds"))
    rows = list(read_rows(Unit(0, 0, files[0], "hf_disk", "ds"), _comp("hf_disk")))
    assert [(r.line, r.reason) for r in rows] == [(1, None), (2, "missing_text"), (3, "empty"), (4, None)]
    (tmp_path / "t.txt").write_bytes("один документ\nна файл".encode())
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe broken")
    assert next(read_rows(Unit(0, 0, str(tmp_path / "t.txt"), "txt", "t.txt"), _comp("txt"))).text == \
        "один документ\nна файл"
    assert next(read_rows(Unit(0, 0, str(tmp_path / "bad.txt"), "txt", "b"), _comp("txt"))).reason == "not_utf8"


def test_filters_each_reason_and_clean_text():
    cfg = FilterConfig(min_chars=10, max_chars=5000, max_dup_line_frac=0.3, max_char_run=50, min_distinct_chars=5)
    assert filters.check("Ein ganz normaler Absatz über Flüsse und Berge.", cfg) is None
    assert filters.check("这是一个正常的中文句子，没有任何问题。", cfg) is None
    assert filters.check("short", cfg) == "too_short"
    assert filters.check("word " * 2000, cfg) == "too_long"
    assert filters.check("abab abab abab", cfg) == "low_diversity"
    assert filters.check("Hello there, friend" + "!" * 80, cfg) == "char_run"
    assert filters.check("\n".join(["spam line here"] * 8 + ["one different line"]), cfg) == "dup_lines"
    code = "def f(x):\n    return x\n\n\ndef g(y):\n    return y\n"
    assert filters.check(code, cfg) is None  # blank lines do not count as repeats


def _exact_reference(docs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    first: dict[str, int] = {}
    out = []
    for key, text in sorted(docs):
        if text in first:
            out.append((key, first[text]))
        else:
            first[text] = key
    return out


def test_exact_duplicates_match_plain_reference(tmp_path):
    rng = random.Random(0)
    pool = [f"doc {i} " + "x" * rng.randint(0, 30) for i in range(60)]
    paths, docs = [], []
    for u in range(4):
        keys = sorted(rng.sample(range(1, 10_000), 50))
        keys = [(u << 32) | k for k in keys]
        texts = [rng.choice(pool) for _ in keys]
        docs += list(zip(keys, texts))
        t = pa.table({"key": pa.array(keys, pa.int64()), "id": [str(k) for k in keys],
                      "text": pa.array(texts, pa.large_string()),
                      "hash": pa.array([xxhash.xxh3_128_digest(t.encode()) for t in texts], pa.binary(16))})
        p = str(tmp_path / f"u{u}.arrow")
        with pa.OSFile(p, "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
            w.write_table(t, max_chunksize=17)  # several chunks: offsets inside the hash buffers
        paths.append(p)
    rng.shuffle(paths)  # order of units must not matter
    removed, of = stages.exact_duplicates(paths)
    ref = _exact_reference(docs)
    assert list(zip(removed.tolist(), of.tolist())) == ref
    assert len(ref) > 50
    parts = [stages.exact_duplicates(paths, p, 3) for p in range(3)]  # hash-partitioned, as on Ray
    assert all(len(r) for r, _ in parts)
    merged = sorted(zip(np.concatenate([r for r, _ in parts]).tolist(), np.concatenate([o for _, o in parts]).tolist()))
    assert merged == ref


def test_exact_duplicates_with_an_empty_hash_partition(tmp_path):
    """A part whose hash class holds no document (one spam text repeated, fewer distinct contents than
    parts) crashed with IndexError after the partition filter; it now removes nothing."""
    texts = ["same spam text"] * 3
    t = pa.table({"key": pa.array([1, 2, 3], pa.int64()), "id": ["a:1", "a:2", "a:3"],
                  "text": pa.array(texts, pa.large_string()),
                  "hash": pa.array([xxhash.xxh3_128_digest(x.encode()) for x in texts], pa.binary(16))})
    p = str(tmp_path / "u.arrow")
    with pa.OSFile(p, "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
        w.write_table(t)
    for parts in (2, 3, 5):
        got = [stages.exact_duplicates([p], i, parts) for i in range(parts)]
        assert sorted(len(r) for r, _ in got) == [0] * (parts - 1) + [2]
        assert sorted(zip(np.concatenate([r for r, _ in got]).tolist(), np.concatenate([o for _, o in got]).tolist())) \
            == [(2, 1), (3, 1)]


def test_atomic_json_roundtrip(tmp_path):
    p = str(tmp_path / "m.json")
    stages.atomic_write_json(p, {"b": 1, "a": [1, 2], "z": "ünï"})
    assert stages.read_json(p) == {"a": [1, 2], "b": 1, "z": "ünï"}
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]
    assert json.loads(open(p).read())["z"] == "ünï"


def test_char_run_fast_path_matches_regex_reference():
    rng = random.Random(1)
    for _ in range(5000):
        limit = rng.choice([1, 2, 3, 5, 8, 13, 50, 200])
        alph = rng.choice(["ab", "abc", "a", "xyz \n", "日本"])
        t = "".join(rng.choice(alph) for _ in range(rng.randint(0, 400)))
        if rng.random() < 0.5:
            i = rng.randint(0, len(t))
            t = t[:i] + rng.choice(alph) * rng.randint(max(0, limit - 1), limit + 2) + t[i:]
        assert filters.has_char_run(t, limit) == filters.has_char_run_reference(t, limit), (t, limit)


def test_dup_line_fast_path_matches_reference():
    rng = random.Random(2)
    pool = ["", "  ", "}", "    return x", "return x", "a line of prose here", "another line of text", "\t"]
    for _ in range(5000):
        text = "\n".join(rng.choice(pool) for _ in range(rng.randint(0, 12)))
        assert filters.dup_line_frac(text) == filters.dup_line_frac_reference(text), repr(text)


def test_arrow_tokenizer_fast_path_matches_public_batch_api():
    from tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    rng = random.Random(3)
    words = ["hello", "世界", "Привет", "مرحبا", "\n\n", "def f(x):", " ", "ünïcödé", "🙂", "नमस्ते"]
    texts = ["".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    arr = pa.array(texts, pa.large_string())
    for a in (arr, arr.slice(17, 150), pa.array(texts[:5], pa.string())):
        fast_ids, fast_offs = stages.encode_arrow_texts(tok, a)
        ref_ids, ref_offs = stages.encode_arrow_texts_reference(tok, a)
        assert fast_ids.dtype == np.uint16
        assert np.array_equal(fast_offs, ref_offs) and np.array_equal(fast_ids, ref_ids)
        assert fast_ids[fast_offs[1]: fast_offs[2]].tolist() == tok.encode(a[1].as_py())


def test_url_paths_go_through_fsspec(tmp_path):
    from pipeline.build import build
    from pipeline.executor import LocalExecutor
    from pipeline.manifest import load_manifest

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "a document that lives behind a URL"}\n{"text": 5}\n')
    (tmp_path / "m.yaml").write_text(f"name: url\ncomponents:\n  - name: remote\n"
                                     f"    paths: ['file://{tmp_path}/d/*.jsonl']\n    format: jsonl\n")
    m = load_manifest(str(tmp_path / "m.yaml"))
    assert m.components[0].files == [f"file://{tmp_path}/d/a.jsonl"]
    report = build(m, str(tmp_path / "out"), LocalExecutor(), progress=False)
    assert report["components"]["remote"]["read"] == {"in": 2, "out": 1, "dropped": {"missing_text": 1}}
    assert report["totals"]["documents"] == 1


def test_truncated_and_corrupt_files_are_counted_not_fatal(tmp_path):
    from pipeline.read import safe_rows

    rng = random.Random(4)
    good = b"".join(b'{"text": "document number %d is fine %s"}\n' % (i, rng.randbytes(60).hex().encode())
                    for i in range(40000))
    gz = gzip.compress(good)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    rows = list(safe_rows(Unit(0, 0, str(tmp_path / "cut.jsonl.gz"), "jsonl.gz", "cut.jsonl.gz"), _comp("jsonl.gz")))
    assert rows[-1].reason == "unreadable" and "EOFError" in rows[-1].raw
    assert rows[0].text.startswith("document number 0 is fine") and all(r.reason is None for r in rows[:-1])
    assert len(rows) > 1000
    assert rows[-1].line == len(rows)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 definitely not parquet")
    rows = list(safe_rows(Unit(0, 0, str(tmp_path / "bad.parquet"), "parquet", "bad.parquet"), _comp("parquet")))
    assert [(r.line, r.reason) for r in rows] == [(1, "unreadable")]


def _one_shot_prefix(fmt: str, blob: bytes) -> bytes:
    """Everything a decoder can recover from a truncated single-member/frame ``blob``."""
    import zlib

    d = zlib.decompressobj(31) if fmt == "jsonl.gz" else zstandard.ZstdDecompressor().decompressobj()
    return d.decompress(blob)


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
@pytest.mark.parametrize("cut", [0.35, 0.67, 0.999])
def test_truncated_compressed_file_keeps_every_complete_line(tmp_path, fmt, cut):
    from pipeline.read import safe_rows

    rng = random.Random(7)
    lines = [b'{"text": "doc %d %s"}\n' % (i, rng.randbytes(rng.randrange(5, 90)).hex().encode())
             for i in range(30000)]
    body = b"".join(lines)
    blob = gzip.compress(body) if fmt == "jsonl.gz" else zstandard.ZstdCompressor().compress(body)
    blob = blob[: int(len(blob) * cut)]
    complete = _one_shot_prefix(fmt, blob).count(b"\n")
    assert 0 < complete < len(lines)
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(blob)
    rows = list(safe_rows(Unit(0, 0, str(path), fmt, path.name), _comp(fmt)))
    docs = [r for r in rows if r.reason is None]
    assert len(docs) == complete and len(rows) == complete + 1
    assert [r.line for r in docs] == list(range(1, complete + 1))
    assert [r.text for r in docs] == [json.loads(x)["text"] for x in lines[:complete]]
    assert rows[-1].reason == "unreadable" and rows[-1].line == complete + 1
    assert "EOFError" in rows[-1].raw


@pytest.mark.parametrize("chunk", [1 << 20, 7])
def test_multi_member_gzip_and_multi_frame_zstd_read_fully(tmp_path, monkeypatch, chunk):
    from pipeline import read

    monkeypatch.setattr(read, "_CHUNK", chunk)  # 7: members, frames and lines split across reads
    lines = [b'{"text": "line %d"}\n' % i for i in range(500)]
    parts = [b"".join(lines[:123]), b"".join(lines[123:400]), b"".join(lines[400:])[:-1]]  # no final \n
    z = zstandard.ZstdCompressor(write_content_size=False).compressobj()  # streamed: no size in header
    cases = {
        "jsonl.gz": gzip.compress(parts[0]) + b"\0" * 7 + gzip.compress(parts[1]) + gzip.compress(parts[2]),
        "jsonl.zst": b"".join(zstandard.ZstdCompressor().compress(p) for p in parts[:2])
        + z.compress(parts[2]) + z.flush(),
    }
    for fmt, blob in cases.items():
        path = tmp_path / f"m.{fmt}"
        path.write_bytes(blob)
        rows = list(read_rows(Unit(0, 0, str(path), fmt, path.name), _comp(fmt)))
        assert [(r.line, r.reason, r.text) for r in rows] == \
            [(i + 1, None, f"line {i}") for i in range(500)], fmt
    (tmp_path / "e.jsonl.gz").write_bytes(b"")
    assert list(read_rows(Unit(0, 0, str(tmp_path / "e.jsonl.gz"), "jsonl.gz", "e"), _comp("jsonl.gz"))) == []


def test_ingest_saves_num_perm_wide_signatures_for_a_file_without_documents(tmp_path):
    from pipeline.manifest import NearDedupSettings

    (tmp_path / "ingest").mkdir()
    src = tmp_path / "e.jsonl"
    src.write_bytes(b'{"id": "a", "body": "no text"}\n\n')
    near = NearDedupSettings(enabled=True, params={"num_perm": 32})
    meta = stages.ingest_unit(Unit(0, 0, str(src), "jsonl", "e.jsonl"), _comp("jsonl"), str(tmp_path), near)
    assert meta["read"]["out"] == 0
    sig = np.load(tmp_path / "ingest" / "c0000_f00000.sig.npy")
    assert sig.shape == (0, 32) and sig.dtype == np.uint32
    keys, sigs = stages.load_signatures(str(tmp_path / "ingest" / "c0000_f00000.arrow"), np.zeros(0, np.int64))
    assert keys.shape == (0,) and sigs.shape == (0, 32)


def test_dictionary_and_view_text_columns_are_read(tmp_path):
    texts = ["first document text", None, "second document", "first document text"]
    cols = {
        "dict": pa.array(texts).dictionary_encode(),
        "view": pa.array(texts, pa.string_view()),
        "large_dict": pa.array(texts, pa.large_string()).dictionary_encode(),
        "binary_view": pa.array([None if t is None else t.encode() for t in texts], pa.binary_view()),
        "binary_dict": pa.array([None if t is None else t.encode() for t in texts], pa.binary()).dictionary_encode(),
    }
    for name, col in cols.items():
        table = pa.table({"text": col, "id": ["a", "b", "c", "d"]})
        pq.write_table(table, tmp_path / f"{name}.parquet", store_schema=True)
        with pa.OSFile(str(tmp_path / f"{name}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        for fmt, ext in (("parquet", "parquet"), ("hf_disk", "arrow")):
            path = str(tmp_path / f"{name}.{ext}")
            rows = list(read_rows(Unit(0, 0, path, fmt, name), _comp(fmt)))
            assert [(r.line, r.reason, r.text, r.id) for r in rows] == [
                (1, None, texts[0], "a"), (2, "missing_text", None, None), (3, None, texts[2], "c"),
                (4, None, texts[3], "d")], (name, fmt)


@pytest.mark.parametrize("sep", ["\r", "\r\n", "\u2028", "\x85", "\x0c", "\n"])
def test_dup_lines_counts_every_line_break_splitlines_knows(sep):
    cfg = FilterConfig(min_chars=10, max_dup_line_frac=0.3, min_distinct_chars=5)
    text = sep.join(["spam line here"] * 8 + ["one different line"])
    assert filters.check_reference(text, cfg) == "dup_lines"
    assert filters.check(text, cfg) == "dup_lines"


def test_check_fast_path_matches_reference():
    rng = random.Random(5)
    seps = ["\n", "\r", "\r\n", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x85", "\t", " "]
    pool = ["", "  ", "}", "a line of prose here", "another line of text", "zzzzzzzzzzzz", "ab", "日本語の行です"]
    cfgs = [FilterConfig(min_chars=5, max_chars=300, max_dup_line_frac=f, max_char_run=r, min_distinct_chars=d)
            for f, r, d in ((0.3, 8, 4), (0.0, 0, 1), (0.5, 11, 9), (1.0, 3, 0))]
    for _ in range(4000):
        text = "".join(rng.choice(pool) + rng.choice(seps) for _ in range(rng.randint(0, 10)))
        for cfg in cfgs:
            assert filters.check(text, cfg) == filters.check_reference(text, cfg), (repr(text), cfg)


def test_sorted_member_matches_isin():
    """sorted_member (binary search on the sorted removed keys, used per file and per batch) against np.isin."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        n, m, hi = rng.integers(0, 300), rng.integers(0, 300), int(rng.choice([5, 1000, 1 << 54]))
        keys = rng.integers(0, hi, n, dtype=np.int64)
        members = np.sort(np.concatenate([rng.integers(0, hi, m, dtype=np.int64), rng.choice(keys, min(n, m // 2))]))
        assert np.array_equal(stages.sorted_member(keys, members), np.isin(keys, members)), (keys, members)
    assert stages.sorted_member(np.zeros(0, np.int64), np.arange(3)).shape == (0,)


def test_text_batches_cut_by_rows_and_bytes_and_keep_every_row():
    """tokenize_unit's batches: every row once, in order; at most `rows` rows and `nbytes` plus the first
    document's bytes; a document larger than the budget is a batch of its own."""
    from pipeline.stages import _text_batches

    rng = np.random.default_rng(1)
    lens = (rng.integers(0, 40, 300) * (rng.random(300) > 0.1)).tolist()
    lens[7] = 500
    texts = ["y" * n for n in lens]
    t = pa.concat_tables([pa.table({"key": np.arange(a, b), "text": pa.array(texts[a:b], pa.large_string())})
                          for a, b in ((0, 0), (0, 120), (120, 121), (121, 300))])
    for rows, nbytes in ((2048, 1 << 20), (7, 1 << 20), (2048, 64), (5, 33), (2048, 1)):
        parts = list(_text_batches(t, rows, nbytes))
        assert pa.concat_tables([pa.Table.from_batches([p]) for p in parts]).to_pylist() == t.to_pylist()
        for p in parts:
            size = [len(x) for x in p.column("text").to_pylist()]
            assert 0 < len(size) <= rows and sum(size) <= nbytes + size[0], (rows, nbytes, size)


def test_ingest_batches_end_at_the_byte_budget(tmp_path, monkeypatch):
    """Book-sized documents: an ingest batch ends once its text reaches BATCH_BYTES (a document larger than the
    budget is a batch of its own); the ingest table, signatures and quarantine records are those of the
    default batching, and so is tokenization of those batches."""
    from pipeline.manifest import NearDedupSettings

    rng = random.Random(3)
    words = ["river", "hill", "boat", "dawn", "harbour", "ship", "weather", "meadow", "forest", "signal"]
    lines = []
    for i in range(60):
        n = rng.choice([3, 40, 200, 900])
        lines.append(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(words) for _ in range(n)) + f" {i}."}))
        if i % 11 == 5:
            lines.append("{bad json")
        if i % 13 == 2:
            lines.append(json.dumps({"id": f"s{i}", "text": "tiny"}))   # dropped by the min_chars filter
    src = tmp_path / "b.jsonl"
    src.write_text("\n".join(lines) + "\n")
    comp = ComponentSpec(name="b", paths=["x"], format="jsonl", id_field="id", filters=FilterConfig(min_chars=20))
    near = NearDedupSettings(enabled=True, params={"num_perm": 32})
    tok = None
    got = {}
    default = stages.BATCH_BYTES
    for budget in (default, 1000):
        monkeypatch.setattr(stages, "BATCH_BYTES", budget)
        work = tmp_path / str(budget)
        (work / "ingest").mkdir(parents=True)
        (work / "tok").mkdir()
        meta = stages.ingest_unit(Unit(0, 0, str(src), "jsonl", "b.jsonl"), comp, str(work), near)
        ingest = stages.read_arrow(str(work / "ingest" / "c0000_f00000.arrow"))
        if tok is None:
            from tokenizer import WorldTokenizer

            tok = WorldTokenizer()
        stages.tokenize_unit("c0000_f00000", str(work), np.zeros(0, np.int64), tok)
        got[budget] = (ingest.to_pylist(), np.load(work / "ingest" / "c0000_f00000.sig.npy").tolist(),
                       meta["quarantine"], stages.read_arrow(str(work / "tok" / "c0000_f00000.arrow")).to_pylist())
        sizes = [[len(t.encode()) for t in b.column("text").to_pylist()] for b in ingest.to_batches()]
    assert got[1000] == got[default]
    assert len(sizes) > 10 and all(sum(s[:-1]) < 1000 for s in sizes)
    assert any(len(s) == 1 and s[0] > 1000 for s in sizes) and any(len(s) > 1 for s in sizes)
    assert [q["line"] for q in got[1000][2]] == sorted(q["line"] for q in got[1000][2])
    assert {q["stage"] for q in got[1000][2]} == {"read", "filter"}


def test_text_batches_take_string_columns_of_older_ingest_files():
    """Ingest files of builds before 23cd41b hold `string` text (int32 offsets): reading them as int64 offsets
    raised (odd row counts) or cut at garbage offsets (even ones) on resume."""
    import numpy as np
    import pyarrow as pa

    from pipeline import stages

    texts = ["a" * 10, "b" * 20, "c" * 5, "d" * 7, "e" * 3]
    for n in (4, 5):
        small = pa.table({"key": np.arange(n), "text": pa.array(texts[:n], pa.string())})
        large = small.cast(pa.schema([("key", pa.int64()), ("text", pa.large_string())]))
        got = [b.column("text").to_pylist() for b in stages._text_batches(small, 2048, 16)]
        assert got == [b.column("text").to_pylist() for b in stages._text_batches(large, 2048, 16)]
        assert sum(got, []) == texts[:n]
