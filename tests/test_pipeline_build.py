"""End to end on the sample manifest, in-process (LocalExecutor): counts, formats, resume, SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import stages
from pipeline.build import build
from pipeline.executor import LocalExecutor
from pipeline.manifest import load_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "corpus_manifests", "sample.yaml")


def output_files(out: str) -> dict[str, bytes]:
    """Everything that must be byte-identical between runs: shards and index."""
    files = {"index.json": open(os.path.join(out, "index.json"), "rb").read(),
             "duplicates.jsonl": open(os.path.join(out, "duplicates.jsonl"), "rb").read(),
             "quarantine.jsonl": open(os.path.join(out, "quarantine.jsonl"), "rb").read()}
    for name in sorted(os.listdir(os.path.join(out, "shards"))):
        files[f"shards/{name}"] = open(os.path.join(out, "shards", name), "rb").read()
    return files


@pytest.fixture(scope="module")
def sample_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sample") / "out")
    report = build(load_manifest(SAMPLE), out, LocalExecutor(), progress=False)
    return out, report


def test_index_and_shards_are_consistent(sample_out):
    import datasets

    out, report = sample_out
    index = json.load(open(os.path.join(out, "index.json")))
    assert index["schema_version"] == 1
    assert index["tokenizer"]["name"] == "rwkv_vocab_v20230424" and index["tokenizer"]["eod_id"] == 0
    assert len(index["tokenizer"]["sha256"]) == 64
    assert len(index["shards"]) >= 2
    docs = toks = 0
    for s in index["shards"]:
        path = os.path.join(out, s["path"])
        data = open(path, "rb").read()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
        table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
        assert table.schema.names == ["id", "component", "input_ids", "source_id"]
        assert table.schema.field("input_ids").type == pa.list_(pa.uint16())
        ds = datasets.Dataset.from_file(path)
        assert len(ds) == table.num_rows == s["documents"]
        assert ds[0]["input_ids"] == table.column("input_ids")[0].as_py()
        n = sum(len(x) for x in ds["input_ids"])
        assert n == s["tokens"]
        assert all(len(x) > 0 and 0 not in x for x in table.column("input_ids").to_pylist())
        docs += s["documents"]
        toks += n
    assert index["totals"] == {"documents": docs, "tokens": toks}
    assert sum(c["documents"] for c in index["components"].values()) == docs
    assert sum(c["tokens"] for c in index["components"].values()) == toks
    assert index["components"]["wiki"]["weight"] == 2.0


def test_every_stage_does_something_and_counts_add_up(sample_out):
    out, _ = sample_out
    comps = json.load(open(os.path.join(out, "index.json")))["components"]
    reasons = {}
    for name, c in comps.items():
        st = c["stages"]
        order = ["read", "filter", "exact_dedup", "near_dedup", "tokenize"]
        for a, b in zip(order[:-1], order[1:]):
            assert st[a]["out"] == st[b]["in"], (name, a, b)
        for s in order:
            assert st[s]["in"] - st[s]["out"] == sum(st[s]["dropped"].values()), (name, s)
            for r, n in st[s]["dropped"].items():
                reasons[(s, r)] = reasons.get((s, r), 0) + n
        assert st["tokenize"]["out"] == c["documents"]
    for r in ("bad_json", "missing_text", "not_utf8", "empty", "oversized"):
        assert reasons.get(("read", r), 0) >= 1, r
    for r in ("too_short", "dup_lines", "char_run", "low_diversity"):
        assert reasons.get(("filter", r), 0) >= 1, r
    assert reasons[("exact_dedup", "duplicate")] >= 4
    assert reasons[("near_dedup", "near_duplicate")] >= 2


def test_quarantine_and_duplicates_files(sample_out):
    out, report = sample_out
    q = [json.loads(ln) for ln in open(os.path.join(out, "quarantine.jsonl"))]
    bad_json = next(x for x in q if x["reason"] == "bad_json")
    assert bad_json["component"] == "wiki" and bad_json["file"].startswith("wiki/part-")
    line = open(os.path.join(REPO, "corpus_manifests", "sample", bad_json["file"]), "rb").read().split(b"\n")[
        bad_json["line"] - 1]
    assert b"unterminated" in line
    dups = [json.loads(ln) for ln in open(os.path.join(out, "duplicates.jsonl"))]
    ex = next(d for d in dups if d.get("source_id") == "wiki-dup-exact")
    assert ex["stage"] == "exact_dedup" and ex["duplicate_of_source_id"].startswith("wiki-")
    assert ex["id"].startswith("wiki/wiki/part-") and ex["duplicate_of"].startswith("wiki/wiki/part-")
    assert any(d["stage"] == "near_dedup" and d.get("source_id") in ("wiki-dup-near", "wiki-near-src") for d in dups)
    shard_ids = []
    for s in json.load(open(os.path.join(out, "index.json")))["shards"]:
        shard_ids += pa.ipc.open_stream(pa.memory_map(os.path.join(out, s["path"]))).read_all().column("id").to_pylist()
    assert len(set(shard_ids)) == len(shard_ids)
    shard_ids = set(shard_ids)
    assert not shard_ids & {d["id"] for d in dups}
    assert {d["duplicate_of"] for d in dups} <= shard_ids
    assert report["duplicates"]["exact"] + report["duplicates"]["near"] == len(dups)


def test_tokens_match_the_rwkv_package_tokenizer(sample_out):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from tokenizer.vocab import VOCAB_PATH

    out, _ = sample_out
    ref = TRIE_TOKENIZER(str(VOCAB_PATH))
    texts = {}
    for name in sorted(os.listdir(os.path.join(out, "work", "ingest"))):
        if name.endswith(".arrow"):
            t = stages.read_arrow(os.path.join(out, "work", "ingest", name))
            texts.update(zip(t.column("id").to_pylist(), t.column("text").to_pylist()))
    table = pa.ipc.open_stream(pa.memory_map(os.path.join(out, "shards", "00000.arrow"))).read_all()
    checked = 0
    for i in range(0, table.num_rows, max(1, table.num_rows // 25)):
        doc_id = table.column("id")[i].as_py()
        assert table.column("input_ids")[i].as_py() == ref.encode(texts[doc_id]), doc_id
        checked += 1
    assert checked >= 20


def test_rerun_resumes_and_is_identical(sample_out, tmp_path):
    out, _ = sample_out
    before = output_files(out)
    tok_marker = os.path.join(out, "work", "tok", "c0000_f00001.json")
    os.remove(tok_marker)  # lose one unit's tokenization and one shard
    os.remove(os.path.join(out, "shards", "00001.arrow"))
    mtime = os.path.getmtime(os.path.join(out, "work", "ingest", "c0000_f00000.json"))
    build(load_manifest(SAMPLE), out, LocalExecutor(), progress=False)
    assert output_files(out) == before
    assert os.path.getmtime(os.path.join(out, "work", "ingest", "c0000_f00000.json")) == mtime  # skipped


def test_other_settings_on_same_out_refused(sample_out):
    from pipeline.build import BuildError

    out, _ = sample_out
    with pytest.raises(BuildError, match="different settings"):
        build(load_manifest(SAMPLE), out, LocalExecutor(), progress=False, near=False)


def kill_when(cmd: list[str], ready, timeout: float = 300, env=None) -> int:
    """Start ``cmd``, SIGKILL it by pid as soon as ``ready()`` holds; its return code."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while p.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.002)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    return p.wait()


def progress_points(out: str) -> list:
    """Moments inside a build, in the order a build reaches them (each resumed run gets further)."""
    work = os.path.join(out, "work")

    def count(sub: str, ext: str) -> int:
        d = os.path.join(work, sub)
        return sum(n.endswith(ext) for n in os.listdir(d)) if os.path.isdir(d) else 0

    return [lambda: os.path.exists(os.path.join(work, "build.json")),
            lambda: count("ingest", ".json") >= 1,
            lambda: os.path.exists(os.path.join(work, "dedup.arrow")),
            lambda: count("tok", ".json") >= 1,
            lambda: count("shards", ".json") >= 1]


def test_sigkill_driver_at_several_points_then_rerun_is_identical(sample_out, tmp_path):
    ref, _ = sample_out
    expect = output_files(ref)
    out = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(REPO, "pipeline", "build.py"), "--manifest", SAMPLE, "--executor", "local",
           "--no-progress", "--out", out]
    codes = [kill_when(cmd, ready) for ready in progress_points(out)]
    assert codes.count(-signal.SIGKILL) >= 3, codes  # most kills landed mid-build
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert output_files(out) == expect


def _tiny_manifest(tmp_path, near: str) -> str:
    (tmp_path / "in").mkdir(exist_ok=True)
    docs = [f"document number {i} talks about rivers, hills and {i * 7} small boats" for i in range(30)]
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    p = tmp_path / "m.yaml"
    p.write_text(f"name: tiny\nroot: in\nshard_tokens: 200\nnear_dedup: {{{near}}}\n"
                 f"components:\n  - {{name: a, paths: [a.jsonl]}}\n")
    return str(p)


@pytest.mark.parametrize("near, mode", [("enabled: true, ray_min_docs: 1", "ray"),
                                        ("enabled: true, ray_min_docs: 31", "local"),
                                        ("enabled: true", "local")])
def test_near_dedup_ray_min_docs_from_the_manifest_decides_the_mode(tmp_path, monkeypatch, near, mode):
    """On a Ray executor the manifest's ``near_dedup.ray_min_docs`` (30 documents here) picks Ray or
    the driver; the near-dedup call itself is then run locally so that no cluster starts."""
    from pipeline import build as build_mod

    seen = []
    orig = stages.near_duplicates

    def spy(paths, removed, nd, on_band=None):
        seen.append(nd.params["mode"])
        return orig(paths, removed, type(nd)(enabled=True, threshold=nd.threshold,
                                             params={**nd.params, "mode": "local"}), on_band)

    class RayNamed(LocalExecutor):
        name = "ray"

    monkeypatch.setattr(build_mod.stages, "near_duplicates", spy)
    build(load_manifest(_tiny_manifest(tmp_path, near)), str(tmp_path / "out"), RayNamed(), progress=False)
    assert seen == [mode]


def test_foreign_arrow_files_in_shards_are_left_alone(tmp_path):
    m = _tiny_manifest(tmp_path, "enabled: false")
    out = tmp_path / "out"
    build(load_manifest(m), str(out), LocalExecutor(), progress=False)
    shards = out / "shards"
    n = len(json.load(open(out / "index.json"))["shards"])
    assert n >= 2
    before = output_files(str(out))
    foreign = ["notes.arrow", "1.arrow", "000001.arrow", "abcde.arrow"]
    for name in foreign:
        (shards / name).write_bytes(b"not mine")
    (shards / f"{n + 3:05d}.arrow").write_bytes(b"left over from a larger plan")
    build(load_manifest(m), str(out), LocalExecutor(), progress=False)
    assert not (shards / f"{n + 3:05d}.arrow").exists()
    assert all((shards / name).read_bytes() == b"not mine" for name in foreign)
    after = output_files(str(out))
    assert {k: v for k, v in after.items() if k.removeprefix("shards/") not in foreign} == before


def _tiny_build(tmp_path, files: dict[str, list[dict]], manifest_body: str, **kw):
    data = tmp_path / "data"
    for rel, docs in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "m.yaml").write_text("name: t\nroot: data\n" + manifest_body)
    out = str(tmp_path / "out")
    return out, build(load_manifest(str(tmp_path / "m.yaml")), out, LocalExecutor(), progress=False, **kw)


def _shard_rows(out: str) -> list[dict]:
    rows = []
    for s in json.load(open(os.path.join(out, "index.json")))["shards"]:
        rows += pa.ipc.open_stream(pa.memory_map(os.path.join(out, s["path"]))).read_all().to_pylist()
    return rows


def test_an_input_edited_in_place_is_not_resumed_silently(tmp_path):
    """The resume fingerprint used to be path + size: an edited file of the same size was skipped and the
    old text published. Now the re-run is refused naming the file; --force rebuilds with the new text."""
    from pipeline.build import BuildError
    from tokenizer import WorldTokenizer

    body = "components:\n  - name: a\n    paths: [a.jsonl]\n"
    old, new = "The committee approved the budget on Monday morning.", "The committee REJECTED the budget on Monday evening."
    out, _ = _tiny_build(tmp_path, {"a.jsonl": [{"text": old}]}, body)
    path = tmp_path / "data" / "a.jsonl"
    st = os.stat(path)
    path.write_text(json.dumps({"text": new}) + "\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert os.path.getsize(path) == st.st_size
    with pytest.raises(BuildError, match="a.jsonl"):
        _tiny_build(tmp_path, {}, body)
    out, _ = _tiny_build(tmp_path, {}, body, force=True)
    assert WorldTokenizer().decode(_shard_rows(out)[0]["input_ids"]) == new


def test_ids_are_unique_when_inputs_repeat_their_own_ids(tmp_path):
    """Source ids 1, 2 in two files used to become duplicate shard ids, and duplicates.jsonl named an id
    still in the output. Shard ids are component/file:line; the input's id is kept as source_id."""
    a = "Alpha document about rivers, mountains and the weather in spring."
    b = "Bravo document describing compilers, linkers and loaders in detail."
    files = {"wiki/part-0.jsonl": [{"id": 1, "text": a}, {"id": 2, "text": b}],
             "wiki/part-1.jsonl": [{"id": 1, "text": b + " Extra."}, {"id": 2, "text": a}]}
    out, _ = _tiny_build(tmp_path, files, "components:\n  - name: wiki\n    paths: ['wiki/*.jsonl']\n"
                                          "    id_field: id\n")
    rows = _shard_rows(out)
    assert [(r["id"], r["source_id"]) for r in rows] == [
        ("wiki/wiki/part-0.jsonl:1", "1"), ("wiki/wiki/part-0.jsonl:2", "2"), ("wiki/wiki/part-1.jsonl:1", "1")]
    (dup,) = [json.loads(ln) for ln in open(os.path.join(out, "duplicates.jsonl"))]
    assert dup["id"] == "wiki/wiki/part-1.jsonl:2" and dup["duplicate_of"] == "wiki/wiki/part-0.jsonl:1"
    assert dup["source_id"] == "2" and dup["duplicate_of_source_id"] == "1"


def test_duplicate_of_names_a_kept_document(tmp_path):
    """An exact duplicate whose twin is then removed by near dedup used to point at that removed twin."""
    base = ("The river Thames flows through southern England, passing Oxford, Reading, Windsor and London "
            "before it reaches the North Sea at the estuary near Southend. Its length is about 346 km.")
    near = base.replace("346 km", "346 kilometres")
    other = "Completely unrelated text about compilers, linkers, loaders and the shape of object files in ELF."
    files = {"a1.jsonl": [{"text": base}, {"text": other}], "a2.jsonl": [{"text": near}],
             "b.jsonl": [{"text": near}]}
    out, _ = _tiny_build(tmp_path, files, "near_dedup: {enabled: true, threshold: 0.7}\ncomponents:\n"
                                          "  - name: a\n    paths: ['a*.jsonl']\n  - name: b\n    paths: [b.jsonl]\n")
    kept = {r["id"] for r in _shard_rows(out)}
    dups = [json.loads(ln) for ln in open(os.path.join(out, "duplicates.jsonl"))]
    assert {d["stage"] for d in dups} == {"exact_dedup", "near_dedup"}
    assert all(d["duplicate_of"] in kept and d["id"] not in kept for d in dups), (dups, kept)


def test_token_lists_are_split_below_the_int32_offset_limit(tmp_path, monkeypatch):
    """A batch of documents with more tokens than int32 list offsets hold is written as several record
    batches (it used to overflow to negative offsets); the shards hold the same documents and tokens."""
    docs = [{"text": f"document number {i} about rivers, hills and boats at dawn, {'more words ' * (i % 7)}"}
            for i in range(40)]
    body = "components:\n  - name: a\n    paths: [a.jsonl]\n"
    ref_out, _ = _tiny_build(tmp_path / "ref", {"a.jsonl": docs}, body)
    monkeypatch.setattr(stages, "LIST_TOKENS", 50)
    out, _ = _tiny_build(tmp_path / "small", {"a.jsonl": docs}, body)
    tok = os.path.join(out, "work", "tok", "c0000_f00000.arrow")
    batches = pa.ipc.open_stream(pa.memory_map(tok)).read_all().to_batches()
    assert len(batches) > 5 and all(sum(len(x) for x in b.column("input_ids").to_pylist()) <= 50 + 30
                                    for b in batches)
    assert _shard_rows(out) == _shard_rows(ref_out)


def test_temp_files_of_a_dead_attempt_are_not_published(tmp_path, monkeypatch):
    """A Ray worker killed between writing its temp file and the rename left that file in the finished
    output (OUT/shards/00001.arrow.tmpPID): the build now sweeps temp files before publishing index.json."""
    real = stages.write_shard

    def dying_attempt_then_retry(index, pieces, out_dir):
        with open(os.path.join(out_dir, "shards", f"{index:05d}.arrow.tmp424242"), "wb") as f:
            f.write(b"partial")
        return real(index, pieces, out_dir)

    monkeypatch.setattr(stages, "write_shard", dying_attempt_then_retry)
    out, _ = _tiny_build(tmp_path, {"a.jsonl": [{"text": f"document {i} about rivers and hills"} for i in range(5)]},
                         "components:\n  - name: a\n    paths: [a.jsonl]\n")
    left = [str(p) for p in Path(out).rglob("*") if ".tmp" in p.name]
    assert not left and os.path.exists(os.path.join(out, "index.json"))


def test_a_force_discard_killed_half_way_is_not_resumed(tmp_path):
    """--force used to delete work/build.json first: killed right after, the re-run found no fingerprint and
    resumed from the old build's results. Now results without a fingerprint are refused (or, with --force,
    discarded), and a discard renames work/ away in one step."""
    from pipeline.build import BuildError

    body = "components:\n  - name: a\n    paths: [a.jsonl]\n"
    out, _ = _tiny_build(tmp_path, {"a.jsonl": [{"text": f"document {i} about rivers and hills"} for i in range(5)]},
                         body)
    os.remove(os.path.join(out, "work", "build.json"))   # the state a kill during the old discard left
    with pytest.raises(BuildError, match="without their settings"):
        _tiny_build(tmp_path, {}, body)
    out, _ = _tiny_build(tmp_path, {}, body, force=True)
    assert len(_shard_rows(out)) == 5 and not [p for p in Path(out).iterdir() if ".discard" in p.name]


def test_shard_plan_reads_lengths_per_record_batch(tmp_path):
    """The plan combined a unit's chunks (a copy, and an int32 offset overflow past 2^31 tokens): it now
    reads each record batch's lengths; the same plan as before."""
    from pipeline.build import _shard_plan

    path = str(tmp_path / "u.arrow")
    lists = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11]]
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, stages.TOK_SCHEMA) as w:
        for part in (lists[:2], lists[2:]):
            w.write_table(pa.table({"key": list(range(len(part))), "id": ["x"] * len(part), "component": ["a"] * len(part),
                                    "input_ids": pa.array(part, pa.list_(pa.uint16())),
                                    "source_id": pa.array([None] * len(part), pa.string())}, schema=stages.TOK_SCHEMA))
    assert _shard_plan([path], 5) == [[(path, 0, 3)], [(path, 3, 5)]]   # lengths 3 1 2 | 4 1


def _write_tok(path: str, batches: list[list[int]]) -> str:
    """A tok file whose record batches hold documents of the given token lengths (the tokens are zeros)."""
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, stages.TOK_SCHEMA) as w:
        for lens in batches:
            offs = pa.array(np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).astype(np.int32))
            ids = pa.ListArray.from_arrays(offs, pa.array(np.zeros(int(sum(lens)), np.uint16)))
            n = len(lens)
            w.write_batch(pa.record_batch([pa.array(range(n), pa.int64()), pa.array(["x"] * n), pa.array(["a"] * n),
                                           ids, pa.array([None] * n, pa.string())], schema=stages.TOK_SCHEMA))
    return path


def test_shard_plan_matches_the_per_document_reference(tmp_path):
    """The vectorised plan (searchsorted over each file's document ends) cuts exactly where the per-document
    loop does: random lengths with zeros, empty files and empty record batches, documents longer than a shard,
    shard sizes that land exactly on document ends, 1 token, and more than the whole corpus."""
    from pipeline.build import _shard_plan, _shard_plan_reference

    rng = np.random.default_rng(0)
    for case in range(40):
        paths = []
        for f in range(int(rng.integers(1, 6))):
            batches = []
            for _ in range(int(rng.integers(0, 4))):
                n = int(rng.integers(0, 30))
                lens = rng.integers(0, 50, n) * (rng.random(n) > 0.2)   # some empty documents
                if n and rng.random() < 0.3:
                    lens[rng.integers(0, n)] = 500                      # longer than most shards
                batches.append(lens.tolist())
            paths.append(_write_tok(str(tmp_path / f"{case}_{f}.arrow"), batches))
        total = sum(int(x) for p in paths for x in _doc_lens(p))
        ends = np.cumsum([x for p in paths for x in _doc_lens(p)])
        sizes = {1, 2, 7, 64, 100, 499, 500, 501, max(total, 1), total + 1}
        sizes |= {int(e) for e in ends[:5] if e > 0} | {int(ends[len(ends) // 2])} if len(ends) else set()
        for size in sorted(s for s in sizes if s > 0):
            assert _shard_plan(paths, size) == _shard_plan_reference(paths, size), (case, size)
    empty = _write_tok(str(tmp_path / "empty.arrow"), [])
    one = _write_tok(str(tmp_path / "one.arrow"), [[3, 0, 4], [], [5]])
    assert _shard_plan([empty, one, empty], 7) == _shard_plan_reference([empty, one, empty], 7) == [
        [(one, 0, 3)], [(one, 3, 4)]]
    assert _shard_plan([empty], 7) == _shard_plan_reference([empty], 7) == []


def _doc_lens(path: str) -> list[int]:
    return [len(x) for x in stages.read_arrow(path).column("input_ids").to_pylist()]


def test_shard_plan_matches_the_reference_on_the_sample_build(sample_out):
    from pipeline.build import _shard_plan, _shard_plan_reference

    out, _ = sample_out
    tok = os.path.join(out, "work", "tok")
    paths = [os.path.join(tok, n) for n in sorted(os.listdir(tok)) if n.endswith(".arrow")]
    lens = [x for p in paths for x in _doc_lens(p)]
    ends = np.cumsum(lens)
    for size in (1, 50, 1000, load_manifest(SAMPLE).shard_tokens, int(ends[len(ends) // 3]), int(ends[-1]),
                 int(ends[-1]) + 1, max(lens)):
        assert _shard_plan(paths, size) == _shard_plan_reference(paths, size), size
    assert len(_shard_plan(paths, load_manifest(SAMPLE).shard_tokens)) == len(json.load(open(
        os.path.join(out, "index.json")))["shards"])


def test_tiny_byte_batches_give_the_same_build(sample_out, tmp_path, monkeypatch):
    """Ingest and tokenize batches also end at BATCH_BYTES of text: a budget of 1 KiB (most batches one to a
    few documents) gives the same shards, index, duplicates and quarantine bytes as the default batching,
    and the ingest files really hold that many more record batches."""
    out, _ = sample_out
    monkeypatch.setattr(stages, "BATCH_BYTES", 1024)
    small = str(tmp_path / "out")
    build(load_manifest(SAMPLE), small, LocalExecutor(), progress=False)
    assert output_files(small) == output_files(out)

    def batches(o: str) -> int:
        ing = os.path.join(o, "work", "ingest")
        return sum(len(stages.read_arrow(os.path.join(ing, n)).to_batches()) for n in os.listdir(ing)
                   if n.endswith(".arrow"))
    assert batches(small) > 5 * batches(out)


def test_index_records_tokens_out_of_the_tokenize_stage(sample_out):
    out, _ = sample_out
    comps = json.load(open(os.path.join(out, "index.json")))["components"]
    assert all(c["stages"]["tokenize"]["tokens_out"] == c["tokens"] > 0 for c in comps.values())


def test_sweep_removes_only_the_builds_own_temp_names(tmp_path):
    """The temp sweep matched any name containing '.tmp' or '.discard' and deleted the user's own files and
    folders in --out (notes.tmpl.md, checkpoints.tmp_old/). Only the build's exact temp names go."""
    body = "components:\n  - name: a\n    paths: [a.jsonl]\n"
    out, _ = _tiny_build(tmp_path, {"a.jsonl": [{"text": f"document {i} about rivers and hills"} for i in range(5)]},
                         body)
    o = Path(out)
    mine = ["notes.tmpl.md", "results.discarded.csv", "index.json.tmp", "work.discarded", "shards/README.tmp.txt",
            "shards/00000.arrow.tmpfile", "checkpoints.tmp_old/model.pth", "work.discard1x/keep.txt"]
    leftovers = ["index.json.tmp123", "report.json.tmp9", "quarantine.jsonl.tmp77", "duplicates.jsonl.tmp5",
                 "work.discard4242/ingest/c0000_f00000.arrow", "shards/00003.arrow.tmp31", "work/build.json.tmp8",
                 "work/dedup.arrow.tmp8", "work/.probe12", "work/ingest/c0000_f00000.arrow.tmp4",
                 "work/ingest/c0000_f00000.json.tmp4", "work/ingest/c0000_f00000.sig.tmp4.npy",
                 "work/ingest/c0000_f00000.quarantine.jsonl.tmp4",
                 "work/tok/c0000_f00000.arrow.tmp6", "work/shards/00000.json.tmp6"]
    for rel in mine + leftovers:
        (o / rel).parent.mkdir(parents=True, exist_ok=True)
        (o / rel).write_text("data\n")
    _tiny_build(tmp_path, {}, body)
    assert [rel for rel in mine if not (o / rel).exists()] == []
    assert [rel for rel in leftovers if (o / rel).exists()] == []
    assert not (o / "work.discard4242").exists()


def test_an_input_changed_during_the_build_fails_its_unit(tmp_path, monkeypatch):
    """The fingerprint was taken before ingest: an input appended to meanwhile was published (new contents
    under the old fingerprint) without notice. The ingest stage re-checks [size, mtime] after reading and
    fails naming the file, publishing nothing; the re-run then sees the changed input."""
    from pipeline.build import BuildError

    real = stages.ingest_unit

    def appended_meanwhile(unit, *a):
        with open(unit.path, "a") as f:
            f.write(json.dumps({"text": "appended during the build"}) + "\n")
        return real(unit, *a)

    monkeypatch.setattr(stages, "ingest_unit", appended_meanwhile)
    body = "components:\n  - name: a\n    paths: [a.jsonl]\n"
    with pytest.raises(stages.InputChanged, match=r"a\.jsonl: input changed while the build read it"):
        _tiny_build(tmp_path, {"a.jsonl": [{"text": "first document text"}]}, body)
    out = tmp_path / "out"
    assert not (out / "index.json").exists() and not (out / "work" / "ingest" / "c0000_f00000.json").exists()
    assert not [p for p in (out / "work" / "ingest").iterdir()]
    monkeypatch.setattr(stages, "ingest_unit", real)
    with pytest.raises(BuildError, match="a.jsonl"):
        _tiny_build(tmp_path, {}, body)
    _tiny_build(tmp_path, {}, body, force=True)
    assert len(_shard_rows(str(out))) == 2


def test_near_threshold_one_and_force_keeps_the_users_files(tmp_path):
    """--near-threshold 1.0 was refused though a manifest and pipeline.dedup take it; --force removed all of
    out/shards/, the user's own files there too: it removes the build's shards only."""
    body = "components:\n  - name: a\n    paths: [a.jsonl]\nnear_dedup:\n  enabled: true\n"
    docs = [{"text": f"Document number {i} talks about rivers, mountains and weather {i * 7}."} for i in range(5)]
    out, report = _tiny_build(tmp_path, {"a.jsonl": docs}, body, near_threshold=1.0)
    assert os.path.exists(os.path.join(out, "index.json"))
    mine = os.path.join(out, "shards", "NOTES.md")
    open(mine, "w").write("mine")
    _tiny_build(tmp_path, {}, body, near_threshold=0.9, force=True)   # other settings: discard, rebuild
    assert open(mine).read() == "mine"
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["00000.arrow", "NOTES.md"]


def _sample_units_and_ingest(out: str):
    from pipeline.read import units_for

    m = load_manifest(SAMPLE)
    units = [u for ci, c in enumerate(m.components) for u in units_for(ci, c, m.root)]
    return m, units, [os.path.join(out, "work", "ingest", u.name + ".arrow") for u in units]


def test_doc_ids_from_keys_match_the_ingest_files(sample_out):
    """DocIds computes ids from keys and reads source ids only for id_field components (wiki, code here), by
    searchsorted; it must give what the plain reference reads out of every ingest file, for random key sets."""
    import numpy as np

    from pipeline.build import BuildError, DocIds, _ids_for_reference

    out, _ = sample_out
    m, units, paths = _sample_units_and_ingest(out)
    every = np.concatenate([stages.read_arrow(p).column("key").to_numpy() for p in paths])
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, len(every) // 3, len(every)):
        want = rng.choice(every, n, replace=False)
        ref = _ids_for_reference(want, paths)
        got = DocIds(want, units, m.components, paths)
        query = rng.choice(want, 2 * n) if n else want   # repeated and unsorted, as duplicate_of keys are
        assert got.ids(query) == [ref[int(k)][0] for k in query]
        assert got.source_ids(query) == [ref[int(k)][1] for k in query]
    assert any(ref[int(k)][1] is not None for k in every) and any(ref[int(k)][1] is None for k in every)
    with pytest.raises(BuildError, match="names no input file"):
        DocIds(every, units, m.components, paths).ids(np.array([(99 << 48) | 1], np.int64))


def test_ingest_jobs_carry_no_file_lists(tmp_path):
    """Each ingest job used to carry its component's whole file list (pickled per Ray task: quadratic in the
    number of files); jobs now get the component with files/missing emptied, and the build is unchanged."""
    seen = []

    class Recording(LocalExecutor):
        def ingest(self, jobs):
            seen.extend(jobs)
            return super().ingest(jobs)

    docs = [{"text": f"Document {i} about rivers, hills and boats at dawn."} for i in range(3)]
    files = {f"p/{i}.jsonl": docs[i:] for i in range(3)}
    (tmp_path / "data").mkdir()
    (tmp_path / "m.yaml").write_text("name: t\nroot: data\ncomponents:\n  - name: a\n    paths: ['p/*.jsonl']\n")
    for rel, d in files.items():
        (tmp_path / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / rel).write_text("".join(json.dumps(x) + "\n" for x in d))
    m = load_manifest(str(tmp_path / "m.yaml"))
    build(m, str(tmp_path / "out"), Recording(), progress=False)
    assert len(seen) == 3 and all(job[1].files == [] and job[1].missing == [] for job in seen)
    assert all(job[1].name == "a" and job[1].text_field == "text" for job in seen)
    assert len(m.components[0].files) == 3   # the caller's manifest is left as it was
    ref, _ = _tiny_build(tmp_path / "ref", files, "components:\n  - name: a\n    paths: ['p/*.jsonl']\n")
    a, b = output_files(ref), output_files(str(tmp_path / "out"))
    ia, ib = json.loads(a.pop("index.json")), json.loads(b.pop("index.json"))
    assert a == b and ia["shards"] == ib["shards"] and ia["components"] == ib["components"]


def test_ray_executor_takes_every_finished_job_per_wait(tmp_path, monkeypatch):
    """RayExecutor._run called ray.wait once per finished job (each call costs ~1 us per ref in flight); it now
    takes every ready ref per wake-up. Real Ray (local, 1 CPU, stopped by process id): jobs whose results are
    ready at once (ray.put) come back complete and each under its own index, in 2 waits per batch in flight."""
    import tempfile

    import ray

    from pipeline.executor import RayExecutor

    temp = tempfile.mkdtemp(prefix="rw", dir="/tmp")  # short: unix socket paths are limited
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20,
             _temp_dir=temp, log_to_driver=False)
    try:
        calls = []
        wait = ray.wait

        def counting(refs, **kw):
            calls.append(len(refs))
            return wait(refs, **kw)

        monkeypatch.setattr(ray, "wait", counting)
        ex = RayExecutor(max_in_flight=8)
        jobs = [(i, f"job {i}") for i in range(40)]
        got = dict(ex._run(lambda i, job: ray.put(job[1] * 2), jobs))
        assert got == {i: f"job {i}" * 2 for i in range(40)}
        assert len(calls) <= 2 * 40 // 8, calls   # one per job before
    finally:
        ray.shutdown()
        for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    named = temp.encode() in f.read()
            except OSError:
                continue
            if named:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(temp, ignore_errors=True)


def test_per_component_counts_and_dedup_read_match_plain_forms(tmp_path):
    """per_component (one bincount) against count_nonzero per component; read_dedup (stage compared in Arrow)
    against the stage column as Python strings, on random dedup tables (empty ones too)."""
    import numpy as np

    from pipeline.build import per_component, read_dedup

    rng = np.random.default_rng(2)
    for i in range(30):
        n_comp, m = int(rng.integers(1, 40)), int(rng.choice([0, 1, 50, 3000]))
        keys = np.sort((rng.integers(0, n_comp, m) << 48) | rng.integers(0, 1 << 48, m))
        assert per_component(keys, n_comp).tolist() == [int(np.count_nonzero((keys >> 48) == c)) for c in range(n_comp)]
        ofs = rng.integers(0, 1 << 50, m)
        stage = rng.choice(["exact_dedup", "near_dedup"], m).tolist()
        table = pa.table({"key": keys, "duplicate_of": ofs, "stage": pa.array(stage, pa.string())})
        path = str(tmp_path / f"dedup{i}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table, max_chunksize=700)
        removed, dup_of = read_dedup(path)
        col = np.array(stage)
        for s in ("exact_dedup", "near_dedup"):
            assert np.array_equal(removed[s], keys[col == s]) and np.array_equal(dup_of[s], ofs[col == s])
            assert removed[s].dtype == dup_of[s].dtype == np.int64


def test_duplicates_jsonl_written_in_chunks_is_the_same_file(tmp_path, monkeypatch):
    """duplicates.jsonl is streamed DUP_CHUNK_ROWS lines at a time (it was one joined string in the driver):
    chunks of 2 lines and of 1 give the same bytes as one chunk, with and without source ids."""
    from pipeline import build as build_mod

    texts = [f"Document {i} about rivers, hills and boats at dawn, with its own words {'x' * i}." for i in range(4)]
    files = {"a/0.jsonl": [{"id": f"s{i}", "text": t} for i, t in enumerate(texts)],
             "a/1.jsonl": [{"id": i, "text": t} for i, t in enumerate(texts[::-1])] + [{"text": texts[0]}],
             "b.jsonl": [{"text": t} for t in texts[1:]]}
    body = ("components:\n  - name: a\n    paths: ['a/*.jsonl']\n    id_field: id\n"
            "  - name: b\n    paths: [b.jsonl]\n")
    got = {}
    for rows in (build_mod.DUP_CHUNK_ROWS, 2, 1):
        monkeypatch.setattr(build_mod, "DUP_CHUNK_ROWS", rows)
        out, report = _tiny_build(tmp_path / str(rows), files, body)
        got[rows] = open(os.path.join(out, "duplicates.jsonl"), "rb").read()
    lines = [json.loads(ln) for ln in got[1].splitlines()]
    assert len(lines) == report["duplicates"]["exact"] == 8
    assert lines[0] == {"id": "a/a/1.jsonl:1", "duplicate_of": "a/a/0.jsonl:4", "stage": "exact_dedup", "component": "a",
                        "source_id": "0", "duplicate_of_source_id": "s3"}
    assert lines[-1] == {"id": "b/b.jsonl:3", "duplicate_of": "a/a/0.jsonl:4", "stage": "exact_dedup", "component": "b",
                         "source_id": None, "duplicate_of_source_id": "s3"}
    assert got[1] == got[2] == got[build_mod.DUP_CHUNK_ROWS]


def test_quarantine_records_stay_in_unit_files(tmp_path):
    """Quarantine records travelled back with each unit's meta (through Ray) and sat in the driver until the
    end. Each ingest task now writes work/ingest/<unit>.quarantine.jsonl, markers carry only the count, and
    quarantine.jsonl is those files concatenated in unit order: the records ingest_unit made, in that order.
    A work folder of an older build (records inside the markers, no unit files) resumes to the same bytes."""
    good = "A perfectly ordinary sentence about the weather, the sea and the ships in the harbour."
    files = {"a/0.jsonl": [{"text": good + " one"}, {"txt": "no text field"}, {"text": good + " two"}],
             "a/1.jsonl": [{"text": good + " three"}],
             "a/2.jsonl": [{"text": ""}, {"text": good + " four"}, {"text": 5}]}
    out, report = _tiny_build(tmp_path, files, "components:\n  - name: a\n    paths: ['a/*.jsonl']\n")
    ingest = os.path.join(out, "work", "ingest")
    metas = [json.load(open(os.path.join(ingest, f"c0000_f0000{i}.json"))) for i in range(3)]
    assert [m["quarantine_records"] for m in metas] == [1, 0, 2] and not any("quarantine" in m for m in metas)
    assert sorted(n for n in os.listdir(ingest) if "quarantine" in n) == ["c0000_f00000.quarantine.jsonl",
                                                                          "c0000_f00002.quarantine.jsonl"]
    q = [json.loads(ln) for ln in open(os.path.join(out, "quarantine.jsonl"))]
    assert [(x["file"], x["line"], x["reason"]) for x in q] == [
        ("a/0.jsonl", 2, "missing_text"), ("a/2.jsonl", 1, "empty"), ("a/2.jsonl", 3, "missing_text")]
    assert report["quarantine"]["records"] == 3
    before = output_files(out)

    for i in (0, 2):  # as an older build left them
        marker = os.path.join(ingest, f"c0000_f0000{i}.json")
        m = json.load(open(marker))
        path = stages.quarantine_path(os.path.join(out, "work"), f"c0000_f0000{i}")
        m["quarantine"] = [json.loads(ln) for ln in open(path)]
        del m["quarantine_records"]
        os.remove(path)
        stages.atomic_write_json(marker, m)
    os.remove(os.path.join(out, "quarantine.jsonl"))
    report = build(load_manifest(str(tmp_path / "m.yaml")), out, LocalExecutor(), progress=False)
    assert output_files(out) == before and report["quarantine"]["records"] == 3


def test_a_second_build_into_the_same_out_is_refused_while_one_runs(tmp_path):
    """Two builds into one --out: the second swept the first one's temp files (it crashed with FileNotFoundError
    on its rename; reproduced with two CLI runs 0.6 s apart) and, with --force, could discard its work/ while it
    still wrote markers. A build holds an exclusive flock on out/.build.lock; a process holding it (here a real
    child process, as a running build would) makes another build fail with one message naming its pid, and once
    that process is killed the lock is gone with it."""
    import fcntl

    from pipeline.build import BuildError

    body = "components:\n  - name: a\n    paths: [a.jsonl]\n"
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / '.build.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0)\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BuildError, match=f"another build \\(pid {holder.pid}\\) is writing to --out"):
            _tiny_build(tmp_path, {"a.jsonl": [{"text": "One document about rivers and hills."}]}, body)
        assert not (out / "work").exists()   # refused before touching anything
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    _, report = _tiny_build(tmp_path, {}, body)
    assert report["totals"]["documents"] == 1
    fd = os.open(out / ".build.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # released when the build returned
    finally:
        os.close(fd)


def test_an_out_folder_inside_the_inputs_glob_is_not_read_back(tmp_path):
    """--out inside a folder a component globs (``**/*.jsonl``, --out data/built): the re-run matched the build's
    own quarantine.jsonl, duplicates.jsonl and work/ files as inputs and was refused ('inputs added'); --force then
    failed on them. They are skipped now, so the re-run resumes byte-identical; a user's own file inside --out is
    still an input."""
    data = tmp_path / "data"
    data.mkdir()
    docs = [{"text": f"document {i} about rivers and hills"} for i in range(3)] + [{"text": "x"}, {"bad": 1}]
    (data / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs + docs[:1]))
    (tmp_path / "m.yaml").write_text("name: t\nroot: data\ncomponents:\n  - name: c\n    paths: ['**/*.jsonl']\n"
                                     "    filters: {min_chars: 5}\n")
    out = str(data / "built")

    def run(**kw):
        return build(load_manifest(str(tmp_path / "m.yaml")), out, LocalExecutor(), progress=False, **kw)

    first = run()
    files = output_files(out)
    assert first["quarantine"]["records"] == 2 and first["duplicates"]["exact"] == 1
    assert os.path.exists(os.path.join(out, "work", "ingest", "c0000_f00000.quarantine.jsonl"))
    second = run()
    assert output_files(out) == files and second["components"] == first["components"]
    run(force=True)
    assert output_files(out) == files
    (data / "built" / "raw").mkdir()
    (data / "built" / "raw" / "mine.jsonl").write_text(json.dumps({"text": "a document of the user's"}) + "\n")
    report = run(force=True)
    assert report["totals"]["documents"] == first["totals"]["documents"] + 1
    assert _shard_rows(out)[-1]["id"] == "c/built/raw/mine.jsonl:1"


@pytest.mark.parametrize("n", ["0", "-1"])
def test_num_cpus_below_one_is_a_usage_error(tmp_path, capsys, n):
    """--num-cpus -1 ended in Ray's ValueError traceback after Ray started; 0 silently meant all cores."""
    from pipeline.build import main

    with pytest.raises(SystemExit) as e:
        main(["--manifest", SAMPLE, "--out", str(tmp_path / "o"), "--executor", "local", "--num-cpus", n])
    assert e.value.code == 2 and f"--num-cpus must be >= 1, got {n}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_own_outputs_are_told_from_the_users_files_inside_out():
    from pipeline.build import _is_own_output

    own = ["index.json", "quarantine.jsonl", "duplicates.jsonl", ".build.lock", "shards/00003.arrow",
           "work/ingest/c0000_f00000.quarantine.jsonl", "work.discard77/ingest/c0000_f00000.quarantine.jsonl"]
    users = ["raw/a.jsonl", "shards/notes.jsonl", "workers/a.jsonl", "work.discard/a.jsonl", "work", "a/index.json"]
    assert [_is_own_output(r.replace("/", os.sep)) for r in own + users] == [True] * len(own) + [False] * len(users)


def test_shard_names_past_99999_are_the_builds_and_zero_padded_six_digits_are_not(tmp_path):
    """write_shard names shard i f"{i:05d}.arrow": 6 digits from 100000 on, never with a leading zero. Stale shards of
    a larger plan were only recognised with exactly 5 digits (100007.arrow stayed), while --force deleted any 5+
    digit name (a user's 000001.arrow, which the normal re-run leaves alone)."""
    m = _tiny_manifest(tmp_path, "enabled: false")
    out = tmp_path / "out"
    build(load_manifest(m), str(out), LocalExecutor(), progress=False)
    shards = out / "shards"
    (shards / "100007.arrow").write_bytes(b"left over from a larger plan")
    for name in ("000001.arrow", "0100000.arrow"):
        (shards / name).write_bytes(b"not mine")
    build(load_manifest(m), str(out), LocalExecutor(), progress=False)
    assert not (shards / "100007.arrow").exists()
    build(load_manifest(m), str(out), LocalExecutor(), progress=False, near=True, force=True)
    assert (shards / "000001.arrow").read_bytes() == (shards / "0100000.arrow").read_bytes() == b"not mine"
