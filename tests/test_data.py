"""The mmap shard loader: window contents, zero-copy reads, rank/worker-independent order, mixture,
validation hold-out, resume position, and one clear error for each kind of bad corpus."""
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from trainer.data import (
    DataError,
    Layout,
    MixtureSampler,
    ShardCorpus,
    TrainWindows,
    feistel_permute,
    make_train_loader,
    train_batches,
    val_batches,
)
from trainer.testing import random_docs, write_corpus


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    docs = random_docs(120, ["web", "code", "books"], seed=1, max_len=200)
    # record batches of 7 rows inside shards of 50 documents: windows cross batch and shard boundaries
    return write_corpus(tmp_path_factory.mktemp("c") / "data", docs, docs_per_shard=50,
                        weights={"web": 1.0, "code": 2.0, "books": 0.5}, rows_per_batch=7), docs


def _stream(docs, comp):
    parts = []
    for _, c, ids in docs:
        if c == comp:
            parts += [np.asarray(ids, dtype=np.int64), np.zeros(1, dtype=np.int64)]
    return np.concatenate(parts)


def test_windows_equal_documents_joined_with_eod(corpus_dir):
    path, docs = corpus_dir
    D = 37
    corpus = ShardCorpus(path, D, val_fraction=0.1)
    out = np.empty(D + 1, dtype=np.int64)
    for comp, c in corpus.components.items():
        stream = _stream(docs, comp)
        assert c.n_windows == (len(stream) - 1) // D
        assert 1 <= c.n_windows - c.n_train <= c.n_windows // 5 + 1
        for p in range(c.n_windows):
            corpus.read_window(comp, p, out)
            np.testing.assert_array_equal(out, stream[p * D:p * D + D + 1])


def test_ipc_file_format_reads_the_same_windows(corpus_dir, tmp_path):
    _, docs = corpus_dir
    a = ShardCorpus(corpus_dir[0], 23)
    b = ShardCorpus(write_corpus(tmp_path / "f", docs, docs_per_shard=40, fmt="file",
                                 weights={"web": 1.0, "code": 2.0, "books": 0.5}), 23)
    assert pa.ipc.open_file(str(tmp_path / "f/shards/00000.arrow")).num_record_batches == 1
    assert torch.equal(TrainWindows(a, 1, Layout(16)).batch(0), TrainWindows(b, 1, Layout(16)).batch(0))


@pytest.mark.parametrize("fmt", ["stream", "file"])
def test_token_buffers_are_zero_copy_views_of_the_memory_map(corpus_dir, tmp_path, fmt):
    path = write_corpus(tmp_path / fmt, corpus_dir[1], docs_per_shard=50, rows_per_batch=7, fmt=fmt)
    before = pa.total_allocated_bytes()
    corpus = ShardCorpus(path, 16)
    assert pa.total_allocated_bytes() - before < 4096  # nothing copied out of the shards
    for v in corpus._values:
        assert v.dtype == np.uint16 and not v.flags.owndata and not v.flags.writeable
    # each numpy view's memory lies inside its shard's mapping
    maps = corpus._maps
    assert len(maps) == 3 and all(m.size == (path / "shards" / f"{i:05d}.arrow").stat().st_size
                                  for i, m in enumerate(maps))
    for v in corpus._values:
        addr = v.__array_interface__["data"][0]
        assert any(m.address <= addr and addr + v.nbytes <= m.address + m.size for m in maps)


def test_feistel_is_a_bijection():
    for n in (1, 2, 3, 17, 64, 1000, 4097):
        out = feistel_permute(np.arange(n), n, key=123)
        assert sorted(out.tolist()) == list(range(n))
    a = feistel_permute(np.arange(1000), 1000, key=1)
    b = feistel_permute(np.arange(1000), 1000, key=2)
    assert (a != b).mean() > 0.9


def _global_order(corpus, seed, world, accum, mb, steps, workers=0):
    """Concatenate what every rank sees, ordered by global sample index."""
    rows = {}
    for rank in range(world):
        layout = Layout(mb, world, rank, accum)
        ds = TrainWindows(corpus, seed, layout)
        for m in range(steps * accum):
            ids = layout.sample_ids(0, m)
            for i, row in zip(ids, ds.batch(m)):
                assert int(i) not in rows
                rows[int(i)] = row
    return torch.stack([rows[i] for i in sorted(rows)])


def test_order_independent_of_ranks_and_accumulation(corpus_dir):
    corpus = ShardCorpus(corpus_dir[0], 16)
    ref = _global_order(corpus, 7, world=1, accum=1, mb=8, steps=6)
    for world, accum, mb in ((2, 1, 4), (4, 2, 1), (1, 4, 2)):
        got = _global_order(corpus, 7, world, accum, mb, steps=48 // (world * accum * mb))
        assert torch.equal(got, ref), (world, accum, mb)


def test_loader_workers_produce_the_same_stream(corpus_dir):
    corpus = ShardCorpus(corpus_dir[0], 16)
    layout = Layout(3, 2, 1, 2)
    ref = [b for _, b in zip(range(7), make_train_loader(corpus, 5, layout, 0, 0))]
    got = [b for _, b in zip(range(7), make_train_loader(corpus, 5, layout, 0, 2))]
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_resume_position_repeats_and_skips_nothing(corpus_dir):
    corpus = ShardCorpus(corpus_dir[0], 16)
    layout = Layout(4, 1, 0, 1)
    full = TrainWindows(corpus, 3, layout, start_sample=0)
    resumed = TrainWindows(corpus, 3, layout, start_sample=5 * 4)
    for m in range(4):
        assert torch.equal(full.batch(5 + m), resumed.batch(m))


def test_each_component_epoch_is_a_permutation_and_mixture_follows_weights(corpus_dir):
    corpus = ShardCorpus(corpus_dir[0], 16)
    sampler = MixtureSampler(corpus, seed=11)
    n = 30000
    picks = sampler.locate(np.arange(n))
    counts = Counter(c for c, _ in picks)
    w = {c: corpus.weights[c] * corpus.components[c].n_train for c in corpus.components}
    tot = sum(w.values())
    for c in corpus.components:
        assert abs(counts[c] / n - w[c] / tot) < 0.02, c
        seen = [p for cc, p in picks if cc == c]
        nt = corpus.components[c].n_train
        for e in range(len(seen) // nt):
            assert sorted(seen[e * nt:(e + 1) * nt]) == list(range(nt))  # no repeats within an epoch
        assert max(seen) < nt  # never a validation window


def test_mixture_override_and_validation_windows(corpus_dir):
    corpus = ShardCorpus(corpus_dir[0], 16, val_fraction=0.05, mixture={"books": 0.0})
    picks = MixtureSampler(corpus, seed=0).locate(np.arange(2000))
    assert "books" not in {c for c, _ in picks}
    items = corpus.val_windows()
    assert len(items) >= 7
    # the same 7 windows for any micro-batch size and number of ranks; rank r takes every world-th
    one = torch.cat([b for b, _ in val_batches(corpus, Layout(3, 1, 0), n_windows=7)])
    assert one.shape == (7, 17) and [n for _, n in val_batches(corpus, Layout(3, 1, 0), 7)] == [3, 3, 1]
    r0, r1 = (torch.cat([b for b, _ in val_batches(corpus, Layout(2, 2, r), n_windows=7)]) for r in (0, 1))
    assert torch.equal(r0, one[0::2]) and torch.equal(r1, one[1::2])
    # every rank gets as many micro-batches (forwards are collectives); a short rank pads with ones counting 0
    for n_windows, world, B in ((1, 2, 1), (3, 2, 1), (5, 4, 2), (7, 3, 3)):
        shares = [val_batches(corpus, Layout(B, world, r), n_windows) for r in range(world)]
        assert len({len(s) for s in shares}) == 1
        assert sum(n for s in shares for _, n in s) == n_windows
    for c, p in items:  # validation starts one window after training ends: no shared token
        assert p >= corpus.components[c].n_train + 1
    with pytest.raises(DataError, match="not in the corpus"):
        ShardCorpus(corpus_dir[0], 16, mixture={"nope": 1.0})


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_corpora_give_one_clear_error(corpus_dir, tmp_path):
    src = corpus_dir[0]
    with pytest.raises(DataError, match="index not found"):
        ShardCorpus(tmp_path / "none", 16)

    d = _copy(src, tmp_path / "missing")
    (d / "shards" / "00001.arrow").unlink()
    with pytest.raises(DataError, match=r"00001\.arrow .*shards\[1\].*missing"):
        ShardCorpus(d, 16)

    d = _copy(src, tmp_path / "corrupt")
    raw = bytearray((d / "shards" / "00002.arrow").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d / "shards" / "00002.arrow").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"00002\.arrow.*sha256"):
        ShardCorpus(d, 16, verify_checksums=True)
    ShardCorpus(d, 16)  # off by default: a start does not read the whole corpus

    d = _copy(src, tmp_path / "badjson")
    (d / "index.json").write_text('{"schema_version": 1,\n "shards": [,]}')
    with pytest.raises(DataError, match=r"index\.json:2: invalid JSON"):
        ShardCorpus(d, 16)

    d = _copy(src, tmp_path / "version")
    idx = json.loads((d / "index.json").read_text())
    idx["schema_version"] = 2
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(DataError, match="schema_version"):
        ShardCorpus(d, 16)

    d = tmp_path / "schema"
    (d / "shards").mkdir(parents=True)
    t = pa.table({"id": ["a"], "component": ["x"], "input_ids": pa.array([[1, 2, 3]], pa.list_(pa.int32()))})
    with pa.OSFile(str(d / "shards" / "00000.arrow"), "wb") as f, ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    from trainer.data import sha256_file

    (d / "index.json").write_text(json.dumps({
        "schema_version": 1, "tokenizer": {"eod_id": 0, "vocab_size": 65536},
        "shards": [{"path": "shards/00000.arrow", "documents": 1, "tokens": 3,
                    "sha256": sha256_file(d / "shards" / "00000.arrow")}], "components": {}}))
    with pytest.raises(DataError, match=r"00000\.arrow.*input_ids.*list<uint16>"):
        ShardCorpus(d, 16)

    with pytest.raises(DataError, match="fewer than"):
        ShardCorpus(src, 100000)


def test_a_shard_listed_twice_or_wrong_totals_are_errors(corpus_dir, tmp_path):
    """A shard listed twice in index.json used to be read twice without a word (the totals disagreed)."""
    import json
    import shutil

    from trainer.data import DataError

    for case in ("twice", "totals"):
        d = tmp_path / case
        shutil.copytree(corpus_dir[0], d)
        idx = json.loads((d / "index.json").read_text())
        if case == "twice":
            idx["shards"].append(dict(idx["shards"][0]))
            idx["totals"]["documents"] += idx["shards"][0]["documents"]
            idx["totals"]["tokens"] += idx["shards"][0]["tokens"]
            match = r"shards\[3\].*same file as shards\[0\]"
        else:
            idx["totals"]["documents"] += 1
            match = "totals say"
        (d / "index.json").write_text(json.dumps(idx))
        with pytest.raises(DataError, match=match):
            ShardCorpus(d, 64, 0.1)


def test_mixture_weights_that_are_not_finite_are_errors_and_huge_ones_work(corpus_dir, tmp_path):
    """probs = w*n / sum(w*n) overflowed for finite weights of 1e308 (probs [nan, nan]: the sampler drew one
    component only), and a data.mixture override of nan or inf was accepted. Weights are scaled to a max of
    1 before the product; a weight that is not a finite number >= 0 is a DataError naming it."""
    ref = ShardCorpus(corpus_dir[0], 16)
    d = _copy(corpus_dir[0], tmp_path / "huge")
    idx = json.loads((d / "index.json").read_text())
    scale = {"web": 1e308, "code": 1e308, "books": 0.5e308}  # finite, but w * n overflows
    for c in idx["components"]:
        idx["components"][c]["weight"] = scale[c]
    (d / "index.json").write_text(json.dumps(idx))
    huge = ShardCorpus(d, 16)
    want = np.array([scale[c] / 1e308 * ref.components[c].n_train for c in huge.train_components])
    assert np.all(np.isfinite(huge.probs)) and np.allclose(huge.probs, want / want.sum(), rtol=1e-12, atol=0)
    picks = Counter(c for c, _ in MixtureSampler(huge, seed=0).locate(np.arange(4000)))
    assert set(picks) == set(huge.components)
    for bad in (float("nan"), float("inf"), -1.0, "lots"):
        with pytest.raises(DataError, match=r"data.mixture: weight of 'web' must be a finite number >= 0"):
            ShardCorpus(corpus_dir[0], 16, mixture={"web": bad})
    idx["components"]["code"]["weight"] = float("inf")
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(DataError, match=r"index.json: components\['code'\].weight must be a finite number"):
        ShardCorpus(d, 16)


def test_a_shard_whose_size_differs_from_the_index_is_an_error(corpus_dir, tmp_path):
    """With verify_checksums off nothing compared a shard with index.json: bytes appended after a stream's
    end were never noticed, and a truncated shard was blamed on the Arrow format (or on its counts). Its
    size must equal the index's per-shard "bytes"; an index without "bytes" still opens."""
    d = _copy(corpus_dir[0], tmp_path / "grown")
    with open(d / "shards" / "00001.arrow", "ab") as f:
        f.write(b"\0" * 8)
    size = (d / "shards" / "00001.arrow").stat().st_size
    with pytest.raises(DataError, match=rf"00001\.arrow .*shards\[1\].*: {size} bytes on disk, the index says {size - 8}"):
        ShardCorpus(d, 16)
    d = _copy(corpus_dir[0], tmp_path / "cut")
    raw = (d / "shards" / "00002.arrow").read_bytes()
    (d / "shards" / "00002.arrow").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(DataError, match=rf"00002\.arrow .*shards\[2\].*: {len(raw) // 2} bytes on disk, the index says {len(raw)}"):
        ShardCorpus(d, 16)
    idx = json.loads((d / "index.json").read_text())
    for s in idx["shards"]:
        del s["bytes"]
    idx["shards"][0]["bytes"] = "12"
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(DataError, match=r"shards\[0\]\.bytes must be an integer"):
        ShardCorpus(d, 16)
    del idx["shards"][0]["bytes"]
    (d / "shards" / "00002.arrow").write_bytes(raw)
    (d / "index.json").write_text(json.dumps(idx))
    ShardCorpus(d, 16)


def _offsets_pos(path, batch: int) -> int:
    """File position of record batch `batch`'s input_ids offsets buffer (int32) in a shard."""
    buf = pa.py_buffer(path.read_bytes())
    ids = list(ipc.open_stream(buf))[batch].column("input_ids")
    return ids.buffers()[1].address - buf.address


@pytest.mark.parametrize("case", ["decrease", "negative_start", "end_past_values"])
def test_corrupt_list_offsets_are_errors(corpus_dir, tmp_path, case):
    """With verify_checksums off a changed int32 offset inside a shard was accepted (the token count pins
    only the first and the last one): documents of negative or huge length, silently wrong windows. Each
    case keeps the shard's token count; each is a DataError naming the shard and the record batch."""
    d = _copy(corpus_dir[0], tmp_path / case)
    shard = d / "shards" / "00001.arrow"
    pos = _offsets_pos(shard, 1)
    raw = bytearray(shard.read_bytes())
    off = np.frombuffer(raw, dtype=np.int32, count=8, offset=pos).copy()  # record batch 1: 7 rows
    n_values = len(list(ipc.open_stream(pa.py_buffer(bytes(raw))))[1].column("input_ids").values)
    assert off[0] == 0 and off[-1] == n_values
    if case == "decrease":
        off[3] = off[4] + 5
        match = r"record batch 1: input_ids offsets decrease at row 3"
    elif case == "negative_start":
        off[0], off[-1] = -10, off[-1] - 10
        match = r"record batch 1: input_ids offsets start at -10"
    else:
        off[0], off[-1] = 10, off[-1] + 10
        match = rf"record batch 1: input_ids offsets end at {n_values + 10}, past its {n_values} values"
    raw[pos:pos + 32] = off.tobytes()
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"00001\.arrow .*shards\[1\].*" + match):
        ShardCorpus(d, 16)


def test_token_ids_past_the_vocab_are_errors(tmp_path):
    """Token ids were never compared with the index's vocab_size: one >= it gave an IndexError deep in torch
    (a device assert on GPU). verify_checksums checks every shard while opening; without it every window
    read checks its own tokens. Both name the shard and record batch; a window read also the row and id."""
    docs = random_docs(60, ["web"], seed=2, min_len=5, max_len=100, vocab=999)
    docs[25][2][3] = 1000  # shard 1 (20 documents each), record batch 0 (7 rows each), row 5
    d = write_corpus(tmp_path / "c", docs, docs_per_shard=20, rows_per_batch=7, vocab_size=1000)
    where = r"00001\.arrow \(listed at .*shards\[1\]\)"
    with pytest.raises(DataError, match=where + r": record batch 0 holds token id 1000, not below the index's vocab_size 1000"):
        ShardCorpus(d, 16, verify_checksums=True)
    corpus = ShardCorpus(d, 16, val_fraction=0)  # opening reads no tokens
    pos = sum(len(x[2]) + 1 for x in docs[:25]) + 3  # stream position of the bad token
    stream = _stream(docs, "web")
    assert stream[pos] == 1000
    out = np.empty(17, dtype=np.int64)
    for p in range(corpus.components["web"].n_windows):
        if p * 16 <= pos <= p * 16 + 16:
            with pytest.raises(DataError, match=where + r": record batch 0, row 5 \(document 'doc25'\) holds token id 1000"):
                corpus.read_window("web", p, out)
        else:
            np.testing.assert_array_equal(corpus.read_window("web", p, out), stream[p * 16:p * 16 + 17])
    with pytest.raises(DataError, match="doc25"):
        corpus.read_windows([("web", 0), ("web", pos // 16)])


_FEW_FDS = """
import os, pickle, resource, sys
import numpy as np
from trainer.data import ShardCorpus
resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
corpus = ShardCorpus(sys.argv[1], 16, val_fraction=0, verify_checksums=True)
again = pickle.loads(pickle.dumps(corpus))  # what a spawned loader worker gets: the maps reopen lazily
out = []
for c in (corpus, again):
    out.append(np.stack([c.read_window(n, p, np.empty(17, dtype=np.int64))
                         for n in sorted(c.components) for p in range(c.components[n].n_windows)]))
np.save(sys.argv[2], np.stack(out))
print(len(corpus._maps), len(again._maps), len(os.listdir("/proc/self/fd")))
"""


def test_a_corpus_of_more_shards_than_file_descriptors_opens(tmp_path):
    """pa.memory_map kept one descriptor per shard for the whole run: a World-v3-sized corpus (~46,500 shards)
    passes `ulimit -n`, and the error ("Too many open files") blamed an intact shard. Shards are now mapped
    from files closed right away: 300 shards open (verified, then pickled as for a loader worker) under a
    limit of 128 descriptors, in a subprocess so this one keeps its limit."""
    import subprocess
    import sys
    from pathlib import Path

    docs = random_docs(300, ["a", "b"], seed=3, min_len=1, max_len=40)
    d = write_corpus(tmp_path / "c", docs, docs_per_shard=1)
    r = subprocess.run([sys.executable, "-c", _FEW_FDS, str(d), str(tmp_path / "w.npy")],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    maps, maps_again, fds = (int(x) for x in r.stdout.split())
    assert maps == maps_again == 300 and fds < 64
    got = np.load(tmp_path / "w.npy")
    want = np.stack([_stream(docs, n)[p * 16:p * 16 + 17] for n in ("a", "b")
                     for p in range((len(_stream(docs, n)) - 1) // 16)])
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got[1], want)


def _short_docs_corpus(out, n_docs: int, large: bool = False):
    """One shard of n_docs documents of 1..7 tokens, components c0/c1/c2 round-robin (built column-wise;
    large: input_ids as large_list<uint16>, int64 offsets)."""
    from trainer.data import sha256_file

    rng = np.random.default_rng(0)
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(rng.integers(1, 8, n_docs), out=offsets[1:])
    values = pa.array(rng.integers(1, 65535, int(offsets[-1])).astype(np.uint16))
    offsets = pa.array(offsets, pa.int64() if large else pa.int32())
    ids = (pa.LargeListArray if large else pa.ListArray).from_arrays(offsets, values)
    comp = pa.DictionaryArray.from_arrays(pa.array((np.arange(n_docs) % 3).astype(np.int32)),
                                          pa.array(["c0", "c1", "c2"]))
    table = pa.table({"id": pa.array([str(i) for i in range(n_docs)]), "component": comp, "input_ids": ids})
    (out / "shards").mkdir(parents=True)
    path = out / "shards" / "00000.arrow"
    with pa.OSFile(str(path), "wb") as f, ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=10_000)
    (out / "index.json").write_text(json.dumps({
        "schema_version": 1, "tokenizer": {"eod_id": 0, "vocab_size": 65536},
        "shards": [{"path": "shards/00000.arrow", "documents": n_docs, "tokens": int(len(values)),
                    "bytes": path.stat().st_size, "sha256": sha256_file(path)}], "components": {}}))
    return out


def test_document_tables_memory_per_document(tmp_path):
    """The per-document tables cost 28 B/doc kept and 73 B/doc at peak while opening (int64 starts and lengths,
    per-segment lists alive while joined): ~3 GB kept, ~7 GB peak per rank for World v3's ~100M documents.
    Starts and lengths now keep the offsets' type (int32 for list<>; they lie in [0, len(values)]), and the
    per-segment lists are freed once joined: 20 B/doc kept, under 40 at peak (tracemalloc sees numpy's
    allocations). A large_list<uint16> shard (int64 offsets) reads the same windows."""
    import tracemalloc

    n = 60_000
    d = _short_docs_corpus(tmp_path / "list", n)
    tracemalloc.start()
    try:
        corpus = ShardCorpus(d, 8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept = sum(a.nbytes for c in corpus.components.values() for a in (c.doc_seg, c.doc_start, c.doc_len, c.cum))
    assert kept / n < 20.1 and peak / n < 40, (kept / n, peak / n)
    large = ShardCorpus(_short_docs_corpus(tmp_path / "large", n, large=True), 8)
    assert large.components["c1"].doc_start.dtype == np.int64
    items = MixtureSampler(corpus, 0).locate(np.arange(2000))
    assert torch.equal(corpus.read_windows(items), large.read_windows(items))


def test_a_corpus_of_empty_shards_and_a_loader_worker_error_are_one_line(tmp_path):
    """Adversarial review: shards holding no documents at all failed in np.concatenate (a bare ValueError
    traceback); a DataError raised in a loader worker (the GPU presets use 2) reached the CLI wrapped in the
    worker's whole traceback."""
    from trainer.data import sha256_file
    from trainer.testing import SCHEMA

    empty = tmp_path / "empty"
    (empty / "shards").mkdir(parents=True)
    shards = []
    for i, n_batches in enumerate((0, 2)):   # a stream with no record batch, one with two empty ones
        path = empty / "shards" / f"{i:05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, ipc.new_stream(sink, SCHEMA) as w:
            for _ in range(n_batches):
                w.write_batch(pa.RecordBatch.from_pylist([], schema=SCHEMA))
        shards.append({"path": f"shards/{path.name}", "documents": 0, "tokens": 0,
                       "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    (empty / "index.json").write_text(json.dumps({"schema_version": 1, "tokenizer": {"eod_id": 0, "vocab_size": 512},
                                                  "shards": shards, "components": {}}))
    with pytest.raises(DataError, match=r"index\.json: its 2 shard\(s\) hold no documents"):
        ShardCorpus(empty, 16)

    docs = random_docs(30, ["web"], seed=2, min_len=5, max_len=60, vocab=999)
    docs[3][2][1] = 1000
    corpus = ShardCorpus(write_corpus(tmp_path / "bad", docs, docs_per_shard=10, vocab_size=1000), 16, val_fraction=0)
    with pytest.raises(DataError) as e:
        for _ in train_batches(make_train_loader(corpus, 0, Layout(4), 0, num_workers=2)):
            pass
    assert str(e.value).startswith(str(tmp_path / "bad" / "shards" / "00000.arrow")), str(e.value)
    assert "doc3" in str(e.value) and "Traceback" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("where,value,match", [
    (("shards", 0, "path"), 5, r"shards\[0\]\.path and \.sha256 must be non-empty strings"),
    (("shards", 0, "sha256"), None, r"shards\[0\]\.path and \.sha256 must be non-empty strings"),
    (("shards", 0, "documents"), "50", r"shards\[0\]\.documents must be an integer >= 0, got '50'"),
    (("components", "web"), 5, "'components' must be an object of objects"),
    (("totals",), "all", "'totals' must be an object"),
    (("tokenizer", "vocab_size"), 0, "'tokenizer' must give eod_id 0 and an integer vocab_size >= 1"),
])
def test_index_fields_of_the_wrong_type_are_errors(corpus_dir, tmp_path, where, value, match):
    """Adversarial review: a hand-edited index.json with a shard path that is not a string, a component entry or
    totals that are not objects ended in TypeError / AttributeError tracebacks; a count given as a string gave
    'holds 50 documents, index says 50'."""
    d = _copy(corpus_dir[0], tmp_path / "c")
    idx = json.loads((d / "index.json").read_text())
    node = idx
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(DataError, match=r"index\.json: " + match):
        ShardCorpus(d, 16)


def test_validation_windows_are_picked_without_listing_every_held_out_window(corpus_dir):
    """Adversarial review: val_windows() listed and shuffled every held-out window to take val_windows (32) of
    them, twice per rank at start-up: 25 s and 1.2 GB per call at World v3 scale (~7.6M held-out windows). The
    first n now come from a keyed permutation computed for those n only; all of them are still exactly the
    held-out windows, each once, and any n is a prefix of the full order."""
    import tracemalloc

    corpus = ShardCorpus(corpus_dir[0], 16, val_fraction=0.3)
    every = corpus.val_windows()
    held_out = {(name, p) for name, c in corpus.components.items() for p in range(c.n_train + 1, c.n_windows)}
    assert len(every) == len(held_out) and set(every) == held_out
    assert corpus.val_windows(7) == every[:7] and corpus.val_windows(10**9) == every
    assert len({c for c, _ in every[:10]}) > 1                     # interleaved, not component after component
    for c in corpus.components.values():                           # 3 x 1M held-out windows
        c.n_windows, c.n_train = 100_000_000, 100_000_000 - 1_000_000 - 1
    tracemalloc.start()
    picked = corpus.val_windows(32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(set(picked)) == 32 and all(corpus.components[c].n_train < p < 100_000_000 for c, p in picked)
    assert peak < 1 << 20, peak                                    # listing them: ~300 MB
