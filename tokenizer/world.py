"""`WorldTokenizer`: the RWKV World tokenizer (greedy longest match over UTF-8 bytes).

Same ids as the `rwkv` package's `TRIE_TOKENIZER` for every input (tests/test_tokenizer.py),
with the hot loop in tokenizer/trie.py. Id 0 is the end-of-document separator: encoding
never produces it and decoding renders it as nothing. The model's embedding has 65,536 rows,
so ids fit in uint16.

`encode_batch` spreads documents over threads: the compiled encoder releases the GIL, so
threads run it in parallel while the UTF-8 encoding and list building stay in Python. Lists
are built in the calling thread group by group as the threads finish them (several groups per
thread), so building overlaps with encoding. With `num_workers=1` (e.g. inside a Ray actor,
which owns one core) it runs in the caller.
`encode_batch_flat` returns one id array plus document offsets: the layout of an Arrow
list column, so a shard writer needs no per-document Python objects.

Lists of ids cost more than finding the ids. Measured on the benchmark's 12 MB (this shared 2-core
AMD EPYC, CPU ns per token, bench/results/tokenizer.json `ns_per_token_all`): trie walk 12.9, then
with numpy `take` of shared int objects 7.1 and `tolist` 4.3 (each id's object touched three times);
ndarray.tolist() of the uint16 ids makes a new int per id, 24. The C builder tokenizer/_lists.c
makes the lists from the shared ints in one pass: encode() 16.9 ns per token in all, 3.1-3.2x Rust
(the numpy path: 2.0x). Tried and slower: `marshal.loads` of a stream with back-references, `pickle.loads`
with memo gets, `list(map(...))` over a table, windows of 32k ids for a single document.

`decode` replaces invalid UTF-8 byte by byte (errors="replace"); the reference instead
returns a single U+FFFD for the whole text when any byte is invalid. On valid UTF-8 the two
agree (tested).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenizer import trie
from tokenizer.tables import load_tables
from tokenizer.vocab import VOCAB_SHA256, read_vocab

try:  # the C list builder (tokenizer/_lists.c, built by `pip install`); without it, the numpy path below
    from tokenizer import _lists
except ImportError:
    _lists = None


def _byte_buffer(data) -> memoryview:
    """``data`` as a buffer of single bytes; a buffer of wider items (an int64 numpy array, array('H'))
    would otherwise be encoded as its raw memory, so it is a TypeError (encode its bytes explicitly)."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"expected bytes-like input (or str where allowed), got {type(data).__name__}") from None
    if view.itemsize != 1:
        raise TypeError(f"expected a buffer of bytes, got items of {view.itemsize} bytes (format {view.format!r}); "
                        f"pass bytes(...) of the data you mean")
    return view


@dataclass(frozen=True)
class TokenizerConfig:
    """Where the vocab comes from and how batches are spread."""

    vocab_path: str | None = None
    """Vocab file; None = the World vocab shipped in tokenizer/data/."""
    expected_sha256: str | None = VOCAB_SHA256
    """sha256 the file must have; None skips the check (only for a deliberately different vocab)."""
    num_workers: int | None = None
    """Default threads for `encode_batch`; None = the cores this process may use."""
    min_batch_bytes_per_worker: int = 1 << 16
    """Groups of documents (one per worker, or several for `encode_batch`) hold at least this many
    UTF-8 bytes; a batch too small for two groups runs in the calling thread."""
    use_cache: bool = True
    """Keep the compiled trie tables on disk (tokenizer/tables.py says where and how it is checked)."""


_WINDOW = 1 << 15  # ids per shared-int window in `_to_lists` (256 KB of object pointers: stays in cache)
_GROUPS_PER_WORKER = 2  # list batches: groups per thread, so lists are built while later groups encode


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class WorldTokenizer:
    """RWKV World tokenizer: `encode`, `encode_bytes`, `decode`, `decode_bytes`, `encode_batch`."""

    eod_id = 0
    vocab_size = 65536

    def __init__(self, config: TokenizerConfig | None = None):
        self.config = config or TokenizerConfig()
        path, raw, sha = read_vocab(self.config.vocab_path, self.config.expected_sha256)
        self.vocab_path: Path = path
        self.vocab_sha256: str = sha
        tables = load_tables(raw, sha, path, use_cache=self.config.use_cache)
        self._table, self._value = tables.table, tables.value  # [slots] uint32, [slots] uint16
        self._tokens: list[bytes] = tables.tokens()  # [n_entries + 1], id -> bytes, [0] = b""
        self._ints = list(range(len(self._tokens)))  # [n_entries + 1] the shared int objects lists hold
        self._ids = np.array(self._ints, dtype=object)  # the same objects, for the numpy path
        self.encode(" ")  # loads the compiled loop now rather than at the first encode

    def __reduce__(self):
        # Ray and multiprocessing ship the config, not ~2 MB of tables; the receiver reloads them
        # from the vocab file and the disk cache.
        return (type(self), (self.config,))

    def __repr__(self) -> str:
        return f"WorldTokenizer(vocab={self.vocab_path.name}, sha256={self.vocab_sha256[:12]}...)"

    @property
    def n_entries(self) -> int:
        """Ids 1..n_entries have vocab bytes (65,529 for the World vocab)."""
        return len(self._tokens) - 1

    def token_bytes(self, idx: int) -> bytes:
        """The bytes of one id (b"" for the EOD id 0)."""
        return self.decode_bytes([idx])

    # encoding

    def _encode_view(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        if not isinstance(data, bytes):
            view = _byte_buffer(data)
            data = np.frombuffer(view if view.c_contiguous else view.tobytes(), np.uint8)  # a strided view: copy
        return trie.encode_buffer(data, self._table, self._value)

    def encode_bytes_to_array(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        """Token ids of raw bytes as a uint16 array [n_tokens] that owns its memory."""
        return self._encode_view(data).copy()

    def encode_to_array(self, text: str) -> np.ndarray:
        """Token ids of a str (its UTF-8 bytes) as a uint16 array [n_tokens]."""
        return self.encode_bytes_to_array(text.encode("utf-8"))

    def _to_lists(self, ids: np.ndarray, bounds: list[int]) -> list[list[int]]:
        """[ids[bounds[d]:bounds[d+1]].tolist() for each d] [uint16 ids], built from shared int objects:
        in one C pass when tokenizer/_lists.c is built, else by `_to_lists_numpy`."""
        if _lists is not None:
            return _lists.lists(self._ints, ids, np.asarray(bounds, np.int64))
        return self._to_lists_numpy(ids, bounds)

    def _to_list(self, ids: np.ndarray) -> list[int]:
        if _lists is not None:
            return _lists.lists(self._ints, ids, np.array([0, ids.shape[0]], np.int64))[0]
        return self._to_list_numpy(ids)

    def _to_lists_numpy(self, ids: np.ndarray, bounds: list[int]) -> list[list[int]]:
        """The plain path of `_to_lists`.

        Taking shared ints is ~2x faster than ndarray.tolist(), which makes a new int per id. The
        take runs over windows of at least `_WINDOW` ids that hold whole documents, and each
        document's list is a slice of its window: one take and one copy per id.
        """
        out: list[list[int]] = []
        w0 = w1 = 0
        window = self._ids[:0]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > w1:  # ids[w0:w1] does not hold this document: the next window starts at a
                w0, w1 = a, max(b, min(a + _WINDOW, bounds[-1]))
                window = self._ids.take(ids[w0:w1])  # [w1 - w0] shared int objects
            out.append(window[a - w0 : b - w0].tolist())
        return out

    def _to_list_numpy(self, ids: np.ndarray) -> list[int]:
        # For a few ids the take costs more than it saves.
        return ids.tolist() if ids.shape[0] <= 256 else self._ids.take(ids).tolist()

    def encode_bytes(self, data: bytes | bytearray | memoryview) -> list[int]:
        return self._to_list(self._encode_view(data))

    def encode(self, text: str) -> list[int]:
        """Token ids of the UTF-8 bytes of `text` (lone surrogates raise UnicodeEncodeError, as in the reference)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}; use encode_bytes for bytes")
        return self._to_list(self._encode_view(text.encode("utf-8")))

    def _encode_group(self, texts: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
        chunks = [t.encode("utf-8") if isinstance(t, str) else bytes(_byte_buffer(t)) for t in texts]
        doc_offsets = np.zeros(len(chunks) + 1, np.int64)
        np.cumsum([len(c) for c in chunks], out=doc_offsets[1:])
        data = np.frombuffer(b"".join(chunks), np.uint8)
        return trie.encode_docs(data, doc_offsets, self._table, self._value)

    def _workers(self, num_workers: int | None) -> int:
        return num_workers or self.config.num_workers or available_cores()

    def _split(self, texts: Sequence[str | bytes], n_groups: int) -> list[Sequence[str | bytes]]:
        """Contiguous groups of about equal length, at most n_groups (fewer for small batches)."""
        lengths = np.fromiter((len(t) for t in texts), np.int64, len(texts))
        total = int(lengths.sum())
        n_groups = max(1, min(n_groups, len(texts), total // self.config.min_batch_bytes_per_worker))
        if n_groups == 1:
            return [texts]
        cum = np.cumsum(lengths)
        cuts = np.searchsorted(cum, np.arange(1, n_groups) * total / n_groups, side="right").tolist()  # a doc ending on a cut stays left
        bounds = [0, *cuts, len(texts)]
        return [texts[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def encode_batch_to_arrays(
        self, texts: Sequence[str | bytes], num_workers: int | None = None
    ) -> list[np.ndarray]:
        """Token ids of each document as uint16 arrays (views into one buffer per worker)."""
        out: list[np.ndarray] = []
        for ids, offs in self._map_groups(texts, num_workers):
            out.extend(np.split(ids, offs[1:-1]))
        return out

    def encode_batch_flat(
        self, texts: Sequence[str | bytes], num_workers: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n_tokens] uint16, offsets [n_docs + 1] int64): document d is ids[offsets[d]:offsets[d+1]]."""
        parts = list(self._map_groups(texts, num_workers))
        if not parts:
            return np.zeros(0, np.uint16), np.zeros(1, np.int64)
        ids = np.concatenate([p[0] for p in parts])
        shifts = np.cumsum([0] + [int(p[1][-1]) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p[1][1:] + shift for p, shift in zip(parts, shifts)]).astype(
            np.int64
        )
        return ids, offsets

    def encode_docs(self, data, doc_offsets) -> tuple[np.ndarray, np.ndarray]:
        """Documents given as one byte buffer and offsets, e.g. an Arrow string column's buffers (no copy).

        data: uint8 buffer; doc_offsets: [n_docs + 1] non-decreasing, document d is
        data[doc_offsets[d]:doc_offsets[d+1]]. Returns (ids [n_tokens] uint16, token offsets
        [n_docs + 1] int64). Runs in the calling thread, without the GIL.
        """
        data = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
        offsets = np.ascontiguousarray(doc_offsets, dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError(f"data must be a 1-d uint8 buffer, got {data.dtype} with shape {data.shape}")
        if offsets.ndim != 1 or offsets.shape[0] < 1:
            raise ValueError("doc_offsets must be 1-d with n_docs + 1 entries")
        if offsets[0] < 0 or offsets[-1] > data.shape[0] or np.any(np.diff(offsets) < 0):
            raise ValueError(f"doc_offsets must be non-decreasing within [0, {data.shape[0]}]")
        base = int(offsets[0])
        ids, tok_offsets = trie.encode_docs(
            data[base : int(offsets[-1])], offsets - base, self._table, self._value
        )
        return ids.copy(), tok_offsets

    def encode_batch(self, texts: Sequence[str | bytes], num_workers: int | None = None) -> list[list[int]]:
        """Token ids of each document (str, or bytes taken as they are); groups run on threads."""
        out: list[list[int]] = []
        for ids, offs in self._map_groups(texts, num_workers, _GROUPS_PER_WORKER):
            out += self._to_lists(ids, offs.tolist())
        return out

    def _map_groups(self, texts: Sequence[str | bytes], num_workers: int | None, groups_per_worker: int = 1):
        """(ids, token offsets) of each group of documents, in order, encoded on worker threads.

        Yields each group as soon as it is done, so the caller can build Python objects (which
        needs the GIL) while the threads encode later groups (which does not).
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode_batch takes a sequence of documents, not one str/bytes")
        texts = list(texts)
        if not texts:
            return
        workers = self._workers(num_workers)
        groups = self._split(texts, workers * groups_per_worker if workers > 1 else 1)
        if len(groups) == 1:
            yield self._encode_group(groups[0])
            return
        with ThreadPoolExecutor(min(workers, len(groups))) as pool:
            yield from pool.map(self._encode_group, groups)

    # decoding

    def decode_bytes(self, ids: Iterable[int] | np.ndarray) -> bytes:
        """Concatenated bytes of the ids; 0 (EOD) adds nothing; an id without an entry raises ValueError."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        tokens = self._tokens
        try:
            if ids and (min(ids) < 0 or max(ids) >= len(tokens)):
                bad = next(i for i in ids if not 0 <= i < len(tokens))
                raise ValueError(
                    f"token id {bad} is out of range: valid ids are 0 (EOD) and 1..{len(tokens) - 1}"
                )
            return b"".join([tokens[i] for i in ids])
        except TypeError as e:
            raise ValueError(f"token ids must be integers: {e}") from e

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of the ids; bytes that are not valid UTF-8 become U+FFFD (never raises for valid ids)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
