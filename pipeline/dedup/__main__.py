"""Stand-alone near-dedup of a JSONL file: `python -m pipeline.dedup --input docs.jsonl --out removed.jsonl`.

Reads lines with `id` and `text`, writes one line `{"id": ..., "duplicate_of": ...}` per removed
document (the earliest line of each cluster is kept), by atomic rename. Ids must be unique: a repeated
id is an error naming both lines (exit 2), since the output could not say which copy was removed. Bad lines (not JSON, not an
object, missing id or text, empty text) are counted by reason with their first line numbers and
skipped; blank lines are counted as ``blank`` (lines = documents + bad + blank). The file is streamed in batches: parsing of the next batch overlaps the (GIL-free)
signature kernel of the previous ones, and only ids and signatures (4 x num_perm bytes per
document) are kept in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from ..stages import fsync_file
from . import MinHashConfig, NearDedup


class DuplicateIdError(ValueError):
    """Two input lines carry the same id (the output could not say which one was removed)."""


def _parse(line: bytes) -> tuple[object, str | None, str | None]:
    """(id, text, bad reason or None) of one JSONL line."""
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        return None, None, "not_utf8"
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        return None, None, "not_json"
    if not isinstance(obj, dict):
        return None, None, "not_object"
    if obj.get("id") is None:
        return None, None, "missing_id"
    text = obj.get("text")
    if not isinstance(text, str):
        return None, None, "missing_text"
    if not text.strip():
        return None, None, "empty_text"
    return obj["id"], text, None


def run(input_path: str, out_path: str, cfg: MinHashConfig, threads: int, batch: int = 8192) -> dict:
    """Deduplicate one JSONL file; returns the report dict (also what the CLI prints)."""
    t0 = time.perf_counter()
    nd = NearDedup(replace(cfg, threads=1))
    ids: list = []
    bad: Counter = Counter()
    bad_lines: dict[str, list[int]] = {}
    futures = []
    lines = blank = 0
    seen: dict = {}  # id -> first line
    with ThreadPoolExecutor(max(1, threads)) as ex, open(input_path, "rb") as f:
        texts: list[str] = []
        for lineno, line in enumerate(f, 1):
            lines = lineno
            if not line.strip():
                blank += 1
                continue
            doc_id, text, reason = _parse(line)
            if reason:
                bad[reason] += 1
                bad_lines.setdefault(reason, [])
                if len(bad_lines[reason]) < 5:
                    bad_lines[reason].append(lineno)
                continue
            first = seen.setdefault(json.dumps(doc_id), lineno)  # as the output writes it: 1, "1", 1.0 differ
            if first != lineno:
                raise DuplicateIdError(f"{input_path}:{lineno}: id {doc_id!r} repeats line {first}; the output "
                                       f"names documents by id, so ids must be unique")
            ids.append(doc_id)
            texts.append(text)
            if len(texts) == batch:
                futures.append((len(ids) - len(texts), ex.submit(nd.signatures, texts)))
                texts = []
                if len(futures) > threads:  # bound the texts in flight: wait for an older batch
                    futures[-threads - 1][1].result()
        if texts:
            futures.append((len(ids) - len(texts), ex.submit(nd.signatures, texts)))
        blocks = [(np.arange(s, s + len(fu.result()), dtype=np.int64), fu.result()) for s, fu in futures]
    t_sig = time.perf_counter()
    removed, dup = nd.duplicates(blocks)
    t_dup = time.perf_counter()
    tmp = f"{out_path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:
        for r, d in zip(removed.tolist(), dup.tolist()):
            out.write(json.dumps({"id": ids[r], "duplicate_of": ids[d]}) + "\n")  # ASCII-escaped: any id survives
    fsync_file(tmp)
    os.replace(tmp, out_path)
    return {
        "input": input_path,
        "output": out_path,
        "lines": lines,
        "documents": len(ids),
        "bad": dict(bad),
        "blank": blank,
        "bad_first_lines": bad_lines,
        "removed": len(removed),
        "kept": len(ids) - len(removed),
        "mode": nd.last_stats.get("mode"),
        "bands": cfg.bands,
        "rows": cfg.rows,
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "seconds": {
            "read_and_signatures": round(t_sig - t0, 3),
            "lsh_and_components": round(t_dup - t_sig, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.dedup", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="JSONL with `id` and `text` per line")
    p.add_argument("--out", required=True, help="JSONL of removed documents: {id, duplicate_of}")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--shingle-size", type=int, default=5)
    p.add_argument("--shingle-kind", choices=["char", "word"], default="char")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bands", type=int, default=None)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--no-verify", action="store_true", help="keep LSH candidates without the signature check")
    p.add_argument("--mode", choices=["auto", "local", "ray"], default="auto")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=8192, help="documents per signature batch")
    p.add_argument("--report", default=None, help="also write the report JSON here")
    a = p.parse_args(argv)
    try:
        cfg = MinHashConfig(
            threshold=a.threshold,
            num_perm=a.num_perm,
            shingle_size=a.shingle_size,
            shingle_kind=a.shingle_kind,
            seed=a.seed,
            bands=a.bands,
            rows=a.rows,
            verify=not a.no_verify,
            mode=a.mode,
        )
    except (TypeError, ValueError) as e:
        p.error(str(e))
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.batch < 1:
        p.error(f"--batch must be >= 1, got {a.batch}")
    if not os.path.isfile(a.input):
        p.error(f"--input {a.input}: {'is a folder' if os.path.isdir(a.input) else 'no such file'}")
    same = {os.path.realpath(a.input): "--input"}
    for flag, path in (("--out", a.out), ("--report", a.report)):
        if path is None:
            continue
        if os.path.realpath(path) in same:
            p.error(f"{flag} {path} is the same file as {same[os.path.realpath(path)]}: it would be overwritten")
        same[os.path.realpath(path)] = flag
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            p.error(f"{flag} {path}: folder {folder} does not exist")
        if os.path.isdir(path):
            p.error(f"{flag} {path}: is a folder")
    try:
        report = run(a.input, a.out, cfg, a.threads, a.batch)
    except DuplicateIdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=1)
    if a.report:
        tmp = f"{a.report}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        fsync_file(tmp)
        os.replace(tmp, a.report)
    print(text, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
