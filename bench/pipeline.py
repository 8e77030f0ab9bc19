"""Pipeline throughput: build a generated multilingual corpus end to end and report MB/s.

    python bench/pipeline.py [--mb 200] [--files 48] [--near] [--datatrove-python /tmp/dtvenv/bin/python]

Generates ``--mb`` MB of JSONL (eleven languages and scripts plus code, with 2% exact and 1%
near duplicates planted) into a temp folder, then runs ``pipeline/build.py``'s ``build`` on
Ray started locally with all cores: once with exact dedup + tokenization, once more with
MinHash near dedup on as well (``--near``). Prints per-stage wall time and CPU seconds
(summed over tasks) so it shows where the time goes, and writes JSON. Ray start-up is
reported separately from the build.

Peer (``--datatrove-python``, a venv with datatrove 0.10): datatrove's LocalPipelineExecutor
(one task per file, one worker per core) running JsonlReader → LambdaFilter (length) →
JsonlWriter over the same files. That is less work than our ingest stage (read, four
filters, content hash, Arrow write), so the ratio against our ingest wall time is generous to
datatrove; datatrove has no World tokenizer, so tokenization is not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus_manifests",
                                "sample"))

from make_sample import js_code, prose, python_code, rust_code  # noqa: E402

LANGS = ["en"] * 8 + ["de", "fr", "es", "ru", "zh", "ja", "ko", "ar", "hi", "el"]


def generate(folder: str, mb: int, files: int, seed: int = 0) -> tuple[int, int]:
    """Write ``files`` JSONL files totalling about ``mb`` MB; returns (bytes, documents)."""
    rng = random.Random(seed)
    pool = {lang: [prose(rng, lang, 1) for _ in range(400)] for lang in sorted(set(LANGS))}
    code = [g(rng) for g in (python_code, rust_code, js_code) for _ in range(100)]
    per_file = mb * 10**6 // files
    total = docs = 0
    recent: list[str] = []
    for f in range(files):
        path = os.path.join(folder, f"part-{f:04d}.jsonl")
        size = 0
        with open(path, "w", encoding="utf-8") as out:
            while size < per_file:
                r = rng.random()
                if r < 0.02 and recent:
                    text = rng.choice(recent)  # exact duplicate
                elif r < 0.03 and recent:
                    words = rng.choice(recent).split(" ")
                    i = rng.randrange(len(words))
                    words[i] = words[i][::-1]
                    text = " ".join(words)  # near duplicate
                elif r < 0.12:
                    comment = "\n".join("# " + p for p in rng.sample(pool["en"], 2))
                    text = comment + "\n" + "\n".join(rng.sample(code, 3)) + f"\n# build {rng.getrandbits(48):x}\n"
                else:
                    lang = rng.choice(LANGS)
                    paras = rng.sample(pool[lang], rng.randint(2, 8))
                    text = f"{rng.getrandbits(40):x} " + "\n\n".join(paras)
                if len(recent) < 2000:
                    recent.append(text)
                else:
                    recent[rng.randrange(2000)] = text
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                out.write(line)
                size += len(line.encode())
                docs += 1
        total += size
    return total, docs


DATATROVE = """
import sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.filters import LambdaFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
data, out, tasks, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter()
LocalPipelineExecutor([JsonlReader(data, glob_pattern="*.jsonl"), LambdaFilter(lambda d: len(d.text) >= 20),
                       JsonlWriter(out + "/docs", compression=None)],
                      tasks=tasks, workers=workers, logging_dir=out + "/logs").run()
print("WALL", time.perf_counter() - t)
"""


def run_datatrove(python: str, data: str, out: str, tasks: int, workers: int) -> dict:
    import subprocess

    t0 = time.perf_counter()
    r = subprocess.run([python, "-c", DATATROVE, data, out, str(tasks), str(workers)], capture_output=True,
                       text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"datatrove failed: {r.stderr[-2000:]}")
    inner = float(next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("WALL")))
    return {"wall_s": wall, "pipeline_s": inner}


def run(manifest_path: str, out: str, near: bool) -> dict:
    from pipeline.build import build
    from pipeline.executor import RayExecutor
    from pipeline.manifest import load_manifest

    ex = RayExecutor()
    t0 = time.perf_counter()
    report = build(load_manifest(manifest_path), out, ex, near=near, progress=False)
    wall = time.perf_counter() - t0
    ex.close()
    return {"wall_s": wall, "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--files", type=int, default=48)
    ap.add_argument("--near", action="store_true", help="also run with MinHash near dedup on")
    ap.add_argument("--datatrove-python", help="python of a venv with datatrove: run the peer too")
    ap.add_argument("--keep", help="generate into this folder and keep it (default: a temp folder)")
    ap.add_argument("--out-json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "pipeline.json"))
    args = ap.parse_args()
    tmp = args.keep or tempfile.mkdtemp(prefix="bench_pipeline_")
    data = os.path.join(tmp, "data")
    os.makedirs(data, exist_ok=True)
    t0 = time.perf_counter()
    if not os.listdir(data):
        nbytes, ndocs = generate(data, args.mb, args.files)
    else:
        nbytes = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))
        ndocs = None
    gen_s = time.perf_counter() - t0
    manifest = os.path.join(tmp, "bench.yaml")
    with open(manifest, "w") as f:
        f.write(f"name: bench\nroot: {data}\nshard_tokens: 33554432\nnear_dedup:\n  enabled: false\n"
                f"  threshold: 0.8\n  num_perm: 128\n"
                f"components:\n  - name: mixed\n    paths: ['part-*.jsonl']\n    format: jsonl\n")
    import ray

    from pipeline.executor import init_ray

    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    init_ray(num_cpus=cores)
    ray_start_s = time.perf_counter() - t0
    results = {"machine": {"cpus": cores, "platform": platform.platform(), "python": platform.python_version()},
               "input": {"bytes": nbytes, "documents": ndocs, "files": args.files, "generate_s": gen_s},
               "ray_start_s": ray_start_s, "runs": {}}
    variants = [("exact+tokenize", False)] + ([("exact+near+tokenize", True)] if args.near else [])
    for name, near in variants:
        out = os.path.join(tmp, f"out_{name}")
        shutil.rmtree(out, ignore_errors=True)
        load0 = os.getloadavg()[0]
        r = run(manifest, out, near)
        rep = r["report"]
        cpu_total = sum(rep["stage_cpu_seconds"].values())
        mbs = nbytes / r["wall_s"] / 1e6
        results["runs"][name] = {"wall_s": r["wall_s"], "MB_per_s": mbs, "MB_per_s_per_core": mbs / cores,
                                 "stage_wall_s": {k: v for k, v in rep["seconds"].items() if k != "total"},
                                 "stage_cpu_s": rep["stage_cpu_seconds"], "stage_task_s": rep["stage_task_seconds"],
                                 "cpu_s_total": cpu_total, "MB_per_cpu_s": nbytes / cpu_total / 1e6,
                                 "loadavg_1min": [load0, os.getloadavg()[0]], "totals": rep["totals"],
                                 "duplicates": rep["duplicates"]}
    ray.shutdown()
    if args.datatrove_python:
        dt = run_datatrove(args.datatrove_python, data, os.path.join(tmp, "out_datatrove"), args.files, cores)
        ours = results["runs"]["exact+tokenize"]["stage_wall_s"]["ingest_wall"]
        results["datatrove_read_filter_write"] = {**dt, "MB_per_s": nbytes / dt["pipeline_s"] / 1e6,
                                                  "ours_ingest_wall_s": ours,
                                                  "ratio_datatrove_over_ours": dt["pipeline_s"] / ours}
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out_json), exist_ok=True)
    tmp = f"{args.out_json}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, args.out_json)
    print(f"input {nbytes / 1e6:.0f} MB in {args.files} JSONL files, {cores} cores, Ray start {ray_start_s:.1f} s")
    print(f"{'run':22s} {'wall s':>8s} {'MB/s':>7s} {'MB/s/core':>9s}  stage wall s / cpu s")
    for name, r in results["runs"].items():
        st = r["stage_wall_s"]
        cpu = r["stage_cpu_s"]
        stages = ", ".join(f"{k.replace('_wall', '')} {v:.1f}" for k, v in st.items() if k.endswith("_wall"))
        cpus = ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items()))
        print(f"{name:22s} {r['wall_s']:8.1f} {r['MB_per_s']:7.1f} {r['MB_per_s_per_core']:9.1f}  {stages}")
        print(f"{'':22s} cpu s: {cpus} = {r['cpu_s_total']:.1f} -> {r['MB_per_cpu_s']:.1f} MB per CPU-second in the stage functions; "
              f"load avg {r['loadavg_1min'][0]:.1f}->{r['loadavg_1min'][1]:.1f}")
        print(f"{'':22s} dups exact {r['duplicates']['exact']:,} near {r['duplicates']['near']:,}; "
              f"{r['totals']['documents']:,} docs, {r['totals']['tokens']:,} tokens out")
    if "datatrove_read_filter_write" in results:
        d = results["datatrove_read_filter_write"]
        print(f"peer: datatrove read+filter+write {d['pipeline_s']:.1f} s ({d['MB_per_s']:.1f} MB/s) vs our ingest "
              f"(read+filters+hash+Arrow write) {d['ours_ingest_wall_s']:.1f} s: ours {d['ratio_datatrove_over_ours']:.2f}x faster")


if __name__ == "__main__":
    main()
