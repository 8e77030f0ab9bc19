"""``--clean-work``: the sample manifest built in-process (LocalExecutor) with and without it. The published files
are the same, work/ keeps only its markers, a re-run does nothing (or, with other settings, is refused / rebuilds
with --force), interruptions before or during the cleaning lose nothing, and the trainer reads the cleaned corpus."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from pipeline import build as build_mod
from pipeline.build import BuildError, build, main, summary
from pipeline.executor import LocalExecutor
from pipeline.manifest import load_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "corpus_manifests", "sample.yaml")
BULK = re.compile(r"\.(arrow|npy|quarantine\.jsonl)$")
"""work/'s bulk files: ingest text, signatures, tokenized units, dedup.arrow, per-unit quarantine records."""
RUN_DEPENDENT = ("seconds", "throughput", "stage_task_seconds", "stage_cpu_seconds")
"""report.json's timings, which differ between any two builds."""


def published(out: str) -> dict[str, bytes]:
    """The published files, byte for byte (report.json apart: it holds timings)."""
    files = {n: open(os.path.join(out, n), "rb").read() for n in ("index.json", "duplicates.jsonl", "quarantine.jsonl")}
    for name in sorted(os.listdir(os.path.join(out, "shards"))):
        files[f"shards/{name}"] = open(os.path.join(out, "shards", name), "rb").read()
    return files


def report_without_timings(out: str) -> dict:
    r = json.load(open(os.path.join(out, "report.json")))
    return {k: v for k, v in r.items() if k not in RUN_DEPENDENT}


def tree(out: str) -> dict[str, tuple[int, bytes]]:
    """Every file under --out (work/ too) -> (mtime_ns, bytes); not the lock file, where each build writes its pid."""
    got = {}
    for d, _, names in os.walk(out):
        for n in names:
            if n == build_mod.LOCK_NAME:
                continue
            p = os.path.join(d, n)
            got[os.path.relpath(p, out)] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
    return got


def bulk_in(out: str) -> dict[str, int]:
    """work/'s bulk files -> size."""
    work = os.path.join(out, "work")
    return {os.path.relpath(os.path.join(d, n), work): os.path.getsize(os.path.join(d, n))
            for d, _, names in os.walk(work) for n in names if BULK.search(n)}


def run(out: str, **kw) -> dict:
    return build(load_manifest(SAMPLE), out, kw.pop("executor", None) or LocalExecutor(), progress=False, **kw)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A normal build (work/ kept); tests copy it before changing anything."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    run(out)
    return out


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cleaned") / "out")
    return out, run(out, clean_work=True)


def copy(src: str, tmp_path) -> str:
    dst = str(tmp_path / "out")
    shutil.copytree(src, dst)
    return dst


class NoWork(LocalExecutor):
    """An executor that fails any stage job: a call that must not rebuild anything takes it."""

    def _fail(self, jobs):
        raise AssertionError(f"a stage ran: {jobs[:1]}")

    ingest = exact = tokenize = shards = _fail


def test_published_files_are_the_same_and_work_keeps_only_markers(ref, cleaned):
    out, report = cleaned
    assert published(out) == published(ref)
    want = bulk_in(ref)
    assert any(n.endswith(".npy") for n in want) and any(n.startswith("tok") for n in want)
    assert report["clean_work"] == {"files_removed": len(want), "bytes_freed": sum(want.values())}
    got = report_without_timings(out)
    assert got.pop("clean_work") == report["clean_work"] and got == report_without_timings(ref)
    assert bulk_in(out) == {}
    for sub in ("ingest", "tok", "shards"):   # the markers stay
        names = sorted(n for n in os.listdir(os.path.join(ref, "work", sub)) if n.endswith(".json"))
        assert names and sorted(os.listdir(os.path.join(out, "work", sub))) == names
    record = json.load(open(os.path.join(out, "work", "clean.json")))
    assert record["state"] == "done" and record["bytes_freed"] == sum(want.values())
    lines = summary(report, out).splitlines()
    assert lines[-2].startswith(f"wrote {out}/index.json")
    assert lines[-1].startswith(f"cleaned {out}/work: removed {len(want)} files, freed ")
    assert lines[-1].endswith(f" ({sum(want.values()):,} bytes)")


def test_rerun_on_a_cleaned_out_changes_nothing(cleaned, tmp_path, capsys):
    out = copy(cleaned[0], tmp_path)
    before = tree(out)
    for extra in ([], ["--clean-work"]):
        rc = main(["--manifest", SAMPLE, "--out", out, "--executor", "local", "--no-progress", *extra])
        msg = capsys.readouterr().out
        assert rc == 0 and "work/ was cleaned" in msg and "--force" in msg, msg
    assert run(out, executor=NoWork())["rerun"] == "cleaned"
    assert tree(out) == before


def test_a_cleaned_out_whose_shard_was_lost_is_refused_not_rebuilt(cleaned, tmp_path, capsys):
    out = copy(cleaned[0], tmp_path)
    os.remove(os.path.join(out, "shards", "00001.arrow"))
    before = tree(out)
    with pytest.raises(BuildError, match=r"was cleaned .* shards/00001.arrow is missing.*--force"):
        run(out, executor=NoWork())
    assert main(["--manifest", SAMPLE, "--out", out, "--executor", "local", "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert tree(out) == before


def test_other_settings_are_refused_and_force_rebuilds(ref, cleaned, tmp_path):
    out = copy(cleaned[0], tmp_path)
    before = tree(out)
    with pytest.raises(BuildError, match="different settings"):
        run(out, near=False)
    assert tree(out) == before
    report = run(out, near=False, force=True)   # other settings: discarded and rebuilt, not cleaned
    assert report["duplicates"]["near"] == 0 and "clean_work" not in report
    assert bulk_in(out) and not os.path.exists(os.path.join(out, "work", "clean.json"))
    out = copy(cleaned[0], tmp_path / "same")
    report = run(out, force=True)   # its own settings on a cleaned --out: --force rebuilds
    assert "rerun" not in report and "clean_work" not in report
    assert published(out) == published(ref) and bulk_in(out) == bulk_in(ref)
    assert not os.path.exists(os.path.join(out, "work", "clean.json"))


def test_clean_work_on_a_complete_out_cleans_without_rebuilding(ref, tmp_path):
    out = copy(ref, tmp_path)
    want = bulk_in(out)
    files, report = tree(out), report_without_timings(out)
    got = run(out, executor=NoWork(), clean_work=True)
    assert got["rerun"] == "cleaned now"
    assert got["clean_work"] == {"files_removed": len(want), "bytes_freed": sum(want.values())}
    assert bulk_in(out) == {}
    after = tree(out)
    for rel in ["index.json", "duplicates.jsonl", "quarantine.jsonl"] + [f"shards/{n}" for n in os.listdir(
            os.path.join(out, "shards"))]:
        assert after[rel] == files[rel], rel
    assert {k: v for k, v in report_without_timings(out).items() if k != "clean_work"} == report


def test_published_files_without_their_work_are_not_taken_for_complete(ref, tmp_path):
    """A review found --clean-work taking published files whose work/ was deleted by hand for a complete build
    of *other* settings (it then said "nothing to do" on every later run). Without the markers of this build it
    builds, and cleans at the end."""
    out = copy(ref, tmp_path)
    shutil.rmtree(os.path.join(out, "work"))
    got = run(out, near=False, clean_work=True)
    fresh = run(str(tmp_path / "fresh"), near=False)
    assert "rerun" not in got and got["totals"] == fresh["totals"] and got["duplicates"]["near"] == 0
    assert published(out) == published(str(tmp_path / "fresh")) and bulk_in(out) == {}


def test_damaged_records_of_a_cleaned_out_are_clear_errors_and_force_rebuilds(ref, cleaned, tmp_path):
    """A cleaned --out whose clean.json is unreadable, whose report.json is gone during an interrupted cleaning,
    or whose index changed: a BuildError naming --force (no traceback, nothing written); --force rebuilds."""
    damage = {"clean.json": lambda out: open(os.path.join(out, "work", "clean.json"), "w").close(),
              "report.json": lambda out: (os.remove(os.path.join(out, "report.json")), _set_state(out, "cleaning")),
              "index.json": lambda out: open(os.path.join(out, "index.json"), "a").write("\n")}
    for name, hurt in damage.items():
        out = copy(cleaned[0], tmp_path / name)
        hurt(out)
        before = tree(out)
        with pytest.raises(BuildError, match=r"--force"):
            run(out, executor=NoWork())
        assert tree(out) == before, name
        run(out, force=True)
        assert published(out) == published(ref), name


def _set_state(out: str, state: str) -> None:
    path = os.path.join(out, "work", "clean.json")
    record = json.load(open(path))
    json.dump({**record, "state": state}, open(path, "w"))


def test_an_incomplete_out_is_finished_before_it_is_cleaned(ref, tmp_path):
    out = copy(ref, tmp_path)
    os.remove(os.path.join(out, "shards", "00001.arrow"))
    os.remove(os.path.join(out, "work", "tok", "c0000_f00001.json"))
    report = run(out, clean_work=True)
    assert "rerun" not in report and report["clean_work"]["files_removed"] == len(bulk_in(ref))
    assert published(out) == published(ref) and bulk_in(out) == {}


def test_a_build_interrupted_before_it_completes_removes_nothing(ref, tmp_path):
    class DiesWritingShards(LocalExecutor):
        def shards(self, jobs):
            yield from super().shards(jobs[:1])
            raise KeyboardInterrupt

    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        run(out, executor=DiesWritingShards(), clean_work=True)
    assert bulk_in(out) == bulk_in(ref)
    assert not os.path.exists(os.path.join(out, "work", "clean.json")) and not os.path.exists(
        os.path.join(out, "index.json"))
    run(out, clean_work=True)
    assert published(out) == published(ref) and bulk_in(out) == {}


def test_an_interrupted_cleaning_is_finished_by_a_rerun(ref, tmp_path, monkeypatch):
    out = copy(ref, tmp_path)
    want = bulk_in(out)
    pub, report = published(out), open(os.path.join(out, "report.json"), "rb").read()
    removed = []
    real_remove = os.remove

    def dies_after_five(path):   # the sixth removal of a bulk file is never done
        if BULK.search(path):
            if len(removed) == 5:
                raise KeyboardInterrupt
            removed.append(path)
        real_remove(path)

    with monkeypatch.context() as m:
        m.setattr(build_mod.os, "remove", dies_after_five)
        with pytest.raises(KeyboardInterrupt):
            run(out, clean_work=True)
    assert len(bulk_in(out)) == len(want) - 5
    assert json.load(open(os.path.join(out, "work", "clean.json")))["state"] == "cleaning"
    assert published(out) == pub and open(os.path.join(out, "report.json"), "rb").read() == report
    got = run(out, executor=NoWork())   # no --clean-work: the cleaning was asked for and is finished
    assert got["rerun"] == "finished cleaning"
    assert got["clean_work"] == {"files_removed": len(want), "bytes_freed": sum(want.values())}
    assert bulk_in(out) == {} and published(out) == pub
    assert json.load(open(os.path.join(out, "work", "clean.json")))["state"] == "done"


def test_the_trainer_reads_the_cleaned_corpus(ref, cleaned):
    from trainer.data import ShardCorpus

    a, b = ShardCorpus(ref, 16, verify_checksums=True), ShardCorpus(cleaned[0], 16, verify_checksums=True)
    assert a.order_fingerprint == b.order_fingerprint and list(a.components) == list(b.components)
    for name, c in b.components.items():
        assert c.n_windows == a.components[name].n_windows > 0
        items = [(name, p) for p in range(c.n_windows)]
        wa, wb = a.read_windows(items).numpy(), b.read_windows(items).numpy()
        assert np.array_equal(wa, wb)
