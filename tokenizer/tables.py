"""The compiled trie tables of a vocab, cached on disk keyed by the vocab's sha256.

Building takes ~0.1 s plus loading two compiled numba functions (~0.5 s on this machine), so
the result is kept as an .npz next to the package's compiled files (tokenizer/__pycache__/),
or in the user cache dir when the package is read-only, or nowhere (built each time) when
neither is writable. A cache file is used only if its name and contents carry the same
vocab sha256 and layout version and a sha256 over its arrays matches; otherwise it is
rebuilt. It appears by atomic rename, so concurrent builders (e.g. Ray workers) are safe.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenizer import trie
from tokenizer.vocab import parse_vocab


@dataclass(frozen=True)
class Tables:
    """Everything encoding and decoding need, derived from one vocab file."""

    table: np.ndarray  # [slots] uint32, label | base << 8
    value: np.ndarray  # [slots] uint16, id ending at the slot or 0
    blob: np.ndarray  # [total entry bytes] uint8, entries in id order
    offsets: np.ndarray  # [n_entries + 1] int64, entry i is blob[offsets[i-1]:offsets[i]]

    def tokens(self) -> list[bytes]:
        raw = self.blob.tobytes()
        off = self.offsets.tolist()
        return [b""] + [raw[a:b] for a, b in zip(off[:-1], off[1:])]

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.table, self.value, self.blob, self.offsets):
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def build(tokens: list[bytes]) -> Tables:
    table, value = trie.build_tables(tokens)
    blob = np.frombuffer(b"".join(tokens), np.uint8)
    offsets = np.cumsum([len(t) for t in tokens], dtype=np.int64)  # tokens[0] is b""
    tables = Tables(table=table, value=value, blob=blob, offsets=offsets)
    bad = trie.check_tables(blob, offsets, table, value)
    if bad:
        raise RuntimeError(f"trie build is wrong: entry {bad} does not encode to itself")
    return tables


def cache_dirs() -> list[Path]:
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rwkv-forge-tokenizer"
    return [Path(__file__).resolve().parent / "__pycache__", user]


def _cache_name(sha: str) -> str:
    return f"world_trie_{sha[:32]}_v{trie.LAYOUT_VERSION}.npz"


def _read_cache(path: Path, sha: str) -> Tables | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = {k: str(z[k]) for k in ("vocab_sha256", "layout_version", "digest")}
            tables = Tables(table=z["table"], value=z["value"], blob=z["blob"], offsets=z["offsets"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    ok = (
        meta["vocab_sha256"] == sha
        and meta["layout_version"] == str(trie.LAYOUT_VERSION)
        and meta["digest"] == tables.digest()
        and tables.table.dtype == np.uint32
        and tables.value.dtype == np.uint16
        and tables.table.shape == tables.value.shape
        and tables.table.shape[0] >= 512
        and int(tables.table.max() >> 8) + 256 <= tables.table.shape[0]  # no walk leaves the table
        and tables.offsets.dtype == np.int64
        and int(tables.offsets[-1]) == tables.blob.shape[0]
    )
    return tables if ok else None


def _write_cache(directory: Path, sha: str, tables: Tables) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".world_trie_", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    vocab_sha256=np.array(sha),
                    layout_version=np.array(str(trie.LAYOUT_VERSION)),
                    digest=np.array(tables.digest()),
                    table=tables.table,
                    value=tables.value,
                    blob=tables.blob,
                    offsets=tables.offsets,
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, directory / _cache_name(sha))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True
    except OSError:
        return False


def load_tables(raw_vocab: bytes, sha: str, path: Path, use_cache: bool = True) -> Tables:
    """Tables for the vocab file content `raw_vocab` (sha256 `sha`, read from `path`)."""
    dirs = cache_dirs() if use_cache else []
    for d in dirs:
        tables = _read_cache(d / _cache_name(sha), sha)
        if tables is not None:
            return tables
    tables = build(parse_vocab(raw_vocab, path, sha))
    for d in dirs:
        if _write_cache(d, sha, tables):
            break
    return tables
