"""World tokenizer against the `rwkv` package's TRIE_TOKENIZER (the oracle) and the plain reference."""

from __future__ import annotations

import hashlib
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer import VOCAB_PATH, VOCAB_SHA256, TokenizerConfig, VocabError, WorldTokenizer
from tokenizer.trie import encode_plain

SAMPLE = Path(__file__).resolve().parents[1] / "tokenizer" / "data" / "multilingual_sample.txt"
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def entries(tok) -> dict[bytes, int]:
    return {tok.token_bytes(i): i for i in range(1, tok.n_entries + 1)}


def sections() -> dict[str, str]:
    out: dict[str, str] = {}
    name = None
    for line in SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("## "):
            name = line[3:].strip()
            out[name] = ""
        elif name is not None:
            out[name] += line
    return out


def test_spec_examples(tok):
    assert tok.encode("Hello world") == [33155, 40213]
    assert tok.encode("\n\nUser: 你好") == [261, 24281, 59, 33, 10464, 11685]
    assert tok.decode([33155, 40213]) == "Hello world"


def test_constants(tok):
    assert tok.eod_id == 0
    assert tok.vocab_size == 65536
    assert tok.n_entries == 65529
    assert tok.vocab_sha256 == VOCAB_SHA256 == hashlib.sha256(VOCAB_PATH.read_bytes()).hexdigest()


def test_shipped_vocab_equals_rwkv_package():
    import rwkv

    theirs = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
    assert VOCAB_PATH.read_bytes() == theirs.read_bytes()


def test_vocab_matches_reference_table(tok, ref):
    assert {i: tok.token_bytes(i) for i in range(1, tok.n_entries + 1)} == ref.idx2token


@pytest.mark.parametrize("name", list(sections()))
def test_scripts_match_reference(tok, ref, name):
    text = sections()[name]
    assert len(text) > 20
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_to_array(text).dtype == np.uint16
    assert tok.encode_to_array(text).tolist() == ids


def test_every_vocab_entry_alone_and_joined(tok, ref):
    rng = random.Random(0)
    ids = list(range(1, tok.n_entries + 1))
    rng.shuffle(ids)
    for i in ids[:3000]:
        b = tok.token_bytes(i)
        assert tok.encode_bytes(b) == ref.encodeBytes(b) == [i]
    blob = tok.decode_bytes(ids)
    assert tok.encode_bytes(blob) == ref.encodeBytes(blob)


def test_code_sources(tok, ref):
    import json
    import tokenize as tokenize_module

    for mod in (json, tokenize_module, sys.modules["tokenizer.trie"]):
        text = Path(mod.__file__).read_text(encoding="utf-8")
        assert tok.encode(text) == ref.encode(text)


@pytest.mark.parametrize("unit", [" ", "\t", "\n", "\r\n", " \n", "\t ", "-", "=", "#", "0", "9", "a", "好"])
def test_runs(tok, ref, unit):
    for n in [1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000]:
        for text in (unit * n, "x" + unit * n + "y", unit * n + "\n"):
            assert tok.encode(text) == ref.encode(text), (unit, n)


def test_digits(tok, ref):
    rng = random.Random(1)
    text = " ".join(str(rng.randrange(10 ** rng.randrange(1, 30))) for _ in range(2000))
    text += "".join(rng.choice("0123456789.,-+e ") for _ in range(20000))
    assert tok.encode(text) == ref.encode(text)


def test_random_bytes_including_invalid_utf8(tok, ref, entries):
    rng = np.random.default_rng(2)
    for n in [1, 2, 3, 5, 100, 4096, 100_000]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        ids = tok.encode_bytes(data)
        assert ids == ref.encodeBytes(data)
        assert tok.decode_bytes(ids) == data
        if n <= 4096:
            assert ids == encode_plain(entries, data)
    skewed = rng.choice(np.frombuffer(b" \n\t\x00\x80\xc3\xa9\xe4\xbd\xa0\xff" + b"abc", np.uint8), 50_000)
    data = skewed.tobytes()
    assert tok.encode_bytes(data) == ref.encodeBytes(data)
    assert tok.encode_bytes(bytearray(data)) == tok.encode_bytes(memoryview(data)) == ref.encodeBytes(data)
    # a strided view raised BufferError in np.frombuffer while encode_batch took it
    assert tok.encode_bytes(memoryview(data)[::2]) == ref.encodeBytes(data[::2]) == tok.encode_batch([memoryview(data)[::2]])[0]


def test_empty(tok):
    assert tok.encode("") == []
    assert tok.encode_bytes(b"") == []
    assert tok.encode_to_array("").shape == (0,)
    assert tok.decode([]) == ""
    assert tok.decode_bytes([]) == b""
    assert tok.encode_batch([]) == []
    ids, offsets = tok.encode_batch_flat([])
    assert ids.shape == (0,) and offsets.tolist() == [0]
    assert tok.encode_batch(["", "a", ""]) == [[], [98], []]


def one_megabyte(tok) -> bytes:
    """~1 MB mixing every sample script, code, whitespace and some invalid UTF-8, in shuffled blocks."""
    rng = random.Random(3)
    blocks = list(sections().values())
    blocks += [Path(mod.__file__).read_text(encoding="utf-8") for mod in (random, shutil, hashlib)]
    blocks += [bytes(rng.randrange(256) for _ in range(300)).decode("latin-1")]
    out = bytearray()
    while len(out) < 1_000_000:
        b = rng.choice(blocks).encode("utf-8")
        a = rng.randrange(len(b))
        out += b[a : a + rng.randrange(1, 20_000)]
        if rng.random() < 0.05:
            out += bytes([rng.randrange(128, 256)])
    return bytes(out[:1_000_000])


def test_one_megabyte_document(tok, ref):
    data = one_megabyte(tok)
    ids = tok.encode_bytes(data)
    assert ids == ref.encodeBytes(data)
    assert tok.decode_bytes(ids) == data
    text = data.decode("utf-8", errors="replace")
    assert tok.encode(text) == tok.encode_bytes(text.encode("utf-8"))


@HYP
@given(st.text(max_size=300))
def test_property_random_text(tok, ref, s):
    ids = tok.encode(s)
    assert ids == ref.encode(s)
    assert tok.decode(ids) == s
    assert 0 not in ids


@HYP
@given(st.binary(max_size=300))
def test_property_random_bytes(tok, ref, entries, b):
    ids = tok.encode_bytes(b)
    assert ids == ref.encodeBytes(b)
    assert ids == encode_plain(entries, b)
    assert tok.decode_bytes(ids) == b


@HYP
@given(st.lists(st.integers(0, 65529), max_size=50))
def test_property_decode_never_raises(tok, ref, ids):
    text = tok.decode(ids)
    raw = tok.decode_bytes(ids)
    assert text == raw.decode("utf-8", errors="replace")
    nonzero = [i for i in ids if i]
    if nonzero:
        try:
            expected = raw.decode("utf-8")
        except UnicodeDecodeError:
            expected = None
        if expected is not None:
            assert ref.decode(nonzero) == text


def test_bad_inputs_raise_like_the_reference(tok, ref):
    with pytest.raises(UnicodeEncodeError):
        ref.encode("a\ud800b")
    with pytest.raises(UnicodeEncodeError):
        tok.encode("a\ud800b")
    with pytest.raises(TypeError, match="encode_bytes"):
        tok.encode(b"bytes")


def test_decode_special_ids(tok):
    assert tok.decode([0]) == ""
    assert tok.decode([0, 33155, 0, 40213, 0]) == "Hello world"
    assert tok.decode(np.array([33155, 40213], np.uint16)) == "Hello world"
    assert tok.decode([129]) == "\ufffd"
    for bad in ([65530], [65535], [-1], [1, 2, 70000]):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode(bad)
    with pytest.raises(ValueError, match="integers"):
        tok.decode([1.5])


def test_encode_batch_matches_encode(tok):
    texts = (
        list(sections().values()) * 40
        + ["", "a", "\xff"]
        + [one_megabyte(tok)[:200_000].decode("utf-8", "replace")]
    )
    random.Random(4).shuffle(texts)
    expected = [tok.encode(t) for t in texts]
    for workers in (1, 2, 3):
        assert tok.encode_batch(texts, num_workers=workers) == expected
        got = tok.encode_batch_to_arrays(texts, num_workers=workers)
        assert [a.tolist() for a in got] == expected
        ids, offsets = tok.encode_batch_flat(texts, num_workers=workers)
        assert ids.dtype == np.uint16 and offsets.dtype == np.int64 and offsets.shape == (len(texts) + 1,)
        assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == expected
    small_groups = WorldTokenizer(TokenizerConfig(min_batch_bytes_per_worker=1))
    assert small_groups.encode_batch(texts[:7], num_workers=4) == expected[:7]
    raw = [t.encode("utf-8") for t in texts[:10]]
    assert tok.encode_batch(raw) == [tok.encode_bytes(b) for b in raw]
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")


def test_pickle_ships_config_only(tok):
    import pickle

    blob = pickle.dumps(tok)
    assert len(blob) < 2000
    again = pickle.loads(blob)
    assert again.vocab_sha256 == tok.vocab_sha256
    assert again.encode("\n\nUser: 你好") == [261, 24281, 59, 33, 10464, 11685]


def test_encode_docs_from_arrow_buffers(tok):
    import pyarrow as pa

    texts = list(sections().values()) + ["", "Hello world", "\n\nUser: 你好"]
    col = pa.array(texts, pa.large_string()).slice(2)
    bufs = col.buffers()
    offsets = np.frombuffer(bufs[1], np.int64)[col.offset : col.offset + len(col) + 1]
    ids, tok_offsets = tok.encode_docs(bufs[2], offsets)
    assert ids.dtype == np.uint16 and tok_offsets.tolist()[0] == 0
    got = [ids[a:b].tolist() for a, b in zip(tok_offsets[:-1], tok_offsets[1:])]
    assert got == [tok.encode(t) for t in texts[2:]]
    data = np.frombuffer(b"abc", np.uint8)
    for bad in ([0, 4], [2, 1], [-1, 2], []):
        with pytest.raises(ValueError):
            tok.encode_docs(data, bad)


def test_vocab_missing(tmp_path):
    with pytest.raises(VocabError, match="not found"):
        WorldTokenizer(TokenizerConfig(vocab_path=str(tmp_path / "nope.txt")))


def test_vocab_path_that_cannot_be_read_is_a_vocab_error(tmp_path):
    """A folder (or a file without read permission) raised a bare IsADirectoryError/PermissionError."""
    with pytest.raises(VocabError, match=f"{tmp_path}: cannot read the vocab file: Is a directory"):
        WorldTokenizer(TokenizerConfig(vocab_path=str(tmp_path)))


def test_vocab_altered(tmp_path):
    raw = bytearray(VOCAB_PATH.read_bytes())
    raw[raw.index(b"'Hello'") + 1] = ord("J")
    path = tmp_path / "vocab.txt"
    path.write_bytes(bytes(raw))
    with pytest.raises(VocabError, match="sha256"):
        WorldTokenizer(TokenizerConfig(vocab_path=str(path)))


@pytest.mark.parametrize(
    "line, message",
    [
        ("2 'b' 1\n", "out of order"),
        ("1 'ab' 1\n", "2 bytes"),
        ("1 'a\n", "cannot parse"),
        ("1 __import__('os') 1\n", "cannot parse"),
        ("1 7 1\n", "not a non-empty"),
    ],
)
def test_vocab_malformed_line_named(tmp_path, line, message):
    path = tmp_path / "vocab.txt"
    path.write_text("1 'x' 1\n" + line.replace("1 ", "2 ", 1).replace("2 'b'", "3 'b'"), encoding="utf-8")
    with pytest.raises(VocabError, match=message) as e:
        WorldTokenizer(TokenizerConfig(vocab_path=str(path), expected_sha256=None))
    assert f"{path}:2" in str(e.value)


def test_vocab_parser_handles_escapes():
    from tokenizer.vocab import parse_vocab_text

    text = "1 '\\n' 1\n2 b'\\xff' 1\n3 \"it's\" 4\n4 '\\u4f60' 3\n5 b'a\"' 2\n"
    assert parse_vocab_text(text, "x") == [b"", b"\n", b"\xff", b"it's", "你".encode(), b'a"']


def test_buffers_of_wider_items_are_a_type_error(tok):
    """An int64 array of byte values used to be encoded as its raw memory (ids with NUL padding, no error)."""
    import array

    import numpy as np

    assert tok.encode_bytes(np.frombuffer(b"hi", np.uint8)) == tok.encode_bytes(bytearray(b"hi")) == tok.encode("hi")
    for wide in (np.array([104, 105], np.int64), array.array("H", [104, 105])):
        with pytest.raises(TypeError, match="buffer of bytes"):
            tok.encode_bytes(wide)
        with pytest.raises(TypeError, match="buffer of bytes"):
            tok.encode_batch([wide])
