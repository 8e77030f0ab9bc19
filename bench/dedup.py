"""Near-dedup benchmark: ours vs datasketch MinHashLSH (one process) vs datatrove's four MinHash stages.

One generated corpus (pipeline/dedup/synth.py: multilingual, planted exact copies, small edits,
footers, whitespace changes, heavy edits), written as JSONL, and for each tool:
  - signatures per core (documents/s, one thread), ours vs datasketch `MinHash.update_batch`;
  - end to end from the JSONL file to the list of removed documents, wall time on this machine
    (our CLI and datatrove as subprocesses, interpreter start-up and Ray start-up included);
  - quality against exact Jaccard of char-5-gram sets: recall of planted pairs with Jaccard >= 0.9
    and the rate of removals whose Jaccard to the named document is < 0.5.
`speedup` in the JSON is each row's seconds divided by our in-process CLI's seconds.
datatrove runs in its own venv (`--datatrove-python`), by re-invoking this file with
`--datatrove-worker`, so the project's venv is not touched.

    .venv/bin/python bench/dedup.py --docs 50000 --datatrove-python /tmp/dtvenv/bin/python
    .venv/bin/python bench/dedup.py --scale 1000000      # our CLI only: wall time and peak memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def datatrove_worker(work: str, tasks: int, workers: int) -> None:
    """The four datatrove MinHash stages with their defaults (word 5-grams, 14 buckets x 8 hashes)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig()
    w = f"{work}/dt"
    s1 = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(f"{work}/dt_in", text_key="text", id_key="id"),
            MinhashDedupSignature(output_folder=f"{w}/sigs", config=cfg),
        ],
        tasks=tasks,
        workers=workers,
        logging_dir=f"{w}/logs/s1",
    )
    s2 = LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(input_folder=f"{w}/sigs", output_folder=f"{w}/buckets", config=cfg)],
        tasks=cfg.num_buckets,
        workers=workers,
        logging_dir=f"{w}/logs/s2",
        depends=s1,
    )
    s3 = LocalPipelineExecutor(
        pipeline=[
            MinhashDedupCluster(
                input_folder=f"{w}/buckets", output_folder=f"{w}/remove", config=cfg, save_cluster_id=True
            )
        ],
        tasks=1,
        logging_dir=f"{w}/logs/s3",
        depends=s2,
    )
    s4 = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(f"{work}/dt_in", text_key="text", id_key="id"),
            MinhashDedupFilter(
                input_folder=f"{w}/remove", exclusion_writer=JsonlWriter(f"{w}/removed", compression=None)
            ),
        ],
        tasks=tasks,
        workers=workers,
        logging_dir=f"{w}/logs/s4",
        depends=s3,
    )
    s4.run()


def _write_jsonl(path: Path, texts: list[str], start: int = 0) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts, start):
            f.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _tree_rss_mb(pid: int) -> float:
    """Sum of VmRSS over pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        children.setdefault(int(fields["PPid"]), []).append(int(d))
        rss[int(d)] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [pid]
    while todo:
        q = todo.pop()
        total += rss.get(q, 0)
        todo += children.get(q, [])
    return total / 1024


def _cli(inp: Path, out: Path, mode: str, threads: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "pipeline.dedup", "--input", str(inp), "--out", str(out)]
    cmd += ["--mode", mode, "--threads", str(threads), "--report", str(out) + ".report.json"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:  # RSS summed over the CLI and its descendants (Ray's raylet and workers)
        while not stop.wait(0.5):
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    rep = json.loads(Path(str(out) + ".report.json").read_text())
    rep["peak_tree_rss_MB"] = round(peak[0])
    return time.perf_counter() - t, rep


def _removed_from_cli(out: Path):
    import numpy as np

    rows = [json.loads(x) for x in out.read_text().splitlines()]
    return np.array([r["id"] for r in rows], np.int64), np.array([r["duplicate_of"] for r in rows], np.int64)


def sig_speed(texts, cfg) -> dict:
    """Documents/s of signatures on one core: ours (one thread) and datasketch update_batch."""
    from datasketch import MinHash

    from pipeline.dedup import NearDedup
    from pipeline.dedup.minhash import normalize

    nd = NearDedup(cfg)
    nd.signatures(texts[:10])  # numba cache load / compile outside the clock
    sub = texts[:5000]
    t = time.perf_counter()
    nd.signatures(sub)
    ours = len(sub) / (time.perf_counter() - t)
    sub_ds = texts[:400]
    t = time.perf_counter()
    for doc in sub_ds:
        n = normalize(doc)
        m = MinHash(num_perm=cfg.num_perm)
        m.update_batch([n[i : i + 5].encode("utf-8") for i in range(max(1, len(n) - 4))])
    ds = len(sub_ds) / (time.perf_counter() - t)
    mb = sum(len(x.encode()) for x in sub) / len(sub) / 1e6
    return {"ours_docs_s": ours, "datasketch_docs_s": ds, "ratio": ours / ds, "ours_MB_s": ours * mb}


def datasketch_e2e(path: Path, n: int, threshold: float, num_perm: int):
    """datasketch MinHashLSH in one process from the JSONL file, clusters by union-find, smallest kept."""
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    from pipeline.dedup.minhash import normalize

    t = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    mhs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            s = normalize(obj["text"])
            m = MinHash(num_perm=num_perm)
            m.update_batch([s[i : i + 5].encode("utf-8") for i in range(max(1, len(s) - 4))])
            lsh.insert(obj["id"], m)
            mhs.append(m)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(mhs):
        for j in lsh.query(m):
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    root = np.array([find(i) for i in range(n)])
    sel = root != np.arange(n)
    return time.perf_counter() - t, np.flatnonzero(sel), root[sel]


def datatrove_e2e(work: Path, python: str, halves: list[int], workers: int):
    """Run the datatrove worker in its venv; read its cluster ids (stage 3) back as (removed, dup_of)."""
    import numpy as np

    shutil.rmtree(work / "dt", ignore_errors=True)
    cmd = [python, str(Path(__file__).resolve()), "--datatrove-worker", str(work), "--workers", str(workers)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"datatrove failed:\n{proc.stderr[-3000:]}")
    offsets = np.cumsum([0] + halves)
    clusters: dict[int, list[int]] = {}
    for f in sorted((work / "dt" / "remove").glob("*.clusters")):
        file_id = int(f.name.split(".")[0])
        data = f.read_bytes()
        for doc, cid in struct.iter_unpack("<II", data):
            clusters.setdefault(cid, []).append(int(offsets[file_id] + doc))
    removed, dup = [], []
    for members in clusters.values():
        m = min(members)
        removed += [x for x in members if x != m]
        dup += [m for x in members if x != m]
    order = np.argsort(removed)
    n_removed_files = sum(1 for f in (work / "dt" / "removed").glob("*") for _ in open(f))
    return dt, np.array(removed, np.int64)[order], np.array(dup, np.int64)[order], n_removed_files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=50_000)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--datatrove-python", default="/tmp/dtvenv/bin/python")
    p.add_argument("--skip-datasketch", action="store_true")
    p.add_argument("--skip-datatrove", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--workdir", default="/tmp/dedup_bench")
    p.add_argument("--scale", type=int, default=0, help="also dedup a corpus of this many docs (ours only)")
    p.add_argument("--scale-modes", default="local", help="comma-separated CLI modes for --scale: local,ray")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dedup.json"))
    p.add_argument("--datatrove-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.datatrove_worker:
        datatrove_worker(a.datatrove_worker, tasks=2, workers=a.workers)
        return

    sys.path.insert(0, str(ROOT))
    import numpy as np

    from pipeline.dedup import MinHashConfig, NearDedup
    from pipeline.dedup.synth import SynthConfig, evaluate, make_corpus

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = MinHashConfig(threshold=a.threshold, num_perm=a.num_perm)
    result: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "config": {"threshold": cfg.threshold, "num_perm": cfg.num_perm, "bands": cfg.bands, "rows": cfg.rows},
    }
    if a.docs:
        t = time.perf_counter()
        texts, planted = make_corpus(SynthConfig(docs=a.docs, seed=0))
        inp = work / "docs.jsonl"
        _write_jsonl(inp, texts)
        half = len(texts) // 2
        (work / "dt_in").mkdir(exist_ok=True)
        _write_jsonl(work / "dt_in" / "part_000.jsonl", texts[:half])
        _write_jsonl(work / "dt_in" / "part_001.jsonl", texts[half:], start=half)
        result["corpus"] = {
            "docs": len(texts),
            "MB": round(inp.stat().st_size / 1e6, 1),
            "planted": len(planted),
            "gen_s": round(time.perf_counter() - t, 1),
        }
        print(f"corpus: {result['corpus']}", flush=True)
        result["signatures_per_core"] = sig_speed(texts, cfg)
        print(f"signatures per core: {result['signatures_per_core']}", flush=True)
        rows: dict = {}
        jaccard_cache: dict = {}

        def record(name, seconds, removed, dup):
            q = evaluate(texts, planted, removed, dup, MinHashConfig(), cache=jaccard_cache)
            rows[name] = {"seconds": round(seconds, 2), "docs_s": round(len(texts) / seconds, 1), **q}
            print(f"{name}: {rows[name]}", flush=True)

        secs, rep = _cli(inp, work / "ours.jsonl", "local", a.workers)
        record("ours (CLI, in-process)", secs, *_removed_from_cli(work / "ours.jsonl"))
        rows["ours (CLI, in-process)"]["report_seconds"] = rep["seconds"]
        if not a.skip_ray:
            secs, rep = _cli(inp, work / "ours_ray.jsonl", "ray", a.workers)
            record("ours (CLI, Ray incl. start-up)", secs, *_removed_from_cli(work / "ours_ray.jsonl"))
        for kind in ("word",):  # the alternative shingling, same pipeline, for the default's justification
            nd = NearDedup(MinHashConfig(threshold=a.threshold, num_perm=a.num_perm, shingle_kind=kind, threads=2))
            t = time.perf_counter()
            sig = nd.signatures(texts)
            r, d = nd.duplicates([(np.arange(len(texts)), sig)])
            record(f"ours, {kind} 5-grams (in-process API)", time.perf_counter() - t, r, d)
        if not a.skip_datasketch:
            secs, r, d = datasketch_e2e(inp, len(texts), a.threshold, a.num_perm)
            record("datasketch MinHashLSH (1 process)", secs, r, d)
        if not a.skip_datatrove:
            secs, r, d, nfile = datatrove_e2e(work, a.datatrove_python, [half, len(texts) - half], a.workers)
            record("datatrove 4 stages (local, 2 tasks)", secs, r, d)
            rows["datatrove 4 stages (local, 2 tasks)"]["removed_written"] = nfile
        result["end_to_end"] = rows
        ours = rows["ours (CLI, in-process)"]["seconds"]
        result["speedup"] = {
            k: round(v["seconds"] / ours, 2) for k, v in rows.items() if not k.startswith("ours (CLI, in")
        }
    if a.scale:
        result["scale"] = {m: scale_run(a.scale, work, a.workers, m) for m in a.scale_modes.split(",")}
    print(json.dumps(result, indent=1))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)


def scale_run(n: int, work: Path, threads: int, mode: str) -> dict:
    """Generate n documents in chunks of 50k (bounded memory), run our CLI, report wall and peak RSS."""
    from pipeline.dedup.synth import SynthConfig, make_corpus

    path = work / f"scale_{n}.jsonl"
    t = time.perf_counter()
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for c, start in enumerate(range(0, n, 50_000)):
                texts, _ = make_corpus(SynthConfig(docs=min(50_000, n - start), seed=1000 + c))
                for i, x in enumerate(texts, start):
                    f.write(json.dumps({"id": i, "text": x}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    gen = time.perf_counter() - t
    secs, rep = _cli(path, work / f"scale_{n}.{mode}.removed.jsonl", mode, threads)
    res = {
        "mode": mode,
        "docs": n,
        "GB": round(path.stat().st_size / 1e9, 2),
        "gen_s": round(gen, 1),
        "wall_s": round(secs, 1),
        "docs_s": round(n / secs),
        "peak_rss_MB": rep["peak_rss_MB"],
        "peak_tree_rss_MB": rep["peak_tree_rss_MB"],
        "peak_note": "peak_rss_MB: the CLI process (ru_maxrss); peak_tree_rss_MB: sampled every 0.5 s, "
        "summed over the CLI and its descendants (Ray's shared object-store pages counted per process)",
        "removed": rep["removed"],
        "report_seconds": rep["seconds"],
    }
    print(f"scale: {res}", flush=True)
    return res


if __name__ == "__main__":
    main()
