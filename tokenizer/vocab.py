"""The World vocabulary file: checked, parsed without `eval`, returned as bytes per id.

File format (BlinkDL/ChatRWKV `rwkv_vocab_v20230424.txt`, see data/NOTICE.md): each line is
`<id> <Python str or bytes literal> <byte length>`. A str literal stands for its UTF-8 bytes.
Most literals have no backslash, so their bytes are the text between the quotes; the few
hundred with escapes go through `ast.literal_eval` (never `eval`). Parsing all 65,529 lines
takes about 0.1 s this way instead of 0.5 s with `ast.literal_eval` on every line.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from pathlib import Path

VOCAB_PATH = Path(__file__).resolve().parent / "data" / "rwkv_vocab_v20230424.txt"
VOCAB_SHA256 = "8324476023347dec2964625ccb2075c864d250a9c6d9a74f36daba628de8c008"
VOCAB_ENTRIES = 65529
VOCAB_MAX_LEN = 128


class VocabError(ValueError):
    """The vocab file is missing, altered or malformed; the message names file and line."""


@dataclass(frozen=True)
class Vocab:
    """Parsed vocabulary: `tokens[i]` is the byte string of id i (`tokens[0] == b""`, the EOD id)."""

    path: Path
    sha256: str
    tokens: list[bytes]


def _parse_literal(lit: str) -> bytes | str:
    """Value of one Python string/bytes literal; the escape-free common case without `ast`."""
    if "\\" not in lit and len(lit) >= 2:
        if lit[0] in "'\"" and lit[-1] == lit[0] and lit[0] not in lit[1:-1]:
            return lit[1:-1]
        if (
            lit[0] == "b"
            and len(lit) >= 3
            and lit[1] in "'\""
            and lit[-1] == lit[1]
            and lit[1] not in lit[2:-1]
        ):
            return lit[2:-1].encode("ascii")
    return ast.literal_eval(lit)


def parse_vocab_text(text: str, path: Path | str) -> list[bytes]:
    """Parse the vocab text into `tokens[id]`; ids must run 1..N with no gap and no repeat."""
    tokens: list[bytes] = [b""]
    seen: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            first, last = line.index(" "), line.rindex(" ")
            idx, lit, length = int(line[:first]), line[first + 1 : last], int(line[last + 1 :])
            value = _parse_literal(lit)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise VocabError(f"{path}:{lineno}: cannot parse vocab line {line[:80]!r}: {e}") from e
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes) or not value:
            raise VocabError(f"{path}:{lineno}: entry is not a non-empty str/bytes literal: {line[:80]!r}")
        if len(value) != length:
            raise VocabError(f"{path}:{lineno}: entry has {len(value)} bytes but the line says {length}")
        if idx != len(tokens):
            raise VocabError(f"{path}:{lineno}: id {idx} out of order (expected {len(tokens)})")
        if value in seen:
            raise VocabError(f"{path}:{lineno}: id {idx} repeats the bytes of id {seen[value]}")
        seen[value] = idx
        tokens.append(value)
    return tokens


def read_vocab(
    path: Path | str | None = None, expected_sha256: str | None = VOCAB_SHA256
) -> tuple[Path, bytes, str]:
    """(path, raw bytes, sha256) of a vocab file (default: the one shipped in tokenizer/data/).

    Raises VocabError if the file is missing or unreadable or its sha256 differs from `expected_sha256`
    (None skips the check, for a deliberately different vocab).
    """
    path = Path(path) if path is not None else VOCAB_PATH
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise VocabError(
            f"{path}: World vocab file not found (it ships in tokenizer/data/; reinstall the package)"
        ) from e
    except OSError as e:  # a folder, no permission: one VocabError naming the file, not a bare OSError
        raise VocabError(f"{path}: cannot read the vocab file: {e.strerror or e}") from e
    sha = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise VocabError(
            f"{path}: sha256 {sha} does not match the expected {expected_sha256}; "
            "the vocab file was altered or is a different vocab"
        )
    return path, raw, sha


def parse_vocab(raw: bytes, path: Path | str, sha: str) -> list[bytes]:
    """`tokens[id]` from the raw file content; checks what the encoder relies on."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise VocabError(f"{path}:{line}: vocab file is not valid UTF-8: {e}") from e
    tokens = parse_vocab_text(text, path)
    if sha == VOCAB_SHA256 and len(tokens) - 1 != VOCAB_ENTRIES:
        raise VocabError(f"{path}: {len(tokens) - 1} entries, expected {VOCAB_ENTRIES}")
    if len(tokens) > 65536:
        raise VocabError(f"{path}: {len(tokens) - 1} entries; ids must fit in uint16")
    if max(map(len, tokens)) > VOCAB_MAX_LEN:
        raise VocabError(f"{path}: an entry is longer than {VOCAB_MAX_LEN} bytes")
    if len({t for t in tokens if len(t) == 1}) != 256:
        raise VocabError(f"{path}: the vocab must hold all 256 single bytes so every input encodes")
    return tokens


def load_vocab(path: Path | str | None = None, expected_sha256: str | None = VOCAB_SHA256) -> Vocab:
    """Read, sha256-check and parse a vocab file (default: the one shipped in tokenizer/data/)."""
    path, raw, sha = read_vocab(path, expected_sha256)
    return Vocab(path=path, sha256=sha, tokens=parse_vocab(raw, path, sha))
