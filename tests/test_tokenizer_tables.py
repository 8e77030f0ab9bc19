"""The compiled trie tables: build check, disk cache validation, fallback when unwritable."""

from __future__ import annotations

import numpy as np
import pytest

from tokenizer import TokenizerConfig, WorldTokenizer, tables, trie
from tokenizer.vocab import read_vocab


@pytest.fixture()
def vocab():
    return read_vocab()


def test_cache_round_trip_and_rebuild_when_corrupt(tmp_path, monkeypatch, vocab):
    path, raw, sha = vocab
    monkeypatch.setattr(tables, "cache_dirs", lambda: [tmp_path / "c"])
    built = tables.load_tables(raw, sha, path)
    files = list((tmp_path / "c").glob("world_trie_*.npz"))
    assert len(files) == 1 and sha[:32] in files[0].name
    again = tables.load_tables(raw, sha, path)
    assert again.digest() == built.digest()
    assert again.tokens() == built.tokens()

    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))
    assert tables._read_cache(files[0], sha) is None
    rebuilt = tables.load_tables(raw, sha, path)
    assert rebuilt.digest() == built.digest()
    assert tables._read_cache(files[0], sha) is not None
    assert tables._read_cache(files[0], "0" * 64) is None


def test_unwritable_cache_falls_back(tmp_path, monkeypatch, vocab):
    path, raw, sha = vocab
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(tables, "cache_dirs", lambda: [blocker / "sub", tmp_path / "user"])
    tables.load_tables(raw, sha, path)
    assert list((tmp_path / "user").glob("world_trie_*.npz"))
    monkeypatch.setattr(tables, "cache_dirs", lambda: [blocker / "sub"])
    tok = WorldTokenizer()
    assert tok.encode("Hello world") == [33155, 40213]


def test_uncached_equals_cached():
    a = WorldTokenizer(TokenizerConfig(use_cache=False))
    b = WorldTokenizer()
    assert np.array_equal(a._table, b._table) and np.array_equal(a._value, b._value)
    assert a._tokens == b._tokens


def test_check_tables_catches_a_broken_table(vocab):
    path, raw, sha = vocab
    t = tables.build(tables.parse_vocab(raw, path, sha))
    assert trie.check_tables(t.blob, t.offsets, t.table, t.value) == 0
    value = t.value.copy()
    slot = int(np.flatnonzero(value == 33155)[0])  # 'Hello'
    value[slot] = 0
    assert trie.check_tables(t.blob, t.offsets, t.table, value) == 33155


def test_table_layout_facts(vocab):
    tok = WorldTokenizer()
    table = tok._table
    assert table.dtype == np.uint32 and tok._value.dtype == np.uint16
    assert int(table.max() >> 8) + 256 <= table.shape[0]
    assert (table[:256] & 0xFF != np.arange(256)).all()  # a leaf (base 0) never matches
    assert int(np.count_nonzero(tok._value)) == tok.n_entries


def test_walk_near_the_end_check(vocab):
    """Tokens up to the longest entry straddling end - MAX_TOKEN_BYTES, where the walk switches to the checked loop."""
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    tok = WorldTokenizer()
    ref = TRIE_TOKENIZER(str(vocab[0]))
    entries = {tok.token_bytes(i): i for i in range(1, tok.n_entries + 1)}
    longest = max(entries, key=len)
    units = [longest, b" " * 200, b"=" * 90 + b"\n", "的是".encode() * 40, b"\xff\xfe" * 70]
    rng = np.random.default_rng(3)
    for n in range(trie.MAX_TOKEN_BYTES - 8, 3 * trie.MAX_TOKEN_BYTES, 5):
        parts = [units[int(rng.integers(len(units)))] for _ in range(n // 60 + 2)]
        stream = b"".join(parts)
        data = stream[:n]
        want = trie.encode_plain(entries, data)
        assert tok.encode_bytes(data) == want == ref.encodeBytes(data), n
        # as a document followed by the rest of the stream, which would extend its last token
        # if the walk read past the document's end (start > 0 in the compiled walk)
        joined = np.frombuffer(b"ab" + stream, np.uint8)
        ids, offs = tok.encode_docs(joined, [0, 2, 2 + n, len(joined)])
        assert ids[offs[1] : offs[2]].tolist() == want, n


def test_build_rejects_an_entry_longer_than_a_walk_may_read(vocab):
    path, raw, sha = vocab
    tokens = tables.parse_vocab(raw, path, sha)
    with pytest.raises(ValueError, match="longer than"):
        trie.build_tables(tokens + [b"x" * (trie.MAX_TOKEN_BYTES + 1)])
