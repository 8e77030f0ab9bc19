"""Manifest schema: the shipped manifests load; every kind of mistake names file, component, line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.manifest import FORMATS, ManifestError, load_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "corpus_manifests", "sample.yaml")
WORLD = os.path.join(REPO, "corpus_manifests", "world_v3.yaml")


def test_sample_manifest_loads_and_resolves_every_format():
    m = load_manifest(SAMPLE)
    assert m.name == "sample"
    assert {c.format for c in m.components} == set(FORMATS)
    for c in m.components:
        assert c.files, c.name
        assert all(os.path.exists(f) for f in c.files)
    forum = next(c for c in m.components if c.name == "forum")
    assert forum.filters.max_doc_bytes == 16384
    assert forum.filters.min_chars == 20  # from defaults
    assert m.near_dedup.enabled and m.near_dedup.threshold == 0.8


def test_world_v3_lists_the_public_components():
    m = load_manifest(WORLD, allow_missing=True)
    names = [c.name for c in m.components]
    for expect in ("wikipedia", "slimpajama", "pes2o", "bigpatent", "pile_of_law", "starcoder", "oscar_2301",
                   "ted2020", "philpapers", "nih_exporter", "europarl", "enron_emails", "ubuntu_irc",
                   "hackernews", "openwebtext2", "gutenberg_pg19", "books3", "fineweb_edu", "dclm_baseline"):
        assert expect in names
    assert len(names) >= 50
    assert all(c.source and c.category for c in m.components)
    slim = next(c for c in m.components if c.name == "slimpajama")
    assert slim.published_tokens == 627_000_000_000


def test_world_v3_dry_run_reports_present_and_missing(tmp_path):
    (tmp_path / "ted2020").mkdir()
    (tmp_path / "ted2020" / "a.jsonl").write_text('{"text": "hello"}\n')
    r = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "build.py"), "--manifest", WORLD,
                        "--root", str(tmp_path), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("ted2020"))
    assert " 1 " in line and "-" in line
    assert "slimpajama/**/*.jsonl.zst" in r.stdout  # reported missing
    assert "1 present" in r.stdout


def _write(tmp_path, body: str) -> str:
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "x"}\n')
    p = tmp_path / "m.yaml"
    p.write_text(textwrap.dedent(body))
    return str(p)


@pytest.mark.parametrize("body, needle, line", [
    ("""\
     name: t
     components:
       - name: c1
         paths: [d/a.jsonl]
         formt: jsonl
     """, "unknown key 'formt'", 5),
    ("""\
     name: t
     components:
       - name: c1
         paths: [d/a.jsonl]
       - name: c2
         paths: [d/missing-*.jsonl]
     """, "matches no file", 6),
    ("""\
     name: t
     components:
       - name: c1
         paths: ["d/[a.jsonl"]
     """, "bad glob", 4),
    ("""\
     name: t
     components:
       - name: c1
         paths: [d/a.jsonl]
         format: csv
     """, "'format' must be one of", 5),
    ("""\
     name: t
     components:
       - name: c1
         paths: [d/a.jsonl]
         weight: lots
     """, "'weight' must be", 5),
    ("""\
     name: t
     components:
       - name: c1
         paths: [d/a.jsonl]
         filters:
           min_char: 3
     """, "unknown key 'min_char' in filters", 6),
    ("""\
     name: t
     colour: blue
     components:
       - name: c1
         paths: [d/a.jsonl]
     """, "unknown key 'colour'", 2),
    ("""\
     name: t
     components:
       - name: c1
         paths: [d/a.jsonl]
       - name: c1
         paths: [d/a.jsonl]
     """, "duplicate component name", 5),
    ("""\
     name: t
     near_dedup:
       threshold: 1.5
     components:
       - name: c1
         paths: [d/a.jsonl]
     """, "near_dedup: threshold", 2),
])
def test_errors_name_component_and_line(tmp_path, body, needle, line):
    p = _write(tmp_path, body)
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    msg = str(e.value)
    assert needle in msg
    assert f"{p}:{line}" in msg
    component = COMPONENT_OF.get(needle)
    if component:
        assert f"component '{component}'" in msg


# the component each error above is about (the others concern the manifest's top level)
COMPONENT_OF = {"unknown key 'formt'": "c1", "matches no file": "c2", "bad glob": "c1",
                "'format' must be one of": "c1", "'weight' must be": "c1",
                "unknown key 'min_char' in filters": "c1", "duplicate component name": "c1"}


def test_cli_wrong_manifest_exits_nonzero_with_one_message(tmp_path):
    p = _write(tmp_path, """\
        name: t
        components:
          - name: c1
            paths: [d/nothing.jsonl]
        """)
    r = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "build.py"), "--manifest", p,
                        "--out", str(tmp_path / "o"), "--executor", "local"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "error:" in r.stderr and "component 'c1'" in r.stderr


def test_cli_unwritable_out_exits_nonzero(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "build.py"), "--manifest", SAMPLE,
                        "--out", str(blocker / "sub"), "--executor", "local"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "cannot write to --out" in r.stderr
