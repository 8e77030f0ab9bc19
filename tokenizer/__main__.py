"""Command line: `python -m tokenizer encode|decode|bench`.

encode: UTF-8 (or any) bytes on stdin -> ids on stdout, space-separated, one line.
decode: whitespace-separated ids on stdin -> the raw bytes on stdout (exact round trip).
bench:  the speed comparison of bench/tokenizer.py (ours vs reference vs pyrwkv-tokenizer).
"""

from __future__ import annotations

import argparse
import sys

from tokenizer.cli import after_broken_pipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("encode", help="bytes on stdin -> token ids on stdout")
    sub.add_parser("decode", help="token ids on stdin -> bytes on stdout")
    sub.add_parser("bench", help="speed vs the reference and pyrwkv-tokenizer (`bench --help` for options)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from tokenizer.benchmark import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)

    from tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    if args.cmd == "encode":
        ids = tok.encode_bytes(sys.stdin.buffer.read())
        return _write(sys.stdout.buffer, (" ".join(map(str, ids)) + "\n").encode())
    words = sys.stdin.read().split()
    try:
        ids = [int(w) for w in words]
        data = tok.decode_bytes(ids)
    except ValueError as e:
        print(f"python -m tokenizer decode: {e}", file=sys.stderr)
        return 2
    return _write(sys.stdout.buffer, data)


def _write(out, data: bytes) -> int:
    """Write ``data`` to stdout; a reader that went away (``... | head``) ends the command quietly with 141, as a
    writer killed by SIGPIPE (it was a BrokenPipeError traceback, and another one at exit)."""
    try:
        out.write(data)
        out.flush()
        return 0
    except BrokenPipeError:
        return after_broken_pipe(out)


if __name__ == "__main__":
    sys.exit(main())
