"""The list-building paths of WorldTokenizer: the C builder (tokenizer/_lists.c) and its plain numpy
path (shared-int windows), and groups built while others encode.

Every test runs on both paths. Every document's list is checked against the `rwkv` package's
TRIE_TOKENIZER and against the uint16 array path, with windows and groups small enough that documents
straddle their edges.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from tokenizer import TokenizerConfig, WorldTokenizer, world

SAMPLE = Path(__file__).resolve().parents[1] / "tokenizer" / "data" / "multilingual_sample.txt"


@pytest.fixture(autouse=True, params=["c", "numpy"])
def list_path(request, monkeypatch):
    """Run each test with the C list builder and again with the numpy path it must equal."""
    if request.param == "numpy":
        monkeypatch.setattr(world, "_lists", None)
    return request.param


def test_c_list_builder_is_built(list_path):
    """`pip install -e .` (make install) compiles tokenizer/_lists.c; CI has a compiler, so a missing
    module means a broken build, not a missing feature."""
    if list_path == "numpy":
        pytest.skip("checked once, on the C run")
    assert world._lists is not None, "tokenizer._lists was not built: run `pip install -e .` with a C compiler"


def test_c_list_builder_rejects_bad_input(tok, list_path):
    if list_path == "numpy":
        pytest.skip("the numpy path has no C builder")
    ids = np.array([1, 2, 3], np.uint16)
    with pytest.raises(ValueError, match="not a range"):
        world._lists.lists(tok._ints, ids, np.array([0, 4], np.int64))
    with pytest.raises(ValueError, match="not a range"):
        world._lists.lists(tok._ints, ids, np.array([2, 1], np.int64))
    bad = (ids.astype(np.int64), ids.astype(np.int32), ids.astype(">u2"), ids.view(np.int16), ids.view(np.uint8))
    for wrong in bad:  # the element type is checked, not only the byte length
        with pytest.raises(ValueError, match="uint16"):
            world._lists.lists(tok._ints, wrong, np.array([0, 1], np.int64))
    for wrong in (np.array([0, 1], np.int32), np.array([0, 1], np.uint64), np.array([0.0, 1.0])):
        with pytest.raises(ValueError, match="int64"):
            world._lists.lists(tok._ints, ids, wrong)
    with pytest.raises((BufferError, ValueError), match="contiguous"):
        world._lists.lists(tok._ints, np.array([1, 0, 2, 0], np.uint16)[::2], np.array([0, 2], np.int64))
    with pytest.raises(ValueError, match="id 9 at position 1"):
        world._lists.lists([0, 1, 2], np.array([1, 9], np.uint16), np.array([0, 2], np.int64))
    assert world._lists.lists(tok._ints, ids, np.array([0], np.int64)) == []


@pytest.fixture(scope="module")
def docs() -> list[str | bytes]:
    """Empty, one-token, high-id (CJK, emoji), invalid-UTF-8 and long documents, shuffled."""
    rng = random.Random(5)
    lines = [ln for ln in SAMPLE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out: list[str | bytes] = ["", "a", "\n", "你", "👨‍👩‍👧‍👦", "", b"", b"\xff", b"\xc3", "Hello world"]
    out += ["".join(rng.choice(lines) for _ in range(rng.randrange(1, 12))) for _ in range(60)]
    out += [" " * 1000, "好" * 333, bytes(rng.randrange(256) for _ in range(3000))]
    out += ["\n".join(lines) * 20]  # ~110k tokens: longer than the default window
    rng.shuffle(out)
    return out


def expected_ids(ref, doc: str | bytes) -> list[int]:
    return ref.encodeBytes(doc) if isinstance(doc, bytes) else ref.encode(doc)


@pytest.fixture(scope="module")
def expected(ref, docs) -> list[list[int]]:
    return [expected_ids(ref, d) for d in docs]


def test_fixture_covers_the_cases(docs, expected):
    lengths = [len(e) for e in expected]
    assert 0 in lengths and 1 in lengths
    assert max(lengths) > world._WINDOW
    assert any(i > 255 for e in expected for i in e) and any(i < 256 for e in expected for i in e)


@pytest.mark.parametrize("window", [1, 2, 7, 300, None])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_batch_lists_match_reference_and_arrays(tok, docs, expected, monkeypatch, window, workers):
    if window is not None:
        monkeypatch.setattr(world, "_WINDOW", window)
    got = tok.encode_batch(docs, num_workers=workers)
    assert got == expected
    assert all(type(i) is int for doc in got for i in doc)
    arrays = tok.encode_batch_to_arrays(docs, num_workers=workers)
    assert [a.tolist() for a in arrays] == expected


@pytest.mark.parametrize("groups_per_worker", [1, 2, 5])
def test_many_small_groups(docs, expected, monkeypatch, groups_per_worker):
    monkeypatch.setattr(world, "_GROUPS_PER_WORKER", groups_per_worker)
    monkeypatch.setattr(world, "_WINDOW", 5)
    small = WorldTokenizer(TokenizerConfig(min_batch_bytes_per_worker=1))
    assert small.encode_batch(docs, num_workers=2) == expected
    assert small.encode_batch(docs[:3], num_workers=4) == expected[:3]
    assert small.encode_batch([""] * 5, num_workers=2) == [[]] * 5


def test_to_lists_bounds(tok):
    ids = np.array([1, 300, 65529, 256, 255, 300, 7], np.uint16)
    for bounds in ([0, 7], [0, 0, 7], [0, 3, 3, 7, 7], [2, 5], [0, 1, 2, 3, 4, 5, 6, 7]):
        got = tok._to_lists(ids, bounds)
        assert got == [ids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
    assert tok._to_lists(ids, [0]) == []


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 5000])
def test_single_document_list_sizes(tok, ref, n):
    """Both sides of the short-output switch in `_to_list` (ids.tolist() up to 256 ids, take above).

    A prefix of the bytes that ends on a token boundary encodes to the same first n tokens.
    """
    text = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(6000))  # CJK: ids far above 255
    full = tok.encode(text)
    assert full == ref.encode(text) == tok.encode_to_array(text).tolist()
    data = tok.decode_bytes(full[:n])
    ids = tok.encode_bytes(data)
    assert ids == full[:n] == ref.encodeBytes(data)
    assert all(type(i) is int for i in ids)


def test_error_in_a_worker_group_reaches_the_caller():
    small = WorldTokenizer(TokenizerConfig(min_batch_bytes_per_worker=1))
    with pytest.raises(UnicodeEncodeError):
        small.encode_batch(["abc"] * 10 + ["a\ud800"] + ["x"] * 10, num_workers=2)
    assert small.encode_batch(["ab", "cd"], num_workers=2) == [[1734], [1787]]
