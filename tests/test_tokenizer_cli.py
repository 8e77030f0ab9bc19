"""`python -m tokenizer encode|decode` round trip through real subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
