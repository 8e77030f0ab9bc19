"""The pipeline on a real Ray cluster: same bytes as in-process, a killed worker is retried,
a SIGKILLed driver resumes, and ``ray job submit --working-dir .`` works.

One cluster for the module: ``ray start --head`` on 127.0.0.1 with its own --temp-dir, so its
processes can be found (their command lines name that folder; workers are the raylet's
children) and stopped by process id at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from pipeline.build import build
from pipeline.executor import LocalExecutor, init_ray
from pipeline.manifest import load_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "corpus_manifests", "sample.yaml")
BUILD = os.path.join(REPO, "pipeline", "build.py")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can see."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


def _cluster_pids(temp: str) -> set[int]:
    """Processes of the cluster in ``temp``: those naming it, and all their descendants."""
    procs = _procs()
    pids = {p for p, (_, cmd) in procs.items() if temp in cmd}
    grew = True
    while grew:
        kids = {p for p, (pp, _) in procs.items() if pp in pids} - pids
        pids |= kids
        grew = bool(kids)
    return pids


def _stop_cluster(temp: str, started: set[int]) -> None:
    """SIGTERM the cluster's processes (those of ``temp`` and ``started``), SIGKILL what is left after 4 s,
    and remove ``temp``."""
    pids = _cluster_pids(temp) | started
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 4
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.2)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp, ignore_errors=True)


def _output_files(out: str) -> dict[str, bytes]:
    files = {"index.json": open(os.path.join(out, "index.json"), "rb").read()}
    for name in sorted(os.listdir(os.path.join(out, "shards"))):
        files[f"shards/{name}"] = open(os.path.join(out, "shards", name), "rb").read()
    return files


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="rp", dir="/tmp")  # short: unix socket paths are limited
    port, dash = _free_port(), _free_port()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    started = set()
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                        f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dash}", "--object-store-memory=400000000", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=180)
        started = _cluster_pids(temp)
        assert started, "ray start left no processes"
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "temp": temp, "env": env}
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _stop_cluster(temp, started)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "out")
    build(load_manifest(SAMPLE), out, LocalExecutor(), progress=False)
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The sample generator at 12x, with the sample manifest pointed at it: ~4,000 documents."""
    d = tmp_path_factory.mktemp("big")
    subprocess.run([sys.executable, os.path.join(REPO, "corpus_manifests", "sample", "make_sample.py"),
                    "--out", str(d / "data"), "--scale", "12"], check=True, capture_output=True, timeout=300)
    text = open(SAMPLE).read().replace("root: sample", f"root: {d / 'data'}")
    (d / "big.yaml").write_text(text)
    manifest = str(d / "big.yaml")
    out = str(d / "ref")
    build(load_manifest(manifest), out, LocalExecutor(), progress=False)
    return manifest, out


def test_ray_build_is_byte_identical_to_in_process(cluster, reference, tmp_path, monkeypatch):
    import ray

    import pipeline.build
    from pipeline.executor import RayExecutor

    monkeypatch.setattr(pipeline.build, "EXACT_DOCS_PER_TASK", 100)  # exact dedup as 4 hash-partition tasks
    monkeypatch.setattr(pipeline.build, "NEAR_RAY_MIN_DOCS", 0)  # near dedup on Ray: signatures as ObjectRefs
    import pipeline.dedup.ray_exec as rx

    seen = []
    real = rx.duplicates_ray
    monkeypatch.setattr(rx, "duplicates_ray", lambda blocks, cfg: seen.append([type(b) for b in blocks]) or real(blocks, cfg))

    init_ray(cluster["address"])
    try:
        ex = RayExecutor()
        out = str(tmp_path / "ray")
        build(load_manifest(SAMPLE), out, ex, progress=False)
        ex.close()
    finally:
        ray.shutdown()
    assert _output_files(out) == _output_files(reference)
    assert seen and all(t is ray.ObjectRef for t in seen[0])  # the driver handed on references only


def test_a_relative_out_works_on_a_cluster_started_elsewhere(cluster, reference, tmp_path, monkeypatch):
    """Ray workers do not run in the driver's working directory: with a relative --out every ingest task failed
    (FileNotFoundError on rel_out/work/ingest/..., reproduced with RAY_ADDRESS and the CLI). The build makes --out
    absolute before any task gets a path under it."""
    import ray

    from pipeline.executor import RayExecutor

    monkeypatch.chdir(tmp_path)
    init_ray(cluster["address"])
    try:
        ex = RayExecutor()
        build(load_manifest(SAMPLE), "rel_out", ex, progress=False)
        ex.close()
    finally:
        ray.shutdown()
    assert _output_files(str(tmp_path / "rel_out")) == _output_files(reference)


def test_worker_killed_mid_task_is_retried(cluster, big, tmp_path):
    import ray

    from pipeline.executor import RayExecutor

    manifest, ref = big
    killed: list[str] = []
    stop = threading.Event()
    raylets = [p for p, (_, cmd) in _procs().items() if cluster["temp"] in cmd and "raylet" in cmd.split()[0]]

    def killer():
        targets = ("ray::ingest_task", "ray::TokenizeWorker.tokenize", "ray::shard_task")
        while not stop.is_set() and len(killed) < 2:
            for pid, (ppid, cmd) in _procs().items():
                if ppid in raylets and cmd.startswith(targets) and not any(cmd.split()[0] in k for k in killed):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(f"{cmd.split()[0]} pid {pid}")
                    except ProcessLookupError:
                        pass
                    break
            time.sleep(0.01)

    init_ray(cluster["address"])
    t = threading.Thread(target=killer, daemon=True)
    try:
        ex = RayExecutor()
        out = str(tmp_path / "killed")
        t.start()
        build(load_manifest(manifest), out, ex, progress=False)
        ex.close()
    finally:
        stop.set()
        t.join()
        ray.shutdown()
    assert killed, "no running task was caught to kill"
    assert _output_files(out) == _output_files(ref), killed


def test_driver_sigkill_with_ray_then_rerun_is_identical(cluster, reference, tmp_path):
    from test_pipeline_build import kill_when, progress_points

    out = str(tmp_path / "out")
    cmd = [sys.executable, BUILD, "--manifest", SAMPLE, "--address", cluster["address"], "--no-progress", "--out", out]
    points = progress_points(out)
    codes = [kill_when(cmd, ready, env=cluster["env"]) for ready in (points[1], points[3])]  # mid-ingest, mid-tokenize
    assert codes.count(-signal.SIGKILL) >= 1, codes
    r = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _output_files(out) == _output_files(reference)


def test_ray_job_submit_working_dir(cluster, reference, tmp_path):
    import json

    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    big = [f"{f} ({os.path.getsize(os.path.join(REPO, f)) >> 20} MB)" for f in listed
           if os.path.isfile(os.path.join(REPO, f)) and os.path.getsize(os.path.join(REPO, f)) > 20 * 2**20]
    assert not big, f"--working-dir . would upload these; add them to .gitignore/.rayignore: {big}"
    needed = [f for f in ("tokenizer/data/rwkv_vocab_v20230424.txt", "corpus_manifests/sample.yaml")
              if subprocess.run(["git", "check-ignore", "-q", f], cwd=REPO).returncode == 0]
    assert not needed, f"--working-dir . would leave out {needed}: they match a .gitignore/.rayignore pattern"
    out = str(tmp_path / "job_out")
    r = subprocess.run([RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".", "--",
                        "python", "pipeline/build.py", "--manifest", "corpus_manifests/sample.yaml", "--out", out,
                        "--no-progress"], cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "succeeded" in r.stdout
    assert "TOTAL" in r.stdout  # the final table came back through the job's logs
    got, ref = _output_files(out), _output_files(reference)
    assert {k: v for k, v in got.items() if k.startswith("shards/")} == \
        {k: v for k, v in ref.items() if k.startswith("shards/")}
    gi, ri = json.loads(got["index.json"]), json.loads(ref["index.json"])
    assert gi["components"] == ri["components"] and gi["shards"] == ri["shards"]
    assert gi["manifest"]["path"] == "corpus_manifests/sample.yaml"


def test_ray_near_dedup_with_a_file_without_documents(cluster, tmp_path):
    """A file whose every row is dropped saves no signatures; Ray near dedup (chosen by the
    manifest's ray_min_docs) must pass its empty block and match the in-process build."""
    import json

    import ray

    from pipeline.executor import RayExecutor

    (tmp_path / "in").mkdir()
    doc = "a paragraph about rivers, hills and the small boats that cross them at dawn"
    docs = [doc + f" number {i}" for i in range(12)] + [doc + " number 3!", "something else entirely, friend"]
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (tmp_path / "in" / "bad.jsonl").write_text('not json\n{"body": "no text"}\n')
    m = tmp_path / "m.yaml"
    m.write_text("name: e\nroot: in\nnear_dedup: {enabled: true, threshold: 0.5, ray_min_docs: 1, partitions: 2}\n"
                 "components:\n  - {name: a, paths: [a.jsonl]}\n  - {name: bad, paths: [bad.jsonl]}\n")
    ref = str(tmp_path / "local")
    build(load_manifest(str(m)), ref, LocalExecutor(), progress=False)
    init_ray(cluster["address"])
    try:
        ex = RayExecutor()
        out = str(tmp_path / "ray")
        report = build(load_manifest(str(m)), out, ex, progress=False)
        ex.close()
    finally:
        ray.shutdown()
    assert report["components"]["a"]["near_dedup"]["dropped"]
    assert report["components"]["bad"]["read"]["out"] == 0
    assert _output_files(out) == _output_files(ref)


def test_config_error_in_a_ray_task_prints_one_line(cluster, tmp_path, capsys):
    """A parquet file without the text column is a ManifestError raised inside a Ray task: the build
    exits 2 with the one-line message, not Ray's remote traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.build import main

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"content": ["some text here, long enough"]}), str(tmp_path / "in" / "c.parquet"))
    m = tmp_path / "m.yaml"
    m.write_text("name: e\nroot: in\ncomponents:\n  - {name: code, paths: [c.parquet], format: parquet, "
                 "text_field: contents}\n")
    rc = main(["--manifest", str(m), "--out", str(tmp_path / "out"), "--executor", "ray", "--address",
               cluster["address"], "--no-progress"])
    err = capsys.readouterr().err   # Ray's own INFO lines come first
    tail = err[err.index("error: "):].strip()
    assert rc == 2 and len(tail.splitlines()) == 1 and "Traceback" not in err, err
    assert "c.parquet" in tail and "'content'" in tail


def test_plain_build_beside_a_recorded_cluster(tmp_path):
    """A plain build (no --address, no $RAY_ADDRESS) starts its own local Ray even when a cluster started
    with `ray start --head` is recorded on the machine: a bare ray.init() follows that record, connects, and
    then refuses the num_cpus the build passes (the README's `ray start` / `ray job submit` path did this)."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")   # $RAY_TMPDIR: the record lives in $RAY_TMPDIR/ray
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=temp, PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    started = set()
    try:
        subprocess.run([RAY, "start", "--head", f"--port={_free_port()}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                        "--include-dashboard=false", "--object-store-memory=200000000", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=180)
        started = _cluster_pids(temp)
        assert started and os.path.exists(os.path.join(temp, "ray", "ray_current_cluster"))
        out = str(tmp_path / "out")
        r = subprocess.run([sys.executable, BUILD, "--manifest", SAMPLE, "--out", out], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert os.path.exists(os.path.join(out, "index.json"))
    finally:
        _stop_cluster(temp, started)
