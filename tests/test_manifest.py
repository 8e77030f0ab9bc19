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


def _comp_body(extra: str, top: str = "") -> str:
    return f"name: t\n{top}components:\n  - name: c1\n    paths: [d/a.jsonl]\n{extra}"


@pytest.mark.parametrize("body, needle, line", [
    ("name: t\ncomponents:\n  - name: c1\n    paths: [d/a.jsonl, d/b.jsonl.gz]\n",
     "paths imply different formats", 4),
    (_comp_body("    weight: .nan\n"), "'weight' must be a finite number > 0", 5),
    (_comp_body("    weight: .inf\n"), "'weight' must be a finite number > 0", 5),
    (_comp_body("    weight: 0\n"), "'weight' must be a finite number > 0", 5),
    (_comp_body("    weight: -1.5\n"), "'weight' must be a finite number > 0", 5),
    (_comp_body("", "shard_tokens: 0\n"), "'shard_tokens' must be in 1..2", 2),
    (_comp_body("", "shard_tokens: -5\n"), "'shard_tokens' must be in 1..2", 2),
    (_comp_body("", "shard_tokens: 2147483648\n"), "'shard_tokens' must be in 1..2", 2),
    (_comp_body("    filters:\n      min_chars: -3\n"), "'filters.min_chars' must be >= 0", 6),
    (_comp_body("    filters:\n      max_doc_bytes: 0\n"), "'filters.max_doc_bytes' must be >= 1", 6),
    (_comp_body("    filters:\n      max_dup_line_frac: -1\n"), "'filters.max_dup_line_frac' must be within", 6),
    (_comp_body("    filters:\n      max_dup_line_frac: 1.5\n"), "'filters.max_dup_line_frac' must be within", 6),
    (_comp_body("    filters:\n      max_dup_line_frac: .nan\n"), "'filters.max_dup_line_frac' must be within", 6),
    ("name: t\ndefaults:\n  filters:\n    max_doc_bytes: -1\ncomponents:\n  - name: c1\n    paths: [d/a.jsonl]\n",
     "'filters.max_doc_bytes' must be >= 1", 4),
])
def test_mixed_formats_and_out_of_range_values_are_errors(tmp_path, body, needle, line):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.jsonl.gz").write_bytes(b"")
    p = _write(tmp_path, body)
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    assert needle in str(e.value) and f"{p}:{line}" in str(e.value), str(e.value)


def test_edge_values_in_range_are_accepted(tmp_path):
    p = _write(tmp_path, _comp_body("    weight: 0.01\n    filters:\n      min_chars: 0\n"
                                    "      max_dup_line_frac: 1\n      max_doc_bytes: 1\n", "shard_tokens: 1\n"))
    m = load_manifest(p)
    assert m.shard_tokens == 1 and m.components[0].weight == 0.01
    assert m.components[0].filters.max_dup_line_frac == 1 and m.components[0].filters.min_chars == 0


def test_same_format_paths_and_explicit_format_still_load(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "y"}\n')
    p = _write(tmp_path, "name: t\ncomponents:\n  - name: c1\n    paths: [d/a.jsonl, d/b.jsonl]\n")
    assert load_manifest(p).components[0].format == "jsonl"
    (tmp_path / "d" / "c.txt").write_text("x")
    p = _write(tmp_path, "name: t\ncomponents:\n  - name: c1\n    paths: [d/a.jsonl, d/c.txt]\n"
                         "    format: jsonl\n")
    assert len(load_manifest(p).components[0].files) == 2


def test_hf_disk_folder_without_a_dataset_is_an_error_naming_the_splits(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["one document", "another document"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "nothing").mkdir()
    body = "name: t\ncomponents:\n  - name: chat\n    format: hf_disk\n    paths: [{}]\n"
    p = tmp_path / "m.yaml"
    p.write_text(body.format("dd"))
    with pytest.raises(ManifestError) as e:
        load_manifest(str(p))
    msg = str(e.value)
    assert f"{p}:5" in msg and "component 'chat'" in msg and "DatasetDict" in msg
    assert "point at dd/train" in msg and "point at dd/test" in msg
    p.write_text(body.format("nothing"))
    with pytest.raises(ManifestError, match="no state.json and no"):
        load_manifest(str(p))
    p.write_text(body.format("dd/train"))
    assert len(load_manifest(str(p)).components[0].files) == 1


def test_url_root_with_relative_paths_resolves(tmp_path):
    (tmp_path / "d").mkdir()
    for n in ("a", "b"):
        (tmp_path / "d" / f"{n}.jsonl").write_text('{"text": "x"}\n')
    p = tmp_path / "m.yaml"
    p.write_text(f"name: t\nroot: file://{tmp_path}/\ncomponents:\n  - name: c\n    paths: [d/a.jsonl, 'd/*.jsonl']\n")
    m = load_manifest(str(p))
    assert m.components[0].files == [f"file://{tmp_path}/d/a.jsonl", f"file://{tmp_path}/d/b.jsonl"]
    p.write_text(f"name: t\nroot: file://{tmp_path}\ncomponents:\n  - name: c\n    paths: ['d/b*.jsonl']\n")
    assert load_manifest(str(p)).components[0].files == [f"file://{tmp_path}/d/b.jsonl"]


def _two_components(tmp_path, first: str, second: str) -> str:
    p = tmp_path / "m.yaml"
    p.write_text(f"name: t\nexact_dedup: false\ncomponents:\n  - name: web\n    paths: [{first}]\n"
                 f"  - name: web_mirror\n    paths: [{second}]\n")
    return str(p)


@pytest.mark.parametrize("second", ["'d/*.jsonl'", "d/link.jsonl", "'file://{tmp}/d//a.jsonl'",
                                    "'file://{tmp}/d/./link.jsonl'"])
def test_a_file_in_two_components_is_an_error_naming_both(tmp_path, second):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "x"}\n')
    os.symlink("a.jsonl", tmp_path / "d" / "link.jsonl")
    p = _two_components(tmp_path, "d/a.jsonl", second.format(tmp=tmp_path))
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    msg = str(e.value)
    assert f"{p}:7: component 'web_mirror'" in msg and f"component 'web' ({p}:5, path 'd/a.jsonl'" in msg, msg
    assert "a.jsonl" in msg and "belongs to both" in msg


def test_components_with_distinct_files_and_aliases_within_one_component_load(tmp_path):
    (tmp_path / "d").mkdir()
    for n in ("a", "b"):
        (tmp_path / "d" / f"{n}.jsonl").write_text('{"text": "x"}\n')
    os.symlink("a.jsonl", tmp_path / "d" / "link.jsonl")
    m = load_manifest(_two_components(tmp_path, "d/a.jsonl", "d/b.jsonl"))
    assert [c.files for c in m.components] == [[str(tmp_path / "d" / "a.jsonl")], [str(tmp_path / "d" / "b.jsonl")]]
    # one file reached twice within a component (a symlink and its target) is read once
    m = load_manifest(_two_components(tmp_path, "'d/[al]*.jsonl'", "d/b.jsonl"))
    assert m.components[0].files == [str(tmp_path / "d" / "a.jsonl")]


def _hf_dataset(tmp_path) -> tuple[str, str]:
    import datasets

    folder = tmp_path / "chat"
    datasets.Dataset.from_dict({"text": ["one document", "another document"]}).save_to_disk(str(folder))
    p = tmp_path / "m.yaml"
    p.write_text("name: t\ncomponents:\n  - name: chat\n    format: hf_disk\n    paths: [chat]\n")
    return str(p), str(folder)


@pytest.mark.parametrize("state, needle", [
    ('{"_data_files": [', "is not valid JSON"),
    ('{"_fingerprint": "x"}', "has no '_data_files' list"),
    ('{"_data_files": {"filename": "a.arrow"}}', "has no '_data_files' list"),
    ('[1, 2]', "has no '_data_files' list"),
    ('{"_data_files": [{"name": "a.arrow"}]}', "'filename'"),
])
def test_hf_disk_corrupt_state_json_is_an_error_naming_it(tmp_path, state, needle):
    p, folder = _hf_dataset(tmp_path)
    with open(os.path.join(folder, "state.json"), "w") as f:
        f.write(state)
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    msg = str(e.value)
    assert needle in msg and f"{p}:5: component 'chat'" in msg and os.path.join(folder, "state.json") in msg, msg


def test_hf_disk_missing_arrow_file_is_an_error_naming_it(tmp_path):
    p, folder = _hf_dataset(tmp_path)
    assert len(load_manifest(p).components[0].files) == 1
    arrow = next(n for n in os.listdir(folder) if n.endswith(".arrow"))
    os.rename(os.path.join(folder, arrow), os.path.join(folder, "moved.bin"))
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    msg = str(e.value)
    assert f"{p}:5: component 'chat'" in msg and os.path.join(folder, arrow) in msg and "missing" in msg, msg
    r = subprocess.run([sys.executable, os.path.join(REPO, "pipeline", "build.py"), "--manifest", p,
                        "--root", str(tmp_path), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and arrow in r.stderr, r.stderr


def test_a_literal_file_name_with_glob_characters_is_read_as_is(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "vol[1].txt").write_text("volume one")
    (tmp_path / "d" / "notes[draft.txt").write_text("draft")
    p = tmp_path / "m.yaml"
    body = "name: t\ncomponents:\n  - name: books\n    paths: ['{}']\n"
    p.write_text(body.format("d/vol[1].txt"))
    assert load_manifest(str(p)).components[0].files == [str(tmp_path / "d" / "vol[1].txt")]
    (tmp_path / "d" / "vol1.txt").write_text("a file nobody listed")
    assert load_manifest(str(p)).components[0].files == [str(tmp_path / "d" / "vol[1].txt")]
    p.write_text(body.format("d/notes[draft.txt"))
    assert load_manifest(str(p)).components[0].files == [str(tmp_path / "d" / "notes[draft.txt")]
    # without a file of that literal name the pattern is still a glob
    p.write_text(body.format("d/vol[12].txt"))
    assert load_manifest(str(p)).components[0].files == [str(tmp_path / "d" / "vol1.txt")]
    p.write_text(body.format(f"file://{tmp_path}/d/vol[1].txt"))
    assert load_manifest(str(p)).components[0].files == [f"file://{tmp_path}/d/vol[1].txt"]


def test_a_file_name_that_is_not_utf8_is_an_error_naming_it(tmp_path):
    """A Latin-1 file name matched by a glob crashed the build later (UnicodeEncodeError writing the resume
    fingerprint) without naming the file; the manifest now refuses it, naming the file by its bytes."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ok.jsonl").write_text('{"text": "fine"}\n')
    with open(os.path.join(os.fsencode(tmp_path), b"d", b"caf\xe9.jsonl"), "w") as f:
        f.write('{"text": "fine too"}\n')
    p = _write(tmp_path, "name: t\ncomponents:\n  - name: c1\n    paths: ['d/*.jsonl']\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    msg = str(e.value)
    assert f"{p}:4: component 'c1'" in msg and "not UTF-8" in msg and "caf\\xe9.jsonl" in msg, msg
    msg.encode("utf-8")  # the message itself can be printed


def test_recursive_glob_as_the_leading_segment_is_accepted(tmp_path):
    """'**/*.jsonl' was refused as a bad glob (the '**' check also fired at the pattern's start) while
    'x/**/*.jsonl' worked; '**' inside a segment is still refused."""
    (tmp_path / "d" / "x" / "y").mkdir(parents=True)
    (tmp_path / "d" / "x" / "y" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "x"}\n')
    want = [str(tmp_path / "d" / "b.jsonl"), str(tmp_path / "d" / "x" / "y" / "a.jsonl")]
    p = tmp_path / "m.yaml"
    for pat, files in [("**/*.jsonl", want), ("**", want), ("x/**/*.jsonl", want[1:]), ("./**/*.jsonl", want)]:
        p.write_text(f"name: t\nroot: d\ncomponents:\n  - name: c1\n    paths: ['{pat}']\n    format: jsonl\n")
        assert load_manifest(str(p)).components[0].files == files, pat
    for pat in ["a**/*.jsonl", "***/*.jsonl", "**a/*.jsonl", "x/**.jsonl"]:
        p.write_text(f"name: t\nroot: d\ncomponents:\n  - name: c1\n    paths: ['{pat}']\n    format: jsonl\n")
        with pytest.raises(ManifestError, match="bad glob"):
            load_manifest(str(p))


@pytest.mark.parametrize("extra, top, needle, line", [
    ("    weight: 1" + "0" * 400 + "\n", "", "'weight' must be a finite number > 0, got 1000", 5),
    ("    filters:\n      max_doc_bytes: 100000000000000\n", "", "'filters.max_doc_bytes' must be at most 2**30", 6),
    ("    filters:\n      max_doc_bytes: 9223372036854775808\n", "", "'filters.max_doc_bytes' must be at most", 6),
    ("    filters:\n      max_doc_bytes: 1073741825\n", "", "'filters.max_doc_bytes' must be at most", 6),
    ("    filters:\n      max_dup_line_frac: 1" + "0" * 400 + "\n", "", "'filters.max_dup_line_frac' must be within", 6),
    ("", "near_dedup:\n  threshold: 1" + "0" * 400 + "\n", "near_dedup: threshold", 2),
    ("", "near_dedup:\n  num_perm: 1" + "0" * 400 + "\n", "near_dedup: num_perm must be in [2, 4096]", 2),  # hung
])
def test_numbers_too_large_to_use_are_manifest_errors(tmp_path, extra, top, needle, line):
    """A YAML int too large for a float (weight 1 followed by 400 zeros) raised a bare OverflowError, and
    filters.max_doc_bytes of 1e14 or 2**63 passed, then made every txt file unreadable (MemoryError,
    OverflowError). Both are ManifestErrors naming the field; max_doc_bytes is at most 2**30."""
    p = _write(tmp_path, _comp_body(extra, top))
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    assert needle in str(e.value) and f"{p}:{line}" in str(e.value), str(e.value)
    assert len(str(e.value)) < 300


def test_max_doc_bytes_at_its_bound_is_accepted(tmp_path):
    from pipeline.manifest import MAX_DOC_BYTES

    p = _write(tmp_path, _comp_body(f"    filters:\n      max_doc_bytes: {MAX_DOC_BYTES}\n"))
    assert load_manifest(p).components[0].filters.max_doc_bytes == 2**30


def test_hf_disk_units_are_counted_by_arrow_file(tmp_path, monkeypatch):
    """The files-per-component limit counted hf_disk folders, while document keys number the Arrow files
    inside them (key = component << 48 | file << 32 | line): more than 65535 Arrow files collided with the
    next component's keys. The limit (lowered here) counts Arrow files, in the manifest and in units_for."""
    import json

    import pyarrow as pa

    from pipeline import manifest, read

    t = pa.table({"text": ["a document"]})
    for folder, n in (("one", 3), ("two", 2)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            with pa.OSFile(str(tmp_path / folder / f"data-{i}.arrow"), "wb") as s, pa.ipc.new_stream(s, t.schema) as w:
                w.write_table(t)
    (tmp_path / "two" / "state.json").write_text(json.dumps({"_data_files": [{"filename": f"data-{i}.arrow"}
                                                                            for i in range(2)]}))
    p = tmp_path / "m.yaml"
    p.write_text("name: t\ncomponents:\n  - {name: h, paths: [one, two], format: hf_disk}\n")
    monkeypatch.setattr(manifest, "MAX_UNITS", 6)
    m = load_manifest(str(p))
    assert len(read.units_for(0, m.components[0], m.root)) == 5
    monkeypatch.setattr(manifest, "MAX_UNITS", 5)
    with pytest.raises(ManifestError, match=r"m.yaml:3: component 'h': at most 4 files .* got 5 Arrow files"):
        load_manifest(str(p))
    monkeypatch.setattr(read, "MAX_UNITS", 5)  # what the manifest could not count (URLs) fails at units_for
    with pytest.raises(ManifestError, match="component 'h': at most 4 files"):
        read.units_for(0, m.components[0], m.root)


@pytest.mark.parametrize("name", ["x/y", "x\\\\y", "a\\tb", "/"])
def test_a_component_name_with_a_separator_is_an_error(tmp_path, name):
    """Document ids are component/file:line: component 'x' with file 'y/z.jsonl' and component 'x/y' with
    'z.jsonl' both gave 'x/y/z.jsonl:1'. A name holding '/', '\\\\' or a control character is refused."""
    (tmp_path / "d" / "y").mkdir(parents=True)
    (tmp_path / "d" / "y" / "z.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "d" / "z.jsonl").write_text('{"text": "x"}\n')
    p = tmp_path / "m.yaml"
    p.write_text(f'name: t\nroot: d\ncomponents:\n  - name: x\n    paths: [y/z.jsonl]\n  - name: "{name}"\n'
                 f'    paths: [z.jsonl]\n')
    with pytest.raises(ManifestError, match=r"m.yaml:6: component name .* must not contain '/'"):
        load_manifest(str(p))
    p.write_text(p.read_text().replace(f'"{name}"', "x.y-z_1"))
    assert [c.name for c in load_manifest(str(p)).components] == ["x", "x.y-z_1"]


def test_a_format_the_paths_do_not_tell_is_named(tmp_path):
    """paths: ['*.json'] without 'format' said "'format' must be one of ..., got None"."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.json").write_text('{"text": "a"}\n')
    p = tmp_path / "m.yaml"
    p.write_text("name: t\nroot: d\ncomponents:\n  - name: c1\n    paths: ['*.json']\n")
    with pytest.raises(ManifestError, match=r"m.yaml:5.*cannot tell the format from '\*.json'.*set 'format'"):
        load_manifest(str(p))


def test_hf_disk_url_is_an_error_naming_the_line(tmp_path):
    """An hf_disk component given as a URL passed the manifest check, then crashed the build in os.listdir;
    the reader memory-maps Arrow files, so it takes local folders only and says so at the manifest line."""
    import datasets

    datasets.Dataset.from_dict({"text": ["one document"]}).save_to_disk(str(tmp_path / "ds"))
    p = tmp_path / "m.yaml"
    p.write_text(f"name: t\ncomponents:\n  - name: chat\n    format: hf_disk\n    paths: [{(tmp_path / 'ds').as_uri()}]\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(str(p))
    assert f"{p}:5" in str(e.value) and "hf_disk reads a local folder" in str(e.value)
    p.write_text("name: t\ncomponents:\n  - name: chat\n    format: hf_disk\n    paths: [memory://nowhere/ds]\n")
    with pytest.raises(ManifestError, match="hf_disk reads a local folder|matches no dataset folder"):
        load_manifest(str(p))


@pytest.mark.parametrize("top, comp, needle, line", [
    ("near_dedup:\n  num_perm: 128.5\n", "", "'near_dedup.num_perm' must be int, got 128.5", 3),
    ("near_dedup:\n  seed: 1.5\n", "", "'near_dedup.seed' must be int", 3),
    ("near_dedup:\n  bands: 2.0\n  rows: 3\n", "", "'near_dedup.bands' must be int/NoneType", 3),
    ("near_dedup:\n  verify: 'no'\n", "", "'near_dedup.verify' must be bool, got 'no'", 3),
    ("near_dedup:\n  shingle_size: true\n", "", "'near_dedup.shingle_size' must be int, got True", 3),
    ("near_dedup:\n  seed: -1\n", "", "near_dedup: seed must be >= 0, got -1", 2),
    ("", "    language: [en, 5]\n", "'language' must be a string or a list of strings", 5),
    ("", "    language: [en, 2024-01-01]\n", "'language' must be a string or a list of strings", 5),
    ("description: [a, b]\n", "", "'description' must be str/NoneType", 2),
    ("total_tokens: lots\n", "", "'total_tokens' must be int/NoneType", 2),
    ("", "    filters: {min_chars: 10, max_chars: 5}\n", "'filters.min_chars' (10) is above 'filters.max_chars' (5)", 5),
    ("defaults:\n  filters: {min_chars: 20}\n", "    filters:\n      max_chars: 10\n",
     "'filters.min_chars' (20) is above 'filters.max_chars' (10)", 7),
])
def test_values_of_the_wrong_type_are_errors_before_the_build(tmp_path, top, comp, needle, line):
    """Typed validation of near_dedup settings, language lists and the top-level metadata: these were accepted and
    then crashed the build half way (num_perm 128.5, seed 1.5, bands 2.0: a bare TypeError in the ingest; a date
    in a language list: when index.json was written, after every stage; an int: in --dry-run), or silently meant
    something else (verify: 'no' turned verification on); so is a min_chars above max_chars (defaults included),
    which silently dropped every document."""
    body = "name: t\n" + top + "components:\n  - name: c1\n    paths: [d/a.jsonl]\n" + comp
    p = _write(tmp_path, body)
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    assert needle in str(e.value) and f"{p}:{line}" in str(e.value), str(e.value)


def test_every_near_dedup_setting_has_a_yaml_type_and_good_values_load(tmp_path):
    import dataclasses

    from pipeline.dedup import MinHashConfig
    from pipeline.manifest import _ANNOTATION_TYPES

    for f in dataclasses.fields(MinHashConfig):
        assert all(name in _ANNOTATION_TYPES for name in str(f.type).split(" | ")), f
    p = _write(tmp_path, "name: t\nnear_dedup:\n  num_perm: 64\n  threshold: 1\n  fp_weight: 1\n  bands: null\n"
                         "  rows: null\n  verify: false\n  mode: local\ncomponents:\n  - name: c1\n"
                         "    paths: [d/a.jsonl]\n    language: [en, de]\n")
    m = load_manifest(p)
    assert m.near_dedup.params["num_perm"] == 64 and m.near_dedup.params["verify"] is False
    assert m.components[0].language == ["en", "de"]


def test_a_relative_root_on_the_command_line_is_relative_to_the_working_directory(tmp_path, monkeypatch, capsys):
    """``--root raw`` resolved against the manifest's folder (corpus_manifests/raw): world_v3's dry run listed all
    68 components as missing for a download in ./raw. A root written in the manifest stays relative to it."""
    from pipeline.build import main

    (tmp_path / "raw" / "ted2020").mkdir(parents=True)
    (tmp_path / "raw" / "ted2020" / "a.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.chdir(tmp_path)
    assert main(["--manifest", WORLD, "--root", "raw", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"root {tmp_path / 'raw'}\n" in out and "1 present" in out


def test_dry_run_into_a_reader_that_went_away_ends_quietly():
    """`build.py --manifest world_v3.yaml --dry-run | head`: the closed pipe was a BrokenPipeError traceback; it now
    ends with 141, as a writer killed by SIGPIPE, and says nothing."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "pipeline", "build.py"), "--manifest", WORLD,
                             "--dry-run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b"", err.decode()[-2000:]


@pytest.mark.parametrize("fmt", ["jsonl", "hf_disk"])
def test_glob_characters_in_the_root_match_only_themselves(tmp_path, fmt):
    """A root folder named ``corpus[v2]`` was part of the glob: ``*.jsonl`` under it read ``corpusv/`` (or
    ``corpus2/``) instead, a different folder, without any error."""
    import datasets

    for folder, text in (("corpus[v2]", "the real document"), ("corpusv", "a decoy document")):
        (tmp_path / folder).mkdir()
        if fmt == "jsonl":
            (tmp_path / folder / "a.jsonl").write_text(f'{{"text": "{text}"}}\n')
        else:
            datasets.Dataset.from_dict({"text": [text]}).save_to_disk(str(tmp_path / folder / "ds"))
    (tmp_path / "m.yaml").write_text(f"name: t\nroot: 'corpus[v2]'\ncomponents:\n  - name: c1\n    format: {fmt}\n"
                                     f"    paths: ['{'*.jsonl' if fmt == 'jsonl' else 'd*'}']\n")
    files = load_manifest(str(tmp_path / "m.yaml")).components[0].files
    assert files == [str(tmp_path / "corpus[v2]" / ("a.jsonl" if fmt == "jsonl" else "ds"))]
