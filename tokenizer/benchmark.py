"""Speed of the World tokenizer vs the `rwkv` reference and pyrwkv-tokenizer (Rust), one core each.

The text is assembled from files every installation of this project has (no network):
Python's standard library sources, text/licence files of the installed packages, any
installed file that is mostly non-ASCII (e.g. CPython's test/cjkencodings samples), the
non-ASCII entries of the World vocab itself (shuffled), and lines of tokenizer/data/
multilingual_sample.txt (27 scripts, written for this project) resampled in random order.
Each component is timed separately and all together. Single-core figures use CPU time
(`time.process_time`, best of `repeats`) because the machine is shared; the 2-worker
`encode_batch` figures use wall time. The implementations compared in one table take turns
within each repeat (ours, Rust, ours, Rust, ...), so load from other processes hits them
alike and their ratio is steadier than their MB/s. Each timing includes freeing the result
(for a list of ids that is part of the cost). Ids are checked equal to the peers on the same
text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tokenizer import VOCAB_PATH, WorldTokenizer, trie

SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "multilingual_sample.txt"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "bench" / "results" / "tokenizer.json"


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark assembles and how often it repeats each timing."""

    total_mb: float = 12.0
    """Size of the assembled text in MB (the issue asks for at least 10)."""
    reference_mb: float = 0.3
    """Slice given to the pure-Python reference (about 2 MB/s)."""
    repeats: int = 3
    """Timings per implementation; the best is reported."""
    doc_kb: int = 32
    """Document size for the encode_batch comparison."""
    seed: int = 0


def _read_text(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
        return raw.decode("utf-8") if b"\0" not in raw else None
    except (OSError, UnicodeDecodeError):
        return None


def _files(roots: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(suffixes) or (suffixes == ("LICENSE",) and name.startswith("LICEN")):
                    out.append(Path(dirpath) / name)
    return out


def _take(texts, budget: int) -> list[str]:
    out, n = [], 0
    for t in texts:
        if t is None or not t.strip():
            continue
        out.append(t)
        n += len(t.encode("utf-8"))
        if n >= budget:
            break
    return out


def assemble_corpus(total_bytes: int, seed: int = 0) -> dict[str, list[str]]:
    """Components of real text found on this machine, about `total_bytes` UTF-8 bytes in all."""
    rng = random.Random(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    comps: dict[str, list[str]] = {}
    comps["python_stdlib_code"] = _take(
        (_read_text(p) for p in _files([stdlib], (".py",)) if "site-packages" not in p.parts),
        int(0.40 * total_bytes),
    )
    comps["package_docs_and_licences"] = _take(
        (
            _read_text(p)
            for p in _files([purelib], (".md", ".rst", ".txt", "LICENSE"))
            if "vocab" not in p.name
        ),
        int(0.15 * total_bytes),
    )

    def mostly_non_ascii(t: str | None) -> bool:
        return t is not None and len(t) > 200 and len(t.encode("utf-8")) > 1.3 * len(t)

    comps["non_ascii_files"] = _take(
        (
            t
            for t in map(_read_text, _files([stdlib, purelib], (".txt", ".py", ".json", ".html")))
            if mostly_non_ascii(t)
        ),
        int(0.10 * total_bytes),
    )
    tok_bytes = [b for b in WorldTokenizer()._tokens[1:] if max(b) >= 0x80]
    entries = [b.decode("utf-8", errors="replace") for b in tok_bytes]
    rng.shuffle(entries)
    comps["world_vocab_non_ascii_entries"] = [
        "".join(entries[i : i + 500]) for i in range(0, len(entries), 500)
    ]
    lines = [line + "\n" for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    have = sum(len(t.encode("utf-8")) for c in comps.values() for t in c)
    docs, n = [], 0
    while n < max(total_bytes - have, int(0.2 * total_bytes)):
        doc = "".join(rng.choice(lines) for _ in range(60))
        docs.append(doc)
        n += len(doc.encode("utf-8"))
    comps["multilingual_sample_lines"] = docs
    return comps


def _interleaved_best(fns: dict, repeats: int, clock=time.process_time) -> dict[str, float]:
    """Best seconds of each fn, the fns taking turns within every repeat (result freed inside the timing)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            best[name] = min(best[name], clock() - t0)
    return {k: max(v, 1e-9) for k, v in best.items()}


def time_split(tok: WorldTokenizer, rust, text: str, repeats: int) -> dict[str, float]:
    """ns per token of each step of ours and of Rust's whole call, on the same text (CPU time, interleaved).

    `list_copy_floor` copies a tuple of the same shared ints into a new list and frees it: the
    least any C code could spend turning ids into a list of shared ints (one incref and one
    decref per id, plus the list's memory).
    """
    data = text.encode("utf-8")
    ids = tok.encode_to_array(text)
    objs = tok._ids.take(ids)
    shared = tuple(objs.tolist())
    n = max(1, ids.shape[0])
    best = _interleaved_best(
        {
            "utf8_encode": lambda: text.encode("utf-8"),
            "trie_walk": lambda: trie.encode_buffer(data, tok._table, tok._value),
            "take_shared_ints": lambda: tok._ids.take(ids),
            "object_array_tolist": lambda: objs.tolist(),
            "uint16_tolist_new_ints": lambda: ids.tolist(),
            "list_copy_floor": lambda: list(shared),
            "ours_encode_list": lambda: tok.encode(text),
            "ours_encode_to_array": lambda: tok.encode_to_array(text),
            "rust_encode": lambda: rust.encode(text),
        },
        repeats,
    )
    return {k: round(v * 1e9 / n, 2) for k, v in best.items()}


def _load_seconds(imports: str, build: str) -> dict[str, float]:
    """Seconds to load a tokenizer in a fresh interpreter: imports + build (wall, CPU) and build alone."""
    prog = (
        "import time; w0 = time.perf_counter(); c0 = time.process_time()\n"
        f"{imports}\n"
        "w1 = time.perf_counter(); c1 = time.process_time()\n"
        f"{build}\n"
        "w2 = time.perf_counter(); c2 = time.process_time()\n"
        "print(w2 - w0, c2 - c0, w2 - w1, c2 - c1)"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True, env=env)
    vals = [round(float(v), 3) for v in out.stdout.strip().splitlines()[-1].split()]
    return dict(zip(("imports_and_build_wall", "imports_and_build_cpu", "build_wall", "build_cpu"), vals))


def bench_batch(tok: WorldTokenizer, rust, all_bytes: bytes, cfg: BenchConfig) -> dict:
    """encode_batch with 1 and 2 worker threads (wall time) on documents of `cfg.doc_kb` KB."""
    size = cfg.doc_kb * 1000
    docs = [all_bytes[i : i + size].decode("utf-8", errors="replace") for i in range(0, len(all_bytes), size)]
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    batch = {
        "documents": len(docs),
        "mb": mb,
        "cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
    }
    expected = tok.encode_batch(docs, num_workers=1)
    assert tok.encode_batch(docs, num_workers=2) == expected
    fns = {}
    for workers in (1, 2):
        fns[f"ours_list_{workers}w_mb_s"] = lambda w=workers: tok.encode_batch(docs, num_workers=w)
        fns[f"ours_flat_{workers}w_mb_s"] = lambda w=workers: tok.encode_batch_flat(docs, num_workers=w)
    fns["rust_encode_batch_mb_s"] = lambda: rust.encode_batch(docs)
    batch.update({k: mb / v for k, v in _interleaved_best(fns, cfg.repeats, clock=time.perf_counter).items()})
    batch["same_ids_as_rust"] = rust.encode_batch(docs) == expected
    batch["speedup_2w_list"] = batch["ours_list_2w_mb_s"] / batch["ours_list_1w_mb_s"]
    batch["speedup_2w_flat"] = batch["ours_flat_2w_mb_s"] / batch["ours_flat_1w_mb_s"]
    # Share of one worker's CPU time spent in the compiled loop, which runs without the GIL;
    # Amdahl's law then bounds the 2-thread speed-up independently of other load on the box.
    joined = np.frombuffer(b"".join(d.encode("utf-8") for d in docs), np.uint8)
    doc_off = np.cumsum([0] + [len(d.encode("utf-8")) for d in docs], dtype=np.int64)
    cpu = _interleaved_best(
        {
            "kernel": lambda: trie.encode_docs(joined, doc_off, tok._table, tok._value),
            "list": lambda: tok.encode_batch(docs, num_workers=1),
            "flat": lambda: tok.encode_batch_flat(docs, num_workers=1),
        },
        cfg.repeats,
    )
    for kind in ("list", "flat"):
        p = min(1.0, cpu["kernel"] / cpu[kind])
        batch[f"nogil_share_{kind}"] = p
        batch[f"amdahl_2w_speedup_{kind}"] = 1 / ((1 - p) + p / 2)
    print(
        f"encode_batch {len(docs)} docs x {cfg.doc_kb} KB (wall): list 1 worker {batch['ours_list_1w_mb_s']:.1f}, "
        f"2 workers {batch['ours_list_2w_mb_s']:.1f} MB/s ({batch['speedup_2w_list']:.2f}x); encode_batch_flat "
        f"{batch['ours_flat_1w_mb_s']:.1f} -> {batch['ours_flat_2w_mb_s']:.1f} MB/s ({batch['speedup_2w_flat']:.2f}x); "
        f"rust encode_batch {batch['rust_encode_batch_mb_s']:.1f} MB/s; load average {batch['load_average_1min']:.1f}; "
        f"share without GIL: list {batch['nogil_share_list']:.2f}, flat {batch['nogil_share_flat']:.2f} -> Amdahl 2-core "
        f"bound {batch['amdahl_2w_speedup_list']:.2f}x / {batch['amdahl_2w_speedup_flat']:.2f}x",
        flush=True,
    )

    return batch


def run(cfg: BenchConfig) -> dict:
    from pyrwkv_tokenizer import RWKVTokenizer
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    tok = WorldTokenizer()
    rust = RWKVTokenizer()
    comps = assemble_corpus(int(cfg.total_mb * 1e6), cfg.seed)
    texts = {name: "".join(docs) for name, docs in comps.items()}
    texts["all"] = "".join(texts.values())
    result: dict = {
        "config": asdict(cfg),
        "machine": platform.processor() or platform.machine(),
        "components": {},
    }
    for name, text in texts.items():
        nbytes = len(text.encode("utf-8"))
        mb = nbytes / 1e6
        ours = tok.encode_to_array(text)
        theirs = rust.encode(text)
        same = ours.tolist() == theirs
        same_obj = _interleaved_best(
            {
                "list": lambda text=text: tok.encode(text),
                "array": lambda text=text: tok.encode_to_array(text),
                "rust": lambda text=text: rust.encode(text),
            },
            cfg.repeats,
        )
        row = {
            "mb": round(mb, 3),
            "non_ascii_byte_share": round(1 - len(text.encode("ascii", errors="ignore")) / nbytes, 3),
            "bytes_per_token": round(nbytes / max(1, len(ours)), 3),
            "ours_encode_list_mb_s": mb / same_obj["list"],
            "ours_encode_to_array_mb_s": mb / same_obj["array"],
            "rust_encode_mb_s": mb / same_obj["rust"],
            "same_ids_as_rust": same,
        }
        row["ratio_list_vs_rust"] = row["ours_encode_list_mb_s"] / row["rust_encode_mb_s"]
        row["ratio_array_vs_rust"] = row["ours_encode_to_array_mb_s"] / row["rust_encode_mb_s"]
        result["components"][name] = row
        print(
            f"{name:32s} {mb:6.2f} MB  ours list {row['ours_encode_list_mb_s']:7.1f}  "
            f"ours array {row['ours_encode_to_array_mb_s']:7.1f}  rust {row['rust_encode_mb_s']:6.1f} MB/s  "
            f"ratio {row['ratio_list_vs_rust']:.2f}x / {row['ratio_array_vs_rust']:.2f}x  same ids: {same}",
            flush=True,
        )

    result["ns_per_token_all"] = time_split(tok, rust, texts["all"], cfg.repeats)
    print("ns per token on all (CPU, interleaved):", result["ns_per_token_all"], flush=True)

    short = [d[i : i + 200] for docs in comps.values() for d in docs[:20] for i in range(0, 20_000, 200)]
    short = [s for s in short if s]
    mb = sum(len(s.encode("utf-8")) for s in short) / 1e6
    row = {
        "documents": len(short),
        "mb": mb,
        **{
            f"{k}_mb_s": mb / v
            for k, v in _interleaved_best(
                {
                    "ours_encode_list": lambda: [tok.encode(s) for s in short],
                    "rust_encode": lambda: [rust.encode(s) for s in short],
                },
                cfg.repeats,
            ).items()
        },
        "same_ids_as_rust": [tok.encode(s) for s in short[:2000]] == [rust.encode(s) for s in short[:2000]],
    }
    row["ratio_list_vs_rust"] = row["ours_encode_list_mb_s"] / row["rust_encode_mb_s"]
    result["short_strings_one_call_each"] = row
    print(
        f"{len(short)} strings of <=200 chars, one encode() call each: ours {row['ours_encode_list_mb_s']:.1f}, "
        f"rust {row['rust_encode_mb_s']:.1f} MB/s ({row['ratio_list_vs_rust']:.2f}x)",
        flush=True,
    )

    ref = TRIE_TOKENIZER(str(VOCAB_PATH))
    piece = texts["all"].encode("utf-8")
    step = len(piece) // 6
    sl = b"".join(piece[i * step : i * step + int(cfg.reference_mb * 1e6 / 6)] for i in range(6))
    t0 = time.process_time()
    ref_ids = ref.encodeBytes(sl)
    ref_s = time.process_time() - t0
    result["reference"] = {
        "mb": len(sl) / 1e6,
        "mb_s": len(sl) / 1e6 / ref_s,
        "same_ids_as_ours": ref_ids == tok.encode_bytes(sl),
        "ours_vs_reference": result["components"]["all"]["ours_encode_list_mb_s"] / (len(sl) / 1e6 / ref_s),
    }
    print(
        f"reference TRIE_TOKENIZER on {len(sl) / 1e6:.2f} MB: {result['reference']['mb_s']:.2f} MB/s, "
        f"same ids: {result['reference']['same_ids_as_ours']}",
        flush=True,
    )

    result["encode_batch_wall"] = bench_batch(tok, rust, texts["all"].encode("utf-8"), cfg)

    result["load_seconds"] = {
        "ours": _load_seconds("from tokenizer import WorldTokenizer", "WorldTokenizer()"),
        "reference": _load_seconds(
            "from rwkv.rwkv_tokenizer import TRIE_TOKENIZER", f"TRIE_TOKENIZER({str(VOCAB_PATH)!r})"
        ),
        "rust": _load_seconds("from pyrwkv_tokenizer import RWKVTokenizer", "RWKVTokenizer()"),
    }
    print("load seconds (fresh interpreter, imports included):", result["load_seconds"])
    result["load_average_1min_at_end"] = os.getloadavg()[0]
    allrow = result["components"]["all"]
    print(
        f"\nALL {allrow['mb']:.1f} MB, one core: ours encode() {allrow['ours_encode_list_mb_s']:.1f} MB/s = "
        f"{allrow['ratio_list_vs_rust']:.2f}x Rust ({allrow['rust_encode_mb_s']:.1f} MB/s); encode_to_array "
        f"{allrow['ours_encode_to_array_mb_s']:.1f} MB/s = {allrow['ratio_array_vs_rust']:.2f}x Rust; "
        f"identical ids: {allrow['same_ids_as_rust'] and result['reference']['same_ids_as_ours']}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=BenchConfig.total_mb, help="MB of text to assemble")
    parser.add_argument("--repeats", type=int, default=BenchConfig.repeats)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON result path (default {DEFAULT_OUT})")
    parser.add_argument("--batch-only", action="store_true", help="only the encode_batch 1 vs 2 workers part")
    args = parser.parse_args(argv)
    if not args.mb > 0:
        parser.error(f"--mb must be > 0, got {args.mb}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    cfg = BenchConfig(total_mb=args.mb, repeats=args.repeats)
    if args.batch_only:
        from pyrwkv_tokenizer import RWKVTokenizer

        text = "".join("".join(docs) for docs in assemble_corpus(int(cfg.total_mb * 1e6), cfg.seed).values())
        result = {
            "config": asdict(cfg),
            "encode_batch_wall": bench_batch(WorldTokenizer(), RWKVTokenizer(), text.encode(), cfg),
        }
        out = args.out or DEFAULT_OUT.with_name("tokenizer_batch.json")
    else:
        result = run(cfg)
        out = args.out or DEFAULT_OUT
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    if args.batch_only:
        return 0 if result["encode_batch_wall"]["same_ids_as_rust"] else 1
    ok = result["components"]["all"]["same_ids_as_rust"] and result["reference"]["same_ids_as_ours"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
