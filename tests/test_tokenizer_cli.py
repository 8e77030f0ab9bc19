"""`python -m tokenizer encode|decode` round trip through real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenizer", *args], input=data, capture_output=True, cwd=ROOT, timeout=120
    )


def test_cli_encode_decode_round_trip():
    text = "\n\nUser: 你好 Hello world\t\xff".encode() + b"\xc3(raw)"
    enc = run(["encode"], text)
    assert enc.returncode == 0, enc.stderr
    ids = [int(w) for w in enc.stdout.split()]
    assert ids[:6] == [261, 24281, 59, 33, 10464, 11685]
    dec = run(["decode"], enc.stdout)
    assert dec.returncode == 0, dec.stderr
    assert dec.stdout == text


def test_cli_decode_bad_id():
    dec = run(["decode"], b"33155 99999\n")
    assert dec.returncode == 2
    assert b"99999" in dec.stderr and b"out of range" in dec.stderr


@pytest.mark.slow
def test_cli_bench_writes_json(tmp_path):
    out = tmp_path / "tok.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tokenizer", "bench", "--mb", "1", "--repeats", "1", "--out", str(out)],
        capture_output=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = json.loads(out.read_text())
    assert result["components"]["all"]["same_ids_as_rust"]
    assert result["reference"]["same_ids_as_ours"]
    assert result["encode_batch_wall"]["same_ids_as_rust"]
    assert b"x Rust" in proc.stdout


def test_benchmark_corpus_is_real_and_large_enough():
    from tokenizer.benchmark import assemble_corpus

    comps = assemble_corpus(10_000_000)
    sizes = {name: sum(len(d.encode("utf-8")) for d in docs) for name, docs in comps.items()}
    assert sum(sizes.values()) >= 10_000_000
    assert all(sizes.values()), sizes
    sample = "".join(comps["multilingual_sample_lines"])
    for word in ("Съешь", "天气", "날씨", "השמש", "आज", "วันนี้", "👨‍👩‍👧‍👦"):
        assert word in sample


@pytest.mark.parametrize("args, needle", [(["--mb", "0"], "--mb"), (["--mb", "-1"], "--mb"),
                                          (["--mb", "0.05", "--repeats", "0"], "--repeats")])
def test_cli_bench_bad_numbers_are_usage_errors(args, needle, capsys):
    """--mb 0 or --repeats 0 used to end in a ZeroDivisionError traceback."""
    from tokenizer.benchmark import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("cmd, data", [("encode", b"Hello world, " * 50_000),
                                       ("decode", b" ".join(b"%d" % (i % 65529 + 1) for i in range(200_000)))])
def test_cli_reader_that_went_away_ends_quietly(cmd, data):
    """`python -m tokenizer encode < big | head -c 10`: the closed pipe was a BrokenPipeError traceback (and another
    at exit); it now ends with 141, as a writer killed by SIGPIPE, and says nothing."""
    proc = subprocess.Popen([sys.executable, "-m", "tokenizer", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # the reader is gone before the first byte is written
    _, err = proc.communicate(data, timeout=120)
    assert proc.returncode == 141 and err == b"", err.decode()[-2000:]
