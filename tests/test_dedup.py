"""MinHash near-dedup: kernels against their plain references, quality against exact Jaccard,
Ray against the one-process path, and the CLI's handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.dedup import MinHashConfig, NearDedup, lsh, minhash, optimal_bands_rows
from pipeline.dedup import components as cc
from pipeline.dedup.synth import SynthConfig, evaluate, make_corpus

ROOT = Path(__file__).resolve().parents[1]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = list("abcdef ghij  \n\tKLMNÄÖ 中文字日本語сло ва") + ["\u3000", "😀"]
    return ["".join(rng.choice(alphabet, int(rng.integers(0, 60)))) for _ in range(n)]


@pytest.mark.parametrize("kind,size", [("char", 5), ("char", 1), ("word", 2), ("word", 5)])
def test_signatures_match_reference(kind, size):
    cfg = MinHashConfig(num_perm=16, shingle_kind=kind, shingle_size=size, seed=3)
    texts = _random_texts(80, seed=size) + ["x\ud800 y", "", "   ", "a", "ab cd"]  # lone surrogate (JSON "\ud800")
    fast = NearDedup(cfg).signatures(texts)
    ref = minhash.signatures_reference(texts, cfg)
    assert fast.dtype == np.uint32 and fast.shape == (len(texts), 16)
    np.testing.assert_array_equal(fast, ref)
    assert (fast[-4] == minhash.EMPTY).all() and (fast[-3] == minhash.EMPTY).all()


def test_signatures_threads_equal_single():
    texts = _random_texts(300, seed=9)
    one = NearDedup(MinHashConfig(threads=1)).signatures(texts)
    two = NearDedup(MinHashConfig(threads=2)).signatures(texts)
    np.testing.assert_array_equal(one, two)


def test_normalisation_makes_case_and_whitespace_irrelevant():
    nd = NearDedup(MinHashConfig(num_perm=32))
    sig = nd.signatures(["Hello   World\n\tagain", "hello world again", "hello world agaim"])
    assert (sig[0] == sig[1]).all() and not (sig[0] == sig[2]).all()


def test_minhash_estimates_jaccard():
    """Agreement of 256-value signatures is an unbiased estimate of the exact shingle Jaccard."""
    cfg = MinHashConfig(num_perm=256)
    texts, planted = make_corpus(SynthConfig(docs=300, copy_fraction=0.5, mean_chars=600, seed=4))
    pairs = [(s, c) for s, c, _ in planted] + [(i, i + 1) for i in range(0, 100, 2)]
    sig = NearDedup(cfg).signatures(texts)
    est = lsh.agreement(sig[[p[0] for p in pairs]], sig[[p[1] for p in pairs]])
    true = np.array([minhash.jaccard_reference(texts[a], texts[b], cfg) for a, b in pairs])
    assert true.min() < 0.3 and true.max() == 1.0  # the pairs span the range
    err = est - true
    assert abs(err.mean()) < 0.01 and np.abs(err).max() < 0.15
    ia, ib = [p[0] for p in pairs], [p[1] for p in pairs]
    low = lsh.low_bits(sig, 8)
    assert low.dtype == np.uint8 and (low == (sig & 0xFF)).all()
    err8 = lsh.estimate_jaccard(low[ia], low[ib], 8) - true
    assert abs(err8.mean()) < 0.01 and np.abs(err8).max() < 0.15
    assert np.abs(lsh.estimate_jaccard(sig[ia], sig[ib], 32) - est).max() < 1e-6


def test_band_keys_match_reference():
    cfg = MinHashConfig(num_perm=32, threshold=0.7)
    sig = NearDedup(cfg).signatures(_random_texts(40, seed=1) + [""])
    np.testing.assert_array_equal(lsh.band_keys(sig, cfg), lsh.band_keys_reference(sig, cfg))
    assert (lsh.band_keys(sig, cfg)[-1] == 0).all()


@pytest.mark.parametrize("threshold,num_perm", [(0.8, 128), (0.5, 64), (0.9, 256), (0.7, 32)])
def test_bands_rows_as_datasketch(threshold, num_perm):
    from datasketch.lsh import _optimal_param

    assert optimal_bands_rows(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_config_validation():
    with pytest.raises(ValueError):
        MinHashConfig(threshold=0)
    with pytest.raises(ValueError):
        MinHashConfig(bands=4)
    with pytest.raises(ValueError):
        MinHashConfig(num_perm=16, bands=4, rows=5)
    with pytest.raises(ValueError):
        MinHashConfig(shingle_kind="byte")
    with pytest.raises(ValueError):
        MinHashConfig(verify_bits=4)
    with pytest.raises(ValueError, match="seed must be >= 0"):  # numpy refused it only at the first signature batch
        MinHashConfig(seed=-1)
    with pytest.raises(ValueError, match="max_rounds"):  # 0 rounds: 'did not converge' after every other stage
        MinHashConfig(max_rounds=0)
    assert (MinHashConfig(num_perm=16, bands=4, rows=4).bands, MinHashConfig().bands) == (4, 14)
    assert (MinHashConfig(verify=False).bands, MinHashConfig(verify=False).rows) == (9, 13)


@pytest.mark.parametrize("seed", range(4))
def test_components_three_ways(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 3000))
    u = rng.integers(0, n, n // 2) * 7 + 3  # sparse, non-contiguous keys
    v = rng.integers(0, n, n // 2) * 7 + 3
    ref = lsh.components_reference(u, v)
    fast = lsh.components(u, v)
    star = cc.star_components(u, v, parts=int(rng.integers(1, 6)))
    for got in (fast, star[:2]):
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


def test_components_long_path():
    """A path is the worst case for label propagation; large/small-star still converges."""
    u = np.arange(1, 2000)
    v = np.arange(0, 1999)
    removed, dup, rounds = cc.star_components(u[::-1], v[::-1], parts=3)
    np.testing.assert_array_equal(removed, np.arange(1, 2000))
    assert (dup == 0).all() and rounds < 40


def test_duplicates_semantics():
    """Smallest key kept whatever the block order; result sorted; empty docs never matched."""
    base = "the quick brown fox jumps over the lazy dog again and again " * 20
    texts = [base, "unrelated text about gardening " * 30, base + " end", "", "", base.upper()]
    keys = np.array([50, 10, 30, 11, 12, 7])
    nd = NearDedup(MinHashConfig(mode="local"))
    sig = nd.signatures(texts)
    auto = NearDedup(MinHashConfig(ray_min_docs=1000))
    assert not auto.use_ray(999) and auto.use_ray(1000)  # Ray is not running here
    removed, dup = nd.duplicates([(keys[3:], sig[3:]), [keys[:3], sig[:3]]])
    assert removed.dtype == np.int64 and dup.dtype == np.int64
    np.testing.assert_array_equal(removed, [30, 50])
    np.testing.assert_array_equal(dup, [7, 7])
    empty = nd.duplicates([])
    assert len(empty[0]) == 0 and len(empty[1]) == 0
    with pytest.raises(ValueError):
        nd.duplicates([(np.array([1, 1]), sig[:2])])


def test_quality_on_planted_corpus():
    """>= 95 % of planted copies with exact Jaccard >= 0.9 found, <= 1 % gross removals."""
    cfg = MinHashConfig(mode="local")
    texts, planted = make_corpus(SynthConfig(docs=3000, seed=11))
    nd = NearDedup(cfg)
    sig = nd.signatures(texts)
    keys = np.arange(len(texts))
    removed, dup = nd.duplicates([(keys[:1234], sig[:1234]), (keys[1234:], sig[1234:])])
    q = evaluate(texts, planted, removed, dup, cfg)
    assert q["pairs_high"] > 300
    assert q["recall_high"] >= 0.95, q
    assert q["gross_error_rate"] <= 0.01, q
    assert q["found_by_kind"]["exact"] == 1.0 and q["found_by_kind"]["whitespace"] == 1.0
    assert np.all(np.diff(removed) > 0) and np.all(dup < removed)


def test_ray_matches_local():
    """The Ray path (band shuffle + distributed large/small-star) gives the one-process answer."""
    import ray

    texts, _ = make_corpus(SynthConfig(docs=1500, seed=5, mean_chars=800))
    nd_local = NearDedup(MinHashConfig(mode="local"))
    sig = nd_local.signatures(texts)
    keys = np.arange(len(texts), dtype=np.int64)[::-1].copy()  # keys against row order
    blocks = [(keys[i : i + 400], sig[i : i + 400]) for i in range(0, len(texts), 400)]
    want = nd_local.duplicates(blocks)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        nd = NearDedup(MinHashConfig(partitions=3))
        assert nd.use_ray(10)
        got = nd.duplicates(blocks)
        assert nd.last_stats["mode"] == "ray"
        got_refs = nd.duplicates([ray.put(b) for b in blocks])
    finally:
        ray.shutdown()
    assert len(want[0]) > 100
    for g in (got, got_refs):
        np.testing.assert_array_equal(g[0], want[0])
        np.testing.assert_array_equal(g[1], want[1])


def test_cli_bad_input_and_earliest_kept(tmp_path):
    doc = "ein kleiner Text über Äpfel und Birnen, der zweimal vorkommt. " * 10
    lines = [
        json.dumps({"id": "a", "text": "etwas ganz anderes " * 20}),
        json.dumps({"id": "b", "text": doc}),
        "{not json",
        json.dumps({"id": "c"}),
        json.dumps({"text": doc}),
        json.dumps({"id": "d", "text": "   "}),
        json.dumps({"id": "e", "text": doc.replace("  ", " ") + " Fußzeile"}),
        "",
        json.dumps({"id": 17, "text": "  " + doc.upper()}),
        json.dumps([1, 2]),
    ]
    inp = tmp_path / "docs.jsonl"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out, rep = tmp_path / "removed.jsonl", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.dedup", "--input", str(inp), "--out", str(out), "--report", str(rep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got == [{"id": "e", "duplicate_of": "b"}, {"id": 17, "duplicate_of": "b"}]
    report = json.loads(rep.read_text())
    assert report["bad"] == {"not_json": 1, "missing_text": 1, "missing_id": 1, "empty_text": 1, "not_object": 1}
    assert report["bad_first_lines"]["not_json"] == [3]
    assert (report["documents"], report["removed"], report["kept"]) == (4, 2, 2)
    assert report["blank"] == 1
    assert report["lines"] == len(lines) == report["documents"] + sum(report["bad"].values()) + report["blank"]
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("args, needle", [
    (["--threshold", "1.5"], "threshold"),
    (["--num-perm", "0"], "num_perm"),
    (["--bands", "100", "--rows", "100"], "bands"),
    (["--threads", "0"], "--threads"),
    (["--batch", "0"], "--batch"),
    (["--input", "{tmp}"], "is a folder"),
    (["--input", "{tmp}/nope.jsonl"], "no such file"),
    (["--out", "{tmp}/no/dir/removed.jsonl"], "does not exist"),
    (["--report", "{tmp}/no/report.json"], "does not exist"),
    (["--bands", "5", "--rows", "0"], "bands and rows must be >= 1"),
    (["--bands", "-2", "--rows", "-3"], "bands and rows must be >= 1"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),
    (["--out", "{tmp}/docs.jsonl"], "same file as --input"),
    (["--report", "{tmp}/removed.jsonl"], "same file as --out"),
])
def test_cli_bad_arguments_are_usage_errors(tmp_path, capsys, args, needle):
    from pipeline.dedup.__main__ import main

    inp = tmp_path / "docs.jsonl"
    inp.write_text(json.dumps({"id": 1, "text": "some text here"}) + "\n")
    argv = ["--input", str(inp), "--out", str(tmp_path / "removed.jsonl")] + [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and needle in err and "Traceback" not in err
    assert not (tmp_path / "removed.jsonl").exists()
    assert inp.read_text() == json.dumps({"id": 1, "text": "some text here"}) + "\n"


def test_cli_repeated_id_is_an_error_naming_both_lines(tmp_path, capsys):
    """With ids a, b, a the output used to read {"id": "a", "duplicate_of": "a"}: ambiguous."""
    from pipeline.dedup.__main__ import main

    inp = tmp_path / "docs.jsonl"
    text = "a paragraph about rivers, hills and the small boats that cross them at dawn"
    inp.write_text("".join(json.dumps(d) + "\n" for d in [{"id": "a", "text": text}, {"id": "b", "text": "other"},
                                                         {"id": "a", "text": text + "!"}]))
    assert main(["--input", str(inp), "--out", str(tmp_path / "removed.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{inp}:3: id 'a' repeats line 1" in err and "Traceback" not in err
    assert not (tmp_path / "removed.jsonl").exists()


@pytest.mark.parametrize("empty_sig", [np.zeros((0, 0), np.uint64), np.zeros((0, 16), np.uint32)])
def test_ray_map_and_reduce_accept_an_empty_block(empty_sig):
    """A file with no surviving documents is one block of 0 rows (older runs saved its signatures
    as shape (0, 0)); the pure map/reduce functions of the Ray path must pass it through."""
    from pipeline.dedup.ray_exec import _map_block, _reduce_bands

    cfg = MinHashConfig(threshold=0.8, num_perm=16)
    nd = NearDedup(cfg)
    texts = ["the quick brown fox jumps over the lazy dog again and again"] * 2 + ["something else entirely"]
    full = (np.array([1, 2, 3], np.int64), np.asarray(nd.signatures(texts)))
    empty = (np.zeros(0, np.int64), empty_sig)
    parts = 2
    maps = [_map_block(empty, cfg, parts), _map_block(full, cfg, parts), _map_block(empty, cfg, parts)]
    edges = [_reduce_bands(cfg, *[m[i] for m in maps])[0] for i in range(parts)]
    pairs = {(int(a), int(b)) for x, y in edges for a, b in zip(x, y)}
    assert pairs == {(2, 1), (1, 2)}
    assert nd.duplicates([full])[0].tolist() == [2]
    only_empty = [_reduce_bands(cfg, *[m[i] for m in maps[::2]]) for i in range(parts)]
    assert all(len(x) == 0 and n == 0 for (x, _), n in only_empty)


def _abc():
    """B and C agree on 14/16 values and share band 0 only; A shares band 0 with them and nothing else."""
    cfg = MinHashConfig(threshold=0.8, num_perm=16, bands=2, rows=8, verify=True, verify_bits=32, mode="local")
    rng = np.random.default_rng(0)
    b = rng.integers(0, 2**31, 16).astype(np.uint32)
    c = b.copy()
    c[8] ^= 0x100
    c[9] ^= 0x100
    a = b.copy()
    a[8:] = rng.integers(0, 2**31, 8)
    return cfg, np.stack([a, b, c])


def test_verified_members_of_a_bucket_are_linked_whatever_the_input_order():
    """Verification used to test only member -> bucket leader (the first row): with a dissimilar A leading,
    B and C were never linked, and permuting the rows changed the result. Now each member is verified
    against the bucket's representatives in key order, in-process and on the Ray path alike."""
    from pipeline.dedup import components as cc
    from pipeline.dedup import ray_exec

    cfg, sig = _abc()
    keys = np.array([0, 1, 2], np.int64)
    for perm in ([0, 1, 2], [1, 2, 0], [2, 0, 1]):
        removed, dup = lsh.duplicates_local(keys[perm], sig[perm], cfg)
        assert (removed.tolist(), dup.tolist()) == ([2], [1])
    red, _ = ray_exec._reduce_bands(cfg, ray_exec._map_block((keys[[2, 0, 1]], sig[[2, 0, 1]]), cfg, 1))
    u, v, _ = cc.star_components(red[0], red[1], parts=1)
    assert (u.tolist(), v.tolist()) == ([2], [1])


def test_bucket_edges_match_the_reference():
    rng = np.random.default_rng(1)
    low = rng.integers(0, 4, (60, 16)).astype(np.uint8)      # 2-bit values: many near-equal rows
    bkey = rng.integers(1, 6, 60).astype(np.uint64)
    keys = rng.permutation(1000)[:60].astype(np.int64)
    rows = np.arange(60, dtype=np.int64)
    for need in (4.0, 6.5, 9.0):
        got = lsh.bucket_edges(bkey, keys, rows, low, need)
        ref = lsh.bucket_edges_reference(bkey, keys, rows, low, need)
        assert [x.tolist() for x in got] == [x.tolist() for x in ref]


def test_bad_signature_blocks():
    """A signature width other than num_perm used to be read past its rows; an empty (0, 0) block (a file
    without documents) crashed the in-process path; a block repeating a key merged two documents on Ray;
    a pair exactly at the threshold was rejected with 32-bit verification."""
    from pipeline.dedup import ray_exec

    cfg, sig = _abc()
    with pytest.raises(ValueError, match="num_perm"):
        lsh.duplicates_local(np.arange(3), sig[:, :8], cfg)
    removed, _ = NearDedup(cfg).duplicates([(np.arange(3), sig), (np.zeros(0, np.int64), np.zeros((0, 0), np.uint32))])
    assert removed.tolist() == [2]
    with pytest.raises(ValueError, match="unique"):
        ray_exec._map_block((np.array([5, 5, 7]), sig), cfg, 1)
    exact = MinHashConfig(threshold=0.75, num_perm=128, bands=1, rows=32, verify_bits=32, mode="local")
    a = np.random.default_rng(0).integers(0, 2**32, 128, dtype=np.uint64).astype(np.uint32)
    b = a.copy()
    b[96:] = ~a[96:]                                         # 96 / 128 = 0.75 exactly
    assert lsh.duplicates_local(np.array([0, 1]), np.stack([a, b]), exact)[0].tolist() == [1]


def test_cli_counts_invalid_utf8_as_not_utf8():
    """A line with invalid UTF-8 was counted as not_json."""
    from pipeline.dedup.__main__ import _parse

    assert _parse(b'{"id": 1, "text": "caf\xe9"}')[2] == "not_utf8"
    assert _parse(b'{"id": 1, "text": ')[2] == "not_json"
    assert _parse('{"id": 1, "text": "café"}'.encode()) == (1, "café", None)


def test_local_near_dedup_reports_each_band():
    """The near-dedup stage had no progress bar; local mode now reports every LSH band to a callback."""
    cfg = MinHashConfig(num_perm=32, threshold=0.7, mode="local")
    nd = NearDedup(cfg)
    texts = _random_texts(30, seed=3)
    sig = nd.signatures(texts + texts[:3])
    calls = []
    removed, _ = nd.duplicates([(np.arange(len(sig), dtype=np.int64), sig)], lambda d, b: calls.append((d, b)))
    assert calls == [(j + 1, cfg.bands) for j in range(cfg.bands)]
    assert sorted(removed.tolist()) == [30, 31, 32]


def test_ray_plan_sizes_partitions_from_the_data_and_groups_blocks():
    """Partitions came from the CPU count (2 x 1,280 on a big cluster) and each block was one map task, so most
    map pieces were under Ray's 100 KiB inline limit and landed in the driver. The plan sizes both from the data."""
    from pipeline.dedup.ray_exec import in_flight_cap, plan, plan_components, row_bytes

    cfg = MinHashConfig()
    doc_bytes = cfg.bands * row_bytes(cfg)
    assert doc_bytes == 14 * (16 + 128)
    assert plan([10_000] * 16, cfg)[0] == -(-160_000 * doc_bytes // (64 << 20)) == 5
    assert plan([10_000] * 50_000, cfg)[0] == 2048                     # clamped (5e8 documents)
    assert plan([3], cfg) == (1, [[0]])
    for sizes, parts in (([10_000] * 16, 256), ([10_000] * 300, 512), ([7, 70_000, 5] * 40, 64), ([10] * 9, 3)):
        p, groups = plan(sizes, MinHashConfig(partitions=parts))
        assert p == parts and sorted(i for g in groups for i in g) == list(range(len(sizes)))
        assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)      # consecutive blocks
        docs = [sum(sizes[i] for i in g) for g in groups]
        if len(groups) > 1:                                               # every piece >= min_piece_kib
            assert min(docs) * doc_bytes // parts >= cfg.min_piece_kib << 10
    small = MinHashConfig(map_docs=30, min_piece_kib=0)
    assert plan([10] * 9, small)[1] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert plan([10] * 7, small)[1] == [[0, 1, 2], [3, 4, 5, 6]]             # a short last group joins the one before
    assert plan_components([0] * 8, cfg) == (1, [list(range(8))])
    assert plan_components([10**6] * 4, cfg) == (1, [[0], [1], [2], [3]])   # 61 MiB of edges, >= 1 MiB each
    assert plan_components([10**7] * 4, cfg) == (10, [[0], [1], [2], [3]])
    few = MinHashConfig(component_partitions=4, min_piece_kib=1)           # groups of >= 256 edges
    assert plan_components([100] * 10, few) == (4, [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]])
    assert (in_flight_cap(cfg, 4, 2), in_flight_cap(cfg, 512, 1280), in_flight_cap(cfg, 1 << 20, 8)) == (4, 128, 1)
    assert in_flight_cap(MinHashConfig(max_in_flight=3), 512, 1280) == 3
    with pytest.raises(ValueError, match="max_in_flight"):
        MinHashConfig(max_in_flight=0)


def test_ray_result_is_independent_of_partitions_grouping_and_merges():
    """Partition counts, block groupings, map tasks in flight, merges of finished maps and component
    partitions change how the work is cut, never the removed keys or their duplicate_of."""
    import ray

    from pipeline.dedup import ray_exec

    texts, _ = make_corpus(SynthConfig(docs=1200, seed=8, mean_chars=500))
    sig = NearDedup(MinHashConfig(mode="local")).signatures(texts)
    keys = np.random.default_rng(2).permutation(10 * len(texts))[: len(texts)].astype(np.int64)
    blocks = [(keys[i : i + 30], sig[i : i + 30]) for i in range(0, len(texts), 30)]   # 40 blocks
    settings = [  # (config, map tasks, merged maps, component partitions)
        ({}, 1, 0, 1),                                                    # sized from the data: one of each
        (dict(partitions=7, map_docs=1, min_piece_kib=0, max_in_flight=1, component_partitions=3), 40, 32, 3),
        (dict(partitions=2, map_docs=90, min_piece_kib=0, max_in_flight=3, component_partitions=5), 13, 0, 5),
        (dict(partitions=4, map_docs=1, min_piece_kib=0), 40, 32, 1),
        (dict(partitions=3, verify=False, map_docs=500, min_piece_kib=0), 2, 0, 1),
    ]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        refs = [ray.put(b) for b in blocks]
        for k, (params, map_tasks, merged, q) in enumerate(settings):
            min_piece = params.get("min_piece_kib", 1024)
            cfg = MinHashConfig(mode="ray", **params)
            want = lsh.duplicates_local(keys, sig, cfg)
            assert len(want[0]) > 50
            for blk in ([blocks, refs] if k == 0 else [(blocks, refs)[k % 2]]):    # in-driver blocks or refs
                removed, dup, stats = ray_exec.duplicates_ray(blk, cfg)
                np.testing.assert_array_equal(removed, want[0])
                np.testing.assert_array_equal(dup, want[1])
                assert (stats["map_tasks"], stats["merged_maps"], stats["component_partitions"]) == (map_tasks, merged, q)
                assert stats["split_tasks"] == (1 if min_piece else stats["partitions"])
        assert ray_exec.duplicates_ray([], MinHashConfig())[0].tolist() == []
    finally:
        ray.shutdown()


def test_cli_counts_a_deeply_nested_line_as_not_json():
    """json.loads raises RecursionError on deep nesting; the CLI counts that line instead of crashing."""
    from pipeline.dedup.__main__ import _parse

    deep = ('{"id": 1, "text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    assert _parse(deep) == (None, None, "not_json")
