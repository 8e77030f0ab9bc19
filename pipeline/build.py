"""Build a tokenized corpus from a manifest: ``python pipeline/build.py --manifest M --out D``.

Stages (pipeline/stages.py): read → filter → exact dedup → near dedup → tokenize → shards.
Ingest and shard writing run as Ray tasks, tokenization in Ray actors (one World tokenizer
each); plain runs start Ray locally, ``ray job submit -- python pipeline/build.py ...`` runs on
the cluster in ``$RAY_ADDRESS``. Output:

    D/shards/NNNNN.arrow   Arrow IPC stream files, uncompressed: id, component, input_ids (uint16)
    D/index.json           schema, tokenizer, manifest, shards (+sha256), per-component stage counts
    D/report.json          the same counts plus timings, throughput, quarantine and duplicate lists
    D/quarantine.jsonl     every bad input row (file:line, reason; the first few with a text sample) and
                           samples of filtered ones — the counts are exact
    D/duplicates.jsonl     every document removed by dedup with the id it duplicates
    D/work/                completion markers and intermediate files (kept: reruns resume)

Re-running on the same ``--out`` skips finished units; the index is written last, atomically.

``--clean-work`` (opt-in): once the index is published, work/'s bulk files (the ingest text, MinHash
signatures, tokenized units, dedup.arrow, per-unit quarantine files: 2-3x the shards at scale) are deleted
and only the markers stay; ``work/clean.json`` records it and report.json gains ``clean_work`` (bytes
freed). A re-run with the same settings then does nothing and says so (``--force`` rebuilds); one with
other settings is refused or, with --force, discarded as always. ``--clean-work`` on a complete, uncleaned
--out cleans it without rebuilding.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import sys
import time
from collections import Counter

if __package__ in (None, ""):  # run as a script: make `import pipeline` work from any cwd
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from pipeline import stages  # noqa: E402
from pipeline.manifest import Manifest, ManifestError, load_manifest  # noqa: E402
from pipeline.read import Unit, input_stamp, units_for  # noqa: E402

SCHEMA_VERSION = 1
TOKENIZER_NAME = "rwkv_vocab_v20230424"
VOCAB_SIZE = 65536
STAGES = ("read", "filter", "exact_dedup", "near_dedup", "tokenize")
DEDUP_STAGES = ("exact_dedup", "near_dedup")
EXACT_DOCS_PER_TASK = 20_000_000
"""Exact dedup splits the content hashes into this many documents per task (~0.5 GB each)."""
NEAR_RAY_MIN_DOCS = 2_000_000
"""Below this many documents near dedup runs in the driver even on Ray (start-up outweighs it);
``near_dedup.ray_min_docs`` in the manifest overrides it."""


class BuildError(RuntimeError):
    """A build that cannot start or continue; the message says why."""


def _progress(total: int, desc: str, enabled: bool, unit: str = "unit"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=True)


def _changed_files(old: list, new: list, show: int = 3) -> str:
    """The first few inputs whose [rel, size, mtime] differ between two fingerprints, for the error."""
    a, b = {f[0]: f[1:] for f in old}, {f[0]: f[1:] for f in new}
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(diff[:show]) + (f" and {len(diff) - show} more" if len(diff) > show else "")


def _input_stamp(path: str) -> list:
    """``read.input_stamp``: a re-run into the same --out notices an input edited in place, not only a
    changed manifest, and the ingest stage notices one edited during the build."""
    try:
        return input_stamp(path)
    except (OSError, ValueError) as e:
        raise BuildError(f"cannot stat input {path}: {e}") from None


def _prepare_out(out: str, fingerprint: dict, force: bool) -> str:
    work = os.path.join(out, "work")
    try:
        for sub in ("ingest", "tok", "shards"):
            os.makedirs(os.path.join(work, sub), exist_ok=True)
        os.makedirs(os.path.join(out, "shards"), exist_ok=True)
        probe = os.path.join(work, f".probe{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise BuildError(f"cannot write to --out {out!r}: {e.strerror or e}") from None
    fp_path = os.path.join(work, "build.json")
    if not os.path.exists(fp_path) and _has_results(work):
        # results without their fingerprint (a discard killed half way): their settings are unknown
        if not force:
            raise BuildError(f"--out {out!r} holds build results without their settings ({fp_path} is missing, "
                             f"e.g. a --force run killed while discarding); pass --force to discard them")
        return _discard(out, work, fingerprint)
    if os.path.exists(fp_path):
        old = stages.read_json(fp_path)
        if old != fingerprint:
            if not force:
                changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                files = _changed_files(old.get("files") or [], fingerprint["files"])
                raise BuildError(f"--out {out!r} holds a build with different settings ({', '.join(changed)})"
                                 + (f"; inputs added, removed or modified since: {files}" if files else "")
                                 + "; use another --out or pass --force to discard it")
            return _discard(out, work, fingerprint)
    else:
        stages.atomic_write_json(fp_path, fingerprint)
    _sweep_tmp(out)
    return work


def _has_results(work: str) -> bool:
    return os.path.exists(os.path.join(work, "dedup.arrow")) or any(
        os.listdir(os.path.join(work, sub)) for sub in ("ingest", "tok", "shards"))


def _discard(out: str, work: str, fingerprint: dict) -> str:
    """Remove a previous build's results: the published files first, then work/ renamed away in one step
    (so a kill part way never leaves results that a re-run could take for its own), then deleted."""
    for name in ("index.json", "report.json", "quarantine.jsonl", "duplicates.jsonl"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    gone = f"{work}.discard{os.getpid()}"
    os.replace(work, gone)
    shards = os.path.join(out, "shards")
    for name in os.listdir(shards):   # the build's shards only: other files there are the user's
        if re.fullmatch(_SHARD + f"({_TMP})?", name):
            os.remove(os.path.join(shards, name))
    shutil.rmtree(gone)
    return _prepare_out(out, fingerprint, False)


_TMP = r"\.tmp\d+"  # stages.atomic_write_*, _ArrowOut, write_shard: <final name>.tmp<pid>
_SHARD = r"(\d{5}|[1-9]\d{5,})\.arrow"  # stages.write_shard: shards/<index:05d>.arrow (6+ digits from 100000 on)
SHARD_NAME = re.compile(rf"^{_SHARD}$")
"""Names of the shard files this build writes; anything else in OUT/shards is left alone."""
_UNIT = r"c\d{4,}_f\d{5,}"  # read.Unit.name
_BUILD_TMP = {  # folder (relative to --out) -> the names of the temp files and folders the build makes there
    "": re.compile(rf"^((index\.json|report\.json|quarantine\.jsonl|duplicates\.jsonl){_TMP}|work\.discard\d+)$"),
    "shards": re.compile(rf"^{_SHARD}{_TMP}$"),
    "work": re.compile(rf"^((build\.json|clean\.json|dedup\.arrow){_TMP}|\.probe\d+)$"),
    "work/ingest": re.compile(rf"^({_UNIT}\.(arrow|json|quarantine\.jsonl){_TMP}|{_UNIT}\.sig{_TMP}\.npy)$"),
    "work/tok": re.compile(rf"^{_UNIT}\.(arrow|json){_TMP}$"),
    "work/shards": re.compile(rf"^\d{{5,}}\.json{_TMP}$"),
}
"""Exactly the temp names the build writes, so that a user's own files in --out (``notes.tmpl.md``,
``checkpoints.tmp_old/``) are never taken for leftovers."""


def _sweep_tmp(out: str) -> None:
    """Remove temp files: a killed run's, or a retried Ray task's whose worker died before its rename.
    Only names matching ``_BUILD_TMP`` for their folder are removed."""
    for rel, pattern in _BUILD_TMP.items():
        d = os.path.join(out, rel) if rel else out
        for name in os.listdir(d):  # finished files were renamed, so every temp name is a leftover
            if pattern.match(name):
                path = os.path.join(d, name)
                try:
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                except OSError:
                    pass


CLEAN_NAME = "clean.json"
"""work/'s record of a --clean-work cleaning, written by atomic rename: ``{"state": "cleaning" | "done", "files_removed",
"bytes_freed", "index_sha256"}``, "cleaning" (with the totals) before the first file is removed, "done" after the last."""
_BULK = {  # folder (relative to work/) -> the names of the bulk files --clean-work removes there
    "": re.compile(r"^dedup\.arrow$"),
    "ingest": re.compile(rf"^{_UNIT}\.(arrow|sig\.npy|quarantine\.jsonl)$"),
    "tok": re.compile(rf"^{_UNIT}\.arrow$"),
}
"""The ingest text and MinHash signatures, the tokenized units, the dedup decisions and the per-unit quarantine
records (already copied into quarantine.jsonl): all that a resume needs and a finished build does not. The ``.json``
markers and build.json stay."""
PUBLISHED = ("index.json", "report.json", "quarantine.jsonl", "duplicates.jsonl")


def _bulk_files(work: str) -> list[str]:
    paths = []
    for rel, pattern in _BULK.items():
        d = os.path.join(work, rel) if rel else work
        if os.path.isdir(d):
            paths += sorted(os.path.join(d, n) for n in os.listdir(d) if pattern.match(n))
    return paths


def _published_problem(out: str) -> str | None:
    """Why --out does not hold a complete published build, or None when it does: every file of PUBLISHED present
    and every shard the index lists present with the size the index gives (sizes only: no shard is read)."""
    for name in PUBLISHED:
        if not os.path.isfile(os.path.join(out, name)):
            return f"{name} is missing"
    try:
        stages.read_json(os.path.join(out, "report.json"))
    except (OSError, ValueError) as e:
        return f"report.json cannot be read ({e})"
    try:
        shards = [(s["path"], s["bytes"]) for s in stages.read_json(os.path.join(out, "index.json"))["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"index.json cannot be read ({e})"
    for rel, size in shards:
        try:
            got = os.path.getsize(os.path.join(out, rel))
        except OSError:
            return f"{rel} is missing"
        if got != size:
            return f"{rel} has {got} bytes, the index says {size}"
    return None


def _built_here(out: str, work: str, units: list, fingerprint: dict) -> bool:
    """--out holds a complete build of these inputs and settings, made here: its published files are complete, every
    stage's markers are in work/ (whose build.json, checked equal to ``fingerprint``, was there before this run), and
    the index names the same manifest and tokenizer. Published files without them (copied in, or a work/ deleted by
    hand) are not taken for this build's: the build then runs, and cleans at the end."""
    if _published_problem(out) is not None or not os.path.exists(os.path.join(work, "dedup.arrow")):
        return False
    if not all(os.path.exists(os.path.join(work, stage, u.name + ".json")) for u in units for stage in ("ingest", "tok")):
        return False
    index = stages.read_json(os.path.join(out, "index.json"))
    if not all(os.path.exists(os.path.join(work, "shards", f"{i:05d}.json")) for i in range(len(index["shards"]))):
        return False
    return (index.get("manifest", {}).get("sha256") == fingerprint["manifest_sha256"]
            and index.get("tokenizer", {}).get("sha256") == fingerprint["tokenizer_sha256"])


def _clean_work(out: str, work: str, record: dict | None = None) -> dict:
    """Remove work/'s bulk files (``_BULK``) of a complete build and return report.json with ``clean_work``
    (files removed, bytes freed) added. ``record``: an interrupted cleaning's work/clean.json, to finish. Safe to
    interrupt anywhere: clean.json says "cleaning", with the totals, before the first removal, and a re-run finishes
    the job. Of the published files only report.json is written (atomically, the same JSON plus the field)."""
    path = os.path.join(work, CLEAN_NAME)
    if record is None:
        files = _bulk_files(work)
        record = {"state": "cleaning", "files_removed": len(files), "bytes_freed": sum(map(os.path.getsize, files)),
                  "index_sha256": stages.sha256_file(os.path.join(out, "index.json"))}
        stages.atomic_write_json(path, record)
    for f in _bulk_files(work):
        os.remove(f)
    report_path = os.path.join(out, "report.json")
    report = stages.read_json(report_path)
    report["clean_work"] = {k: record[k] for k in ("files_removed", "bytes_freed")}
    stages.atomic_write_json(report_path, report)
    stages.atomic_write_json(path, {**record, "state": "done"})
    return report


def _read_clean(work: str) -> dict:
    """work/clean.json of a cleaned --out (see CLEAN_NAME)."""
    path = os.path.join(work, CLEAN_NAME)
    try:
        record = stages.read_json(path)
        return {k: record[k] for k in ("state", "files_removed", "bytes_freed", "index_sha256")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BuildError(f"{path} cannot be read ({e}); pass --force to rebuild") from None


def _rerun_cleaned(out: str, work: str, record: dict) -> dict:
    """A re-run, with the build's own settings, on an --out whose work/ was cleaned: nothing is left to resume from,
    so nothing is built. An interrupted cleaning is finished; then the published files are checked (index.json as it
    was when the cleaning started, every shard present at its size) and report.json returned as it is, with
    ``rerun`` (not written) saying which of the two happened."""
    problem = _published_problem(out)
    if problem is None and stages.sha256_file(os.path.join(out, "index.json")) != record["index_sha256"]:
        problem = "index.json changed since"
    if problem:
        raise BuildError(f"--out {out!r}: its work/ was cleaned (--clean-work) and {problem}; nothing is left to "
                         f"resume from: pass --force to rebuild")
    finished = record["state"] != "done"
    report = _clean_work(out, work, record) if finished else stages.read_json(os.path.join(out, "report.json"))
    return {**report, "rerun": "finished cleaning" if finished else "cleaned"}


def per_component(keys: np.ndarray, n: int) -> np.ndarray:
    """[n] documents per component among ``keys`` (a key's top 16 bits are its component), in one pass; the
    plain form, ``count_nonzero((keys >> 48) == ci)`` per component, is components x keys."""
    return np.bincount(keys >> 48, minlength=n)[:n] if len(keys) else np.zeros(n, np.int64)


def _stage_counts(metas: list[dict], comps: list[str], removed: dict[str, np.ndarray],
                  tok_metas: list[dict], near_enabled: bool) -> dict[str, dict]:
    out: dict[str, dict] = {}
    by_ci: dict[int, list[dict]] = {}
    for m in metas:
        by_ci.setdefault(m["ci"], []).append(m)
    by_name: dict[str, list[dict]] = {}
    for t in tok_metas:
        by_name.setdefault(t["component"], []).append(t)
    n_removed = {s: per_component(removed.get(s, np.zeros(0, np.int64)), len(comps)) for s in DEDUP_STAGES}
    for ci, name in enumerate(comps):
        st = {s: {"in": 0, "out": 0, "dropped": Counter()} for s in STAGES}
        for m in by_ci.get(ci, []):
            for s in ("read", "filter"):
                st[s]["in"] += m[s]["in"]
                st[s]["out"] += m[s]["out"]
                st[s]["dropped"].update(m[s]["dropped"])
        n = st["filter"]["out"]
        for s, reason in (("exact_dedup", "duplicate"), ("near_dedup", "near_duplicate")):
            k = int(n_removed[s][ci])
            st[s]["in"], st[s]["out"] = n, n - k
            if k:
                st[s]["dropped"][reason] = k
            n -= k
        tok = by_name.get(name, [])
        st["tokenize"]["in"] = n
        st["tokenize"]["out"] = sum(t["docs_out"] for t in tok)
        if not near_enabled:
            del st["near_dedup"]
        out[name] = {s: {"in": v["in"], "out": v["out"], "dropped": dict(sorted(v["dropped"].items()))}
                     for s, v in st.items()}
        out[name]["tokenize"]["tokens_out"] = sum(t["tokens"] for t in tok)  # tokens exist from this stage on
    return out


def read_dedup(path: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(removed, duplicate_of) per dedup stage, keys sorted, from ``work/dedup.arrow``; the stage column is
    compared in Arrow (its strings were made Python objects: ~112 B per removed document)."""
    t = stages.read_arrow(path)
    rk, ok = t.column("key").to_numpy(), t.column("duplicate_of").to_numpy()
    removed, dup_of = {}, {}
    for s in DEDUP_STAGES:
        mask = pc.equal(t.column("stage"), s).to_numpy()  # [m] bool
        removed[s], dup_of[s] = rk[mask], ok[mask]
    return removed, dup_of


def _write_quarantine(path: str, work: str, units: list[Unit], metas: list[dict]) -> int:
    """quarantine.jsonl: the units' quarantine files (stages.ingest_unit) concatenated in unit order, streamed
    to a temp file and renamed into place; returns the number of records."""
    with stages.atomic_writer(path) as f:
        for u, m in zip(units, metas):
            if m["quarantine_records"]:
                try:
                    with open(stages.quarantine_path(work, u.name), "rb") as src:
                        shutil.copyfileobj(src, f, 1 << 20)
                except FileNotFoundError:
                    raise BuildError(f"{stages.quarantine_path(work, u.name)} is missing ({m['quarantine_records']} "
                                     f"records); rebuild with --force") from None
    return sum(m["quarantine_records"] for m in metas)


def _resumed(run, jobs: list[tuple], markers: list[str]):
    """Results of finished jobs straight from their markers; only the others go to ``run``."""
    todo = []
    for i, marker in enumerate(markers):
        if marker and os.path.exists(marker):
            yield i, stages.read_json(marker)
        else:
            todo.append(i)
    if todo:
        for j, result in run([jobs[i] for i in todo]):
            yield todo[j], result


def _shard_plan_reference(tok_paths: list[str], shard_tokens: int) -> list[list[tuple[str, int, int]]]:
    """Split the tokenized units, in key order, into shards of about ``shard_tokens`` tokens: a shard ends after
    the document that brings it to ``shard_tokens`` or more. The plain reference of ``_shard_plan`` (a Python
    step per document: 179 ns each, ~9 min at 3e9 documents)."""
    plan: list[list[tuple[str, int, int]]] = []
    cur: list[tuple[str, int, int]] = []
    cur_tokens = 0
    for p in tok_paths:
        t = stages.read_arrow(p)
        if t.num_rows == 0:
            continue
        # per record batch: combining a unit's chunks would copy it and overflow int32 offsets past 2^31 tokens
        lens = np.concatenate([c.value_lengths().to_numpy() for c in t.column("input_ids").chunks])
        start = 0
        for j, n in enumerate(lens):
            cur_tokens += int(n)
            if cur_tokens >= shard_tokens:
                cur.append((p, start, j + 1))
                plan.append(cur)
                cur, cur_tokens, start = [], 0, j + 1
        if start < len(lens):
            cur.append((p, start, len(lens)))
    if cur:
        plan.append(cur)
    return plan


def _doc_token_ends(path: str) -> np.ndarray:
    """[n_docs] int64: where each document of a tok file ends in the file's tokens (the cumulative token
    counts), from the list offsets of each record batch: no per-document step, no copy of the tokens."""
    parts, base = [], 0
    for c in stages.read_arrow(path).column("input_ids").chunks:
        if len(c) == 0:
            continue
        o = c.offsets.to_numpy().astype(np.int64)  # [n + 1] int32 offsets of this batch (its own int32 range)
        parts.append(o[1:] - o[0] + base)
        base = int(parts[-1][-1])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _shard_plan(tok_paths: list[str], shard_tokens: int) -> list[list[tuple[str, int, int]]]:
    """``_shard_plan_reference``'s plan with one ``np.searchsorted`` per shard instead of a step per
    document: in a file with document ends ``ends`` (cumulative token counts), a shard holding ``cur``
    tokens before document ``start`` ends at the first ``j >= start`` with
    ``cur + ends[j] - ends[start - 1] >= shard_tokens`` (``ends`` never decreases)."""
    plan: list[list[tuple[str, int, int]]] = []
    cur: list[tuple[str, int, int]] = []
    cur_tokens = 0
    for p in tok_paths:
        ends = _doc_token_ends(p)  # [n]
        n, start = len(ends), 0
        while start < n:
            before = int(ends[start - 1]) if start else 0
            j = start + int(np.searchsorted(ends[start:], shard_tokens - cur_tokens + before, side="left"))
            if j == n:
                cur.append((p, start, n))
                cur_tokens += int(ends[-1]) - before
                break
            cur.append((p, start, j + 1))
            plan.append(cur)
            cur, cur_tokens, start = [], 0, j + 1
    if cur:
        plan.append(cur)
    return plan


def _ids_for_reference(keys: np.ndarray, ingest_paths: list[str]) -> dict[int, tuple[str, str | None]]:
    """key -> (id, source_id) for the given document keys, read from every ingest file: the plain
    reference of ``DocIds`` (one ``np.isin`` against all keys per file)."""
    want = np.unique(keys)
    out: dict[int, tuple[str, str | None]] = {}
    for p in ingest_paths:
        t = stages.read_arrow(p).select(["key", "id", "source_id"])
        k = t.column("key").to_numpy()
        hit = np.isin(k, want)
        if hit.any():
            mask = pa.array(hit)
            for key, i, si in zip(k[hit].tolist(), t.column("id").filter(mask).to_pylist(),
                                  t.column("source_id").filter(mask).to_pylist()):
                out[key] = (i, si)
    return out


class DocIds:
    """id and source_id of documents from their keys, as ``_ids_for_reference`` reads them, without reading
    every ingest file: a key ``ci << 48 | fi << 32 | line`` names its unit, and the ingest stage's id is
    ``component/rel:line`` (stages.ingest_unit), so ids are computed. Source ids exist only in components with
    an ``id_field``; those units' ingest files are read once, here, and the wanted keys found in each by
    ``np.searchsorted`` (an ingest file's keys ascend: its rows are in line order). Memory: the source ids of
    the wanted keys of such components."""

    def __init__(self, want: np.ndarray, units: list[Unit], comps: list, ingest_paths: list[str]):
        self.base = np.array([u.key_base for u in units], np.int64)  # [U] ascending: units are in key order
        self.prefix = pa.array([stages.id_prefix(comps[u.ci].name, u.rel) for u in units], pa.string())  # [U]
        want = np.unique(want)  # [W] sorted
        ui = self._unit(want)
        cut = np.searchsorted(ui, np.arange(len(units) + 1))  # [U + 1] want[cut[u]:cut[u + 1]] are unit u's
        keys, vals = [np.zeros(0, np.int64)], [pa.array([], pa.string())]
        for u, unit in enumerate(units):
            if comps[unit.ci].id_field is None or cut[u] == cut[u + 1]:
                continue
            w = want[cut[u]:cut[u + 1]]
            t = stages.read_arrow(ingest_paths[u])
            k = t.column("key").to_numpy()
            pos = np.searchsorted(k, w)  # [w]
            if not len(k) or not np.array_equal(k[np.minimum(pos, len(k) - 1)], w):
                raise BuildError(f"{ingest_paths[u]}: document keys of dedup.arrow are missing from it "
                                 f"(e.g. line {int(w[0]) & 0xFFFFFFFF}); rebuild with --force")
            keys.append(w)
            vals.append(t.column("source_id").take(pa.array(pos)).combine_chunks())
        self.sk = np.concatenate(keys)  # [S] sorted keys that have a source-id slot
        self.sv = pa.concat_arrays(vals)  # [S] their source ids (null where the row had none)

    def _unit(self, keys: np.ndarray) -> np.ndarray:
        ui = np.searchsorted(self.base, keys, side="right") - 1  # [n]
        bad = (ui < 0) | (self.base[np.maximum(ui, 0)] != keys & ~np.int64(0xFFFFFFFF))
        if bad.any():
            raise BuildError(f"document key {int(keys[bad][0])} names no input file of this build; rebuild with --force")
        return ui

    def ids(self, keys: np.ndarray) -> list[str]:
        """[n] keys -> their ids ``component/rel:line``."""
        if not len(keys):
            return []
        lines = pa.array(keys & 0xFFFFFFFF).cast(pa.string())
        return pc.binary_join_element_wise(self.prefix.take(pa.array(self._unit(keys))), lines, "").to_pylist()

    def source_ids(self, keys: np.ndarray) -> list[str | None]:
        """[n] keys (each one of ``want``) -> their source ids (None without one)."""
        out: list[str | None] = [None] * len(keys)
        if not len(self.sk) or not len(keys):
            return out
        pos = np.minimum(np.searchsorted(self.sk, keys), len(self.sk) - 1)
        hit = np.flatnonzero(self.sk[pos] == keys)
        for j, v in zip(hit.tolist(), self.sv.take(pa.array(pos[hit])).to_pylist()):
            out[j] = v
        return out


DUP_CHUNK_ROWS = 100_000
"""duplicates.jsonl is made and written this many lines at a time: ~600 B per line while its chunk is built
(Python strings), so ~60 MB, whatever the number of removed documents."""


def _write_duplicates(path: str, keys: np.ndarray, ofs: np.ndarray, stage: np.ndarray, comps: list,
                      ids: DocIds) -> None:
    """duplicates.jsonl: one line per removed document ([m] ``keys``, sorted), naming the document it
    duplicates (``ofs``) and the stage (``stage``, an index into DEDUP_STAGES), streamed to a temp file in
    chunks of DUP_CHUNK_ROWS lines and renamed into place, so the driver never holds the whole file."""
    with stages.atomic_writer(path) as f:
        for a in range(0, len(keys), DUP_CHUNK_ROWS):
            k, o = keys[a:a + DUP_CHUNK_ROWS], ofs[a:a + DUP_CHUNK_ROWS]
            f.write("".join(
                json.dumps({"id": i, "duplicate_of": j, "stage": DEDUP_STAGES[s], "component": comps[c].name,
                            **({"source_id": x, "duplicate_of_source_id": y} if x is not None or y is not None else {})},
                           ensure_ascii=False) + "\n"
                for i, j, s, c, x, y in zip(ids.ids(k), ids.ids(o), stage[a:a + DUP_CHUNK_ROWS].tolist(),
                                            (k >> 48).tolist(), ids.source_ids(k), ids.source_ids(o))).encode())


def _is_own_output(rel: str) -> bool:
    """Whether ``rel`` (a path relative to --out) is a file this build writes there."""
    top, _, below = rel.partition(os.sep)
    return (rel in ("index.json", "report.json", "quarantine.jsonl", "duplicates.jsonl", LOCK_NAME)
            or bool(below and re.fullmatch(r"work(\.discard\d+)?", top))   # work/, or one a --force discard left
            or (top == "shards" and bool(re.fullmatch(_SHARD, below))))


def _without_own_outputs(comp, out: str):
    """``comp`` without the files the build itself wrote into --out: a glob over a folder that holds --out
    (``**/*.jsonl`` with ``--out data/built``) matched quarantine.jsonl, duplicates.jsonl and work/'s files on the
    next run, which was then refused as 'inputs added' (and --force failed on them: its discard deletes them).
    Other files inside --out (``data/built/raw/*.jsonl``) are inputs like any other: the build never touches them."""
    root = os.path.realpath(out)
    keep = []
    for f in comp.files:
        real = os.path.realpath(f) if "://" not in f else ""
        if not real.startswith(root + os.sep) or not _is_own_output(os.path.relpath(real, root)):
            keep.append(f)
    return comp if len(keep) == len(comp.files) else dataclasses.replace(comp, files=keep)


LOCK_NAME = ".build.lock"
"""The file in --out that a running build holds an exclusive lock on (``_out_lock``)."""


@contextlib.contextmanager
def _out_lock(out: str):
    """Hold an exclusive ``flock`` on ``out/.build.lock`` for the whole build: a second build into the same --out
    swept the first one's temp files (which then crashed on its rename) and, with --force, discarded its work/
    while it still wrote markers there. The kernel drops the lock when the process dies, so a killed build
    leaves none behind. A file system without locks (some network mounts) builds unguarded."""
    path = os.path.join(out, LOCK_NAME)
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise BuildError(f"cannot write to --out {out!r}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise BuildError(f"another build (pid {holder}) is writing to --out {out!r}; wait for it to finish "
                             f"or use another --out") from None
        except OSError:
            pass
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def build(manifest: Manifest, out: str, executor=None, near: bool | None = None,
          near_threshold: float | None = None, progress: bool = True, force: bool = False,
          manifest_arg: str | None = None, clean_work: bool = False) -> dict:
    """Run every stage (resuming finished units) and return the report dict; one build at a time per --out.

    ``clean_work``: once the index is published, remove work/'s bulk files (``_clean_work``); a complete --out is
    cleaned without being rebuilt. On an --out cleaned before (same settings) nothing is built unless ``force``. When
    nothing was built the returned report.json carries ``rerun``: "cleaned" (already was), "finished cleaning" (an
    interrupted cleaning finished now) or "cleaned now" (a complete --out cleaned now)."""
    out = os.path.abspath(out)  # tasks get paths under it: Ray workers do not run in the driver's working directory
    with _out_lock(out):
        return _build(manifest, out, executor, near, near_threshold, progress, force, manifest_arg, clean_work)


def _build(manifest: Manifest, out: str, executor, near: bool | None, near_threshold: float | None,
           progress: bool, force: bool, manifest_arg: str | None, clean_work: bool = False) -> dict:
    from tokenizer import WorldTokenizer

    t_start = time.perf_counter()
    nd = dataclasses.replace(manifest.near_dedup)  # the caller's manifest is left as it was
    if near is not None:
        nd.enabled = near
    if near_threshold is not None:
        if not 0.0 < near_threshold <= 1.0:   # as near_dedup.threshold in a manifest and pipeline.dedup take it
            raise BuildError(f"--near-threshold must be in (0, 1], got {near_threshold}")
        nd.threshold = near_threshold
        nd.enabled = True if near is None else near
    tok = WorldTokenizer()
    comps = [_without_own_outputs(c, out) for c in manifest.components]
    units: list[Unit] = [dataclasses.replace(u, stamp=tuple(_input_stamp(u.path)))
                         for ci, c in enumerate(comps) for u in units_for(ci, c, manifest.root)]
    fingerprint = {"manifest_sha256": manifest.sha256,
                   "files": [[u.rel, *u.stamp] for u in units],
                   "near_dedup": {"enabled": nd.enabled, "threshold": nd.threshold, **nd.params}
                   if nd.enabled else False,
                   "exact_dedup": manifest.exact_dedup, "tokenizer_sha256": tok.vocab_sha256,
                   "shard_tokens": manifest.shard_tokens}
    had_fingerprint = os.path.exists(os.path.join(out, "work", "build.json"))
    work = _prepare_out(out, fingerprint, force)
    cleaned = os.path.exists(os.path.join(work, CLEAN_NAME))
    if cleaned and force:   # the same settings: --force alone never discards, but this work/ cannot resume
        work, cleaned = _discard(out, work, fingerprint), False
    if cleaned:
        return _rerun_cleaned(out, work, _read_clean(work))
    if clean_work and had_fingerprint and _built_here(out, work, units, fingerprint):
        return {**_clean_work(out, work), "rerun": "cleaned now"}
    if executor is None:
        from pipeline.executor import LocalExecutor

        executor = LocalExecutor()
    timings: dict[str, float] = {}
    unit_secs: Counter = Counter()  # wall seconds inside the stage's tasks, summed
    unit_cpu: Counter = Counter()  # CPU seconds of the same

    # 1. read → filter → hash (+ MinHash signatures), one job per input file
    t0 = time.perf_counter()
    pending_tok = [u for u in units if not os.path.exists(os.path.join(work, "tok", u.name + ".json"))]
    executor.prepare(len(pending_tok))
    metas: list[dict | None] = [None] * len(units)
    # each task gets its component without the file lists: they are the units' business, and shipping a list of
    # n files with each of n tasks is quadratic (4.3 MiB pickled per task for a 59k-file component)
    slim = [dataclasses.replace(c, files=[], missing=[]) for c in comps]
    jobs = [(u, slim[u.ci], work, nd if nd.enabled else None) for u in units]
    chars = docs = 0
    with _progress(len(units), "ingest", progress) as bar:
        for i, m in _resumed(executor.ingest, jobs, [os.path.join(work, "ingest", u.name + ".json") for u in units]):
            metas[i] = m = stages.meta_counts_only(m, work, units[i].name)
            chars += m["chars_read"]
            docs += m["read"]["in"]
            el = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{docs / el:,.0f} docs/s {chars / el / 1e6:.1f} MB/s", refresh=False)
            bar.update(1)
            for k, v in m["seconds"].items():
                unit_secs[k] += v
            for k, v in m.get("cpu_seconds", {}).items():
                unit_cpu[k] += v
    timings["ingest_wall"] = time.perf_counter() - t0
    ingest_paths = [os.path.join(work, "ingest", u.name + ".arrow") for u in units]

    # 2. exact and near dedup: global decisions, computed once and stored
    t0 = time.perf_counter()
    dedup_path = os.path.join(work, "dedup.arrow")
    if os.path.exists(dedup_path):
        removed, dup_of = read_dedup(dedup_path)
    else:
        empty = np.zeros(0, np.int64)
        removed, dup_of = {"exact_dedup": empty, "near_dedup": empty}, {"exact_dedup": empty, "near_dedup": empty}
        if manifest.exact_dedup:
            n_docs = sum(m["filter"]["out"] for m in metas)
            parts = max(1, -(-n_docs // EXACT_DOCS_PER_TASK))  # hash partitions, ~24 B per doc each
            with _progress(parts, "exact dedup", progress, unit="partition") as bar:
                found = []
                for i, r in executor.exact([(ingest_paths, p, parts) for p in range(parts)]):
                    found.append((i, r))
                    bar.update(1)
            found = [r for _, r in sorted(found, key=lambda x: x[0])]
            rk = np.concatenate([f[0] for f in found])
            order = np.argsort(rk, kind="stable")
            removed["exact_dedup"], dup_of["exact_dedup"] = rk[order], np.concatenate([f[1] for f in found])[order]
        timings["exact_dedup_wall"] = time.perf_counter() - t0
        if nd.enabled:
            t1 = time.perf_counter()
            n_docs = sum(m["filter"]["out"] for m in metas)
            params = dict(nd.params)
            # Ray only when this build runs on Ray and the input is large; a local build never starts it
            on_ray = getattr(executor, "name", "local") == "ray"
            min_docs = params.get("ray_min_docs", NEAR_RAY_MIN_DOCS)
            params.setdefault("mode", "ray" if on_ray and n_docs >= min_docs else "local")
            nd_run = type(nd)(enabled=True, threshold=nd.threshold, params=params)
            with _progress(1, f"near dedup ({params['mode']}, {n_docs:,} documents)", progress, unit="band") as bar:

                def on_band(done: int, bands: int) -> None:
                    bar.total = bands
                    bar.update(1)
                removed["near_dedup"], dup_of["near_dedup"] = stages.near_duplicates(
                    ingest_paths, removed["exact_dedup"], nd_run, on_band=on_band)
                bar.update(bar.total - bar.n)   # Ray mode: one step when its dataflow is done
            timings["near_dedup_wall"] = time.perf_counter() - t1
        if len(removed["near_dedup"]) and len(dup_of["exact_dedup"]):
            # an exact duplicate's kept twin may itself be a near duplicate: point it at what was kept
            # (near dedup ran on exact dedup's survivors, so its targets are never removed: one hop)
            order_n = np.argsort(removed["near_dedup"], kind="stable")
            rn, on = removed["near_dedup"][order_n], dup_of["near_dedup"][order_n]
            pos = np.clip(np.searchsorted(rn, dup_of["exact_dedup"]), 0, len(rn) - 1)
            hop = rn[pos] == dup_of["exact_dedup"]
            dup_of["exact_dedup"] = np.where(hop, on[pos], dup_of["exact_dedup"])
        keys = np.concatenate([removed["exact_dedup"], removed["near_dedup"]])
        ofs = np.concatenate([dup_of["exact_dedup"], dup_of["near_dedup"]])
        stage = np.repeat(np.arange(len(DEDUP_STAGES), dtype=np.int8),
                          [len(removed["exact_dedup"]), len(removed["near_dedup"])])  # [m] index into DEDUP_STAGES
        order = np.argsort(keys, kind="stable")
        keys, ofs, stage = keys[order], ofs[order], stage[order]
        table = pa.table({"key": keys, "duplicate_of": ofs,
                          "stage": pa.array(DEDUP_STAGES, pa.string()).take(pa.array(stage))})
        tmp = dedup_path + f".tmp{os.getpid()}"
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        del table
        _write_duplicates(os.path.join(out, "duplicates.jsonl"), keys, ofs, stage, comps,
                          DocIds(np.concatenate([keys, ofs]), units, comps, ingest_paths))
        stages.fsync_file(tmp)
        os.replace(tmp, dedup_path)  # the marker of this stage
    timings["dedup_wall"] = time.perf_counter() - t0
    all_removed = np.sort(np.concatenate([removed["exact_dedup"], removed["near_dedup"]]))

    # 3. tokenize, one job per unit, in actors holding a tokenizer
    t0 = time.perf_counter()
    tok_jobs = []
    for u in units:
        lo, hi = np.searchsorted(all_removed, [u.key_base, u.key_base + 2**32])
        tok_jobs.append((u.name, work, all_removed[lo:hi]))
    tok_metas: list[dict | None] = [None] * len(units)
    ntok = chars = 0
    with _progress(len(units), "tokenize", progress) as bar:
        for i, m in _resumed(executor.tokenize, tok_jobs, [os.path.join(work, "tok", u.name + ".json") for u in units]):
            tok_metas[i] = m
            ntok += m["tokens"]
            chars += m["chars"]
            el = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{ntok / el:,.0f} tok/s {chars / el / 1e6:.1f} MB/s", refresh=False)
            bar.update(1)
            unit_secs["tokenize"] += m["seconds"]
            unit_cpu["tokenize"] += m.get("cpu_seconds", 0.0)
    timings["tokenize_wall"] = time.perf_counter() - t0

    # 4. shards: contiguous runs of documents in key (= manifest) order
    t0 = time.perf_counter()
    plan = _shard_plan([os.path.join(work, "tok", u.name + ".arrow") for u in units], manifest.shard_tokens)
    shard_metas: list[dict | None] = [None] * len(plan)
    with _progress(len(plan), "shards", progress) as bar:
        markers = [os.path.join(work, "shards", f"{i:05d}.json") for i in range(len(plan))]
        markers = [m if os.path.exists(os.path.join(out, "shards", f"{i:05d}.arrow")) else "" for i, m in enumerate(markers)]
        for i, m in _resumed(executor.shards, [(i, pieces, out) for i, pieces in enumerate(plan)], markers):
            shard_metas[i] = m
            bar.update(1)
            unit_secs["write"] += m["seconds"]
            unit_cpu["write"] += m.get("cpu_seconds", 0.0)
    timings["write_wall"] = time.perf_counter() - t0
    for name in os.listdir(os.path.join(out, "shards")):  # shards of an older, larger plan
        if SHARD_NAME.match(name) and int(name.split(".")[0]) >= len(plan):
            os.remove(os.path.join(out, "shards", name))

    # 5. index (last) and report
    counts = _stage_counts(metas, [c.name for c in comps], removed, tok_metas, nd.enabled)
    components = {}
    for c in comps:
        tk = counts[c.name]["tokenize"]
        components[c.name] = {"weight": c.weight, "language": c.language, "category": c.category,
                              "documents": tk["out"], "tokens": tk["tokens_out"], "stages": counts[c.name]}
    shards_idx = [{k: m[k] for k in ("path", "documents", "tokens", "bytes", "sha256")} for m in shard_metas]
    index = {"schema_version": SCHEMA_VERSION, "shard_format": "arrow_ipc_stream",
             "tokenizer": {"name": TOKENIZER_NAME, "sha256": tok.vocab_sha256, "eod_id": 0,
                           "vocab_size": VOCAB_SIZE},
             "manifest": {"name": manifest.name, "path": manifest_arg or manifest.path, "sha256": manifest.sha256},
             "shards": shards_idx, "components": components,
             "totals": {"documents": sum(s["documents"] for s in shards_idx),
                        "tokens": sum(s["tokens"] for s in shards_idx)}}
    n_quarantine = _write_quarantine(os.path.join(out, "quarantine.jsonl"), work, units, metas)
    total = time.perf_counter() - t_start
    chars_in = sum(m["chars_read"] for m in metas)
    input_bytes = sum(os.path.getsize(u.path) for u in units if "://" not in u.path)
    report = {"manifest": index["manifest"], "executor": getattr(executor, "name", "?"),
              "components": {n: c["stages"] for n, c in components.items()},
              "component_tokens": {n: c["tokens"] for n, c in components.items()},
              "totals": index["totals"], "input_bytes": input_bytes, "text_chars_read": chars_in,
              "seconds": {"total": total, **timings},
              "stage_task_seconds": dict(unit_secs), "stage_cpu_seconds": dict(unit_cpu),
              "throughput": {"input_MB_per_s": input_bytes / total / 1e6,
                             "docs_per_s": sum(m["read"]["in"] for m in metas) / total},
              "near_dedup": {"enabled": nd.enabled, "threshold": nd.threshold, **nd.params} if nd.enabled else False,
              "quarantine": {"path": "quarantine.jsonl", "records": n_quarantine},
              "duplicates": {"path": "duplicates.jsonl",
                             "exact": int(len(removed["exact_dedup"])), "near": int(len(removed["near_dedup"]))}}
    _sweep_tmp(out)   # a Ray retry's dead attempt may have left its temp file beside the finished one
    stages.atomic_write_json(os.path.join(out, "report.json"), report)
    stages.atomic_write_bytes(os.path.join(out, "index.json"),
                              (json.dumps(index, indent=1, ensure_ascii=False) + "\n").encode())
    return _clean_work(out, work) if clean_work else report


def table(report: dict) -> str:
    """The human summary: per component, documents through each stage, tokens out, drops."""
    rows = [("component", "read", "bad", "filtered", "exact dup", "near dup", "docs out", "tokens")]
    reasons: Counter = Counter()
    tot = [0] * 7
    for name, st in report["components"].items():
        bad = st["read"]["in"] - st["read"]["out"]
        filt = st["filter"]["in"] - st["filter"]["out"]
        ex = st["exact_dedup"]["in"] - st["exact_dedup"]["out"]
        nd = st["near_dedup"]["in"] - st["near_dedup"]["out"] if "near_dedup" in st else 0
        toks = report["component_tokens"][name]
        vals = [st["read"]["in"], bad, filt, ex, nd, st["tokenize"]["out"], toks]
        tot = [a + b for a, b in zip(tot, vals)]
        rows.append((name, *(f"{v:,}" for v in vals)))
        for s in ("read", "filter"):
            for r, n in st[s]["dropped"].items():
                reasons[f"{s}:{r}"] += n
    rows.append(("TOTAL", *(f"{v:,}" for v in tot)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    if reasons:
        lines.append("drops: " + ", ".join(f"{k}={v:,}" for k, v in sorted(reasons.items())))
    s = report["seconds"]
    lines.append(f"time {s['total']:.1f}s (ingest {s.get('ingest_wall', 0):.1f}, dedup {s.get('dedup_wall', 0):.1f}, "
                 f"tokenize {s.get('tokenize_wall', 0):.1f}, write {s.get('write_wall', 0):.1f}); "
                 f"{report['throughput']['input_MB_per_s']:.1f} MB/s input")
    return "\n".join(lines)


def summary(report: dict, out: str) -> str:
    """What main prints after a build: the table and the index written, or that nothing was built and why; the
    bytes --clean-work freed."""
    totals = f"{report['totals']['documents']:,} documents, {report['totals']['tokens']:,} tokens"
    rerun = report.get("rerun")
    if rerun is None:
        lines = [table(report), f"wrote {out}/index.json ({totals})"]
    elif rerun == "cleaned":
        lines = [f"{out} is complete ({totals}) and its work/ was cleaned (--clean-work): nothing to do, published "
                 f"files left as they are; pass --force to rebuild"]
    elif rerun == "finished cleaning":
        lines = [f"{out} is complete ({totals}): finished the interrupted cleaning of its work/ (--clean-work), "
                 f"nothing rebuilt; pass --force to rebuild"]
    else:
        lines = [f"{out} is complete ({totals}): cleaned its work/ without rebuilding"]
    cw = report.get("clean_work")
    if cw and rerun != "cleaned":
        n = cw["bytes_freed"]
        k, unit = next((k, u) for k, u in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
                       if n >= 2**k or k == 0)
        lines.append(f"cleaned {out}/work: removed {cw['files_removed']:,} files, freed {n / 2**k:.1f} {unit} "
                     f"({n:,} bytes)")
    return "\n".join(lines)


def dry_run(manifest: Manifest) -> str:
    rows = [("component", "format", "category", "language", "files", "missing", "published tokens")]
    for c in manifest.components:
        lang = ",".join(c.language) if isinstance(c.language, list) else (c.language or "-")
        rows.append((c.name, c.format, c.category or "-", lang[:24], str(len(c.files)),
                     ", ".join(c.missing) if c.missing else "-",
                     f"{c.published_tokens:,}" if c.published_tokens else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"manifest {manifest.name} ({manifest.path}), root {manifest.root}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    present = sum(1 for c in manifest.components if c.files and not c.missing)
    partial = sum(1 for c in manifest.components if c.files and c.missing)
    lines.append(f"{present} present, {partial} partly present, "
                 f"{len(manifest.components) - present - partial} missing, of {len(manifest.components)} components")
    return "\n".join(lines)


def _print(text: str) -> int:
    """Print ``text`` to stdout; 0, or 141 when the reader went away (``... --dry-run | head``), as a writer killed
    by SIGPIPE, instead of a BrokenPipeError traceback (and another at exit)."""
    try:
        print(text, flush=True)
        return 0
    except BrokenPipeError:
        from tokenizer.cli import after_broken_pipe

        return after_broken_pipe(sys.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--manifest", required=True, help="corpus manifest YAML")
    ap.add_argument("--out", help="output folder (required unless --dry-run)")
    ap.add_argument("--root", help="override the manifest's root (where the component files live; relative to the "
                    "current directory)")
    ap.add_argument("--dry-run", action="store_true", help="list present/missing files per component and exit")
    ap.add_argument("--executor", choices=("ray", "local"), default="ray",
                    help="ray (default): Ray tasks/actors; local: everything in this process")
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start Ray locally)")
    ap.add_argument("--num-cpus", type=int, help="CPUs for a locally started Ray (default: all cores)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--near-dedup", dest="near", action="store_true", default=None, help="enable MinHash near dedup")
    g.add_argument("--no-near-dedup", dest="near", action="store_false", help="disable MinHash near dedup")
    ap.add_argument("--near-threshold", type=float, help="Jaccard threshold for near dedup")
    ap.add_argument("--force", action="store_true", help="discard an --out built with other settings (or whose work/ "
                    "was cleaned) and rebuild it")
    ap.add_argument("--clean-work", action="store_true",
                    help="once the build is complete, delete work/'s bulk files (ingest text, signatures, tokenized\n"
                    "units; 2-3x the shards' size) and keep only its markers: a re-run then resumes nothing\n"
                    "and does nothing (--force rebuilds). On a complete --out: clean it without rebuilding")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.num_cpus is not None and args.num_cpus < 1:  # Ray's ValueError traceback for -1; 0 meant all cores
        ap.error(f"--num-cpus must be >= 1, got {args.num_cpus}")
    root = args.root
    if root is not None and "://" not in root:  # a path on the command line is relative to the working directory
        root = os.path.abspath(os.path.expanduser(os.path.expandvars(root)))
    try:
        manifest = load_manifest(args.manifest, root=root, allow_missing=args.dry_run)
        if args.dry_run:
            return _print(dry_run(manifest))
        if not args.out:
            raise BuildError("--out is required (or use --dry-run)")
        if args.executor == "ray":
            from pipeline.executor import RayExecutor, init_ray

            started = init_ray(args.address, args.num_cpus)
            executor = RayExecutor()
        else:
            from pipeline.executor import LocalExecutor

            started, executor = False, LocalExecutor()
        try:
            report = build(manifest, args.out, executor, near=args.near, near_threshold=args.near_threshold,
                           progress=not args.no_progress, force=args.force, manifest_arg=args.manifest,
                           clean_work=args.clean_work)
        finally:
            executor.close()
            if started:
                import ray

                ray.shutdown()
        return _print(summary(report, args.out))
    except (ManifestError, BuildError, stages.InputError) as e:
        # raised in a Ray task, the error is a RayTaskError subclassing it; its text is the remote traceback
        print(f"error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
