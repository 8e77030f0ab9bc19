"""Text generation with an RWKV-7 checkpoint in RNN mode: constant memory and time per token.

The prompt goes through the model in chunks (`RWKV7.forward`, the parallel WKV path, with `last_only`:
the [V, C] head runs on the last prompt position only, as the `rwkv` package does); then each new
token is one `RWKV7.step` (the T = 1 math on [1, C] tensors, parameters gathered once by
`RWKV7.step_weights`) that carries the fixed-size state (per layer: two [1, C] shifts and one
[1, H, N, N] WKV state), so nothing grows with the number of tokens generated. Sampling is RWKV's usual
temperature + nucleus (top-p) rule, as in the `rwkv` package's PIPELINE.sample_logits.

`--cuda-graph` (off by default) replays the step as one captured CUDA graph per token (`GraphStep`);
it is skipped on CPU; on a GPU its test (marked gpu) finds it equal to the eager step, but it is not timed.

    python -m trainer.generate --model X.pth|runs/NAME --prompt "..." --max-tokens N [--temperature T --top-p P --seed S]

Exit status: 0 done; 2 a usage error, an unusable model file, or NaN/inf logits (one `error:` line); 130 after
Ctrl-C (the summary says "interrupted"); 141 when the reader of stdout went away (`... | head`), silently.
Characters the stdout encoding lacks print as '?'.
"""
from __future__ import annotations

import argparse
import codecs
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.models import CheckpointError, load_official
from trainer.models.checkpoint import resolve_checkpoint
from trainer.models.rwkv7 import RWKV7


@dataclass
class GenerateConfig:
    """Options of `python -m trainer.generate`."""

    model: str
    """official RWKV-7 checkpoint (.pth or .safetensors), a checkpoint folder, or a run folder (its newest
    complete checkpoint)"""
    prompt: str = ""
    """text to continue (World tokenizer); empty starts from the end-of-document token 0"""
    max_tokens: int = 100
    """tokens to generate"""
    temperature: float = 1.0
    """softmax temperature; 0 = greedy"""
    top_p: float = 0.85
    """nucleus sampling: keep the smallest set of tokens whose probability reaches top_p"""
    seed: int | None = None
    """random seed for sampling (None: nondeterministic)"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device"""
    dtype: str = "fp32"
    """weights dtype: fp32, bf16 or fp16 (the WKV state stays fp32)"""
    stop_at_eod: bool = True
    """stop when the model emits token 0 (end of document)"""
    prompt_chunk: int = 512
    """prompt tokens per forward pass (bounds prompt-time memory)"""
    cuda_graph: bool = False
    """replay each token's `RWKV7.step` as a captured CUDA graph (CUDA only; unmeasured, see `GraphStep`)"""


class NonFiniteLogits(ValueError):
    """The model's logits hold NaN or +inf: there is no token to pick."""

    def __init__(self):
        super().__init__("the model's logits are not finite (NaN or inf): the checkpoint holds non-finite weights, "
                         "or the activations overflowed (with --dtype fp16 try bf16 or fp32)")


def sample_logits(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """logits [V] -> token id. Top-p cut on the softmax, then temperature on the kept probabilities:
    p^(1/T), renormalised, which is softmax(logits / T) over the kept ids, computed that way so a low T
    cannot underflow every kept probability to 0 (p ** (1/T) did at T = 0.05).
    Raises NonFiniteLogits when the largest logit is NaN or +inf (argmax would pick the NaN's id)."""
    if temperature == 0 or 0 < temperature < 1e-30:   # below float32's range 1/T would be inf: greedy
        tok = int(torch.argmax(logits))   # a NaN counts as the largest value
        if not math.isfinite(logits[tok]):
            raise NonFiniteLogits()
        return tok
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    logits = logits.float()
    top = logits.max()                    # NaN if any logit is NaN
    if not torch.isfinite(top):
        raise NonFiniteLogits()
    logits = logits - top                 # logits / T stays finite for tiny T (no inf - inf = NaN)
    if top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)
        sorted_probs, _ = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        cutoff = sorted_probs[torch.searchsorted(cum, torch.tensor([top_p], device=cum.device)).clamp(max=len(cum) - 1)]
        logits = torch.where(probs < cutoff, torch.full_like(logits, float("-inf")), logits)
    return int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen))


class GraphStep:
    """`RWKV7.step` captured once in a CUDA graph (torch.cuda.CUDAGraph), so a token costs one graph
    replay instead of ~70 kernel launches per block from Python. The token id and the state live in
    static buffers: each call writes the token, replays, and the graph copies the new state over the old
    in place, so the returned logits [B, V] and state are overwritten by the next call.
    Checked on an H200 (`tests/test_generate.py::test_graph_step_matches_eager_step`, marked gpu: equal to
    the eager step) but not timed, hence off by default."""

    def __init__(self, model: RWKV7, weights, state: list):
        device = model.emb.weight.device
        if device.type != "cuda":
            raise ValueError(f"GraphStep needs a CUDA model, got device {device}")
        self.idx = torch.zeros(state[0][0].shape[0], dtype=torch.long, device=device)  # [B]
        self.state = [tuple(t.clone() for t in layer) for layer in state]
        with torch.cuda.device(device):  # the capture stream must be on the model's GPU, not on GPU 0
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS workspaces, as torch's docs ask)
                for _ in range(3):
                    model.step(self.idx, self.state, weights)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits, new_state = model.step(self.idx, self.state, weights)
                for old, new in zip(self.state, new_state):
                    for o, n in zip(old, new):
                        o.copy_(n)

    def __call__(self, token: int) -> tuple[torch.Tensor, list]:
        """token (the same for every sequence of the batch) -> (logits [B, V], state), both static."""
        self.idx.fill_(token)
        with torch.cuda.device(self.idx.device):
            self.graph.replay()
        return self.logits, self.state


@torch.no_grad()
def stream(model: RWKV7, prompt_ids: list[int], max_tokens: int, temperature: float = 1.0, top_p: float = 0.85,
           seed: int | None = None, stop_token: int | None = 0, prompt_chunk: int = 512,
           cuda_graph: bool = False, n_ids: int | None = None) -> Iterator[tuple[int, list]]:
    """Yield (token, state) for each generated token; state is the model's fixed-size RNN state.
    cuda_graph: step through a `GraphStep` when the model is on CUDA (ignored elsewhere); the yielded
    state is then one set of buffers, overwritten by the next token.
    n_ids: sample only ids below it (the tokenizer's: the World vocab's 65,530 of the model's 65,536 output
    rows; the rest have no bytes to decode). None: every output row."""
    device = model.emb.weight.device
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    ids = prompt_ids or [0]
    state = None
    for i in range(0, len(ids), prompt_chunk):
        logits, state = model(torch.tensor([ids[i:i + prompt_chunk]], device=device), state, last_only=True)
    last = logits[0, -1]  # logits [1, 1, V]: only the last prompt position's row is computed
    weights = model.step_weights()  # gathered once; each token then costs one `RWKV7.step`
    graph = GraphStep(model, weights, state) if cuda_graph and device.type == "cuda" else None
    step = torch.empty(1, dtype=torch.long, device=device)  # [B = 1]
    for _ in range(max_tokens):
        tok = sample_logits(last if n_ids is None else last[:n_ids], temperature, top_p, gen)
        yield tok, state
        if stop_token is not None and tok == stop_token:
            return
        if graph is None:
            step.fill_(tok)
            logits, state = model.step(step, state, weights)
        else:
            logits, state = graph(tok)
        last = logits[0]


def _encodable(text: str, out) -> str:
    """text with the characters that `out`'s encoding lacks as '?' (an ascii or latin-1 stdout, such as a
    Windows console or PYTHONIOENCODING=ascii, raised UnicodeEncodeError at the first character past it)."""
    enc = getattr(out, "encoding", None) or "utf-8"
    return text.encode(enc, "replace").decode(enc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a .pth/.safetensors file, a checkpoint folder, or a run folder "
                   "(runs/NAME: its newest complete checkpoint)")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=GenerateConfig.device)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--no-stop", action="store_true", help="keep going past the end-of-document token 0")
    p.add_argument("--cuda-graph", action="store_true", help="replay each token as a CUDA graph (unmeasured)")
    a = p.parse_args(argv)
    if not (a.temperature >= 0 and math.isfinite(a.temperature)):
        p.error(f"--temperature must be a finite number >= 0, got {a.temperature}")
    if not 0 < a.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.max_tokens < 0:
        p.error(f"--max-tokens must be >= 0, got {a.max_tokens}")
    if a.seed is not None and not -2**63 <= a.seed < 2**64:   # what torch.Generator.manual_seed takes
        p.error(f"--seed must be in [-2**63, 2**64), got {a.seed}")
    cfg = GenerateConfig(model=a.model, prompt=a.prompt, max_tokens=a.max_tokens, temperature=a.temperature,
                         top_p=a.top_p, seed=a.seed, device=a.device, dtype=a.dtype, stop_at_eod=not a.no_stop,
                         cuda_graph=a.cuda_graph)
    if cfg.cuda_graph and not cfg.device.startswith("cuda"):
        print(f"[--cuda-graph skipped: device {cfg.device} is not CUDA]", file=sys.stderr)

    from tokenizer import WorldTokenizer
    from tokenizer.cli import after_broken_pipe

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    try:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(f"--device {cfg.device}: CUDA is not available on this machine")
        path = resolve_checkpoint(cfg.model)
        if path != Path(cfg.model):
            print(f"[model: {path}]", file=sys.stderr)
        model = load_official(path, dtype=dtype, device=device).eval()
    except (CheckpointError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = WorldTokenizer()
    prompt_bytes = os.fsencode(cfg.prompt)        # a prompt from argv that is not UTF-8 arrives as surrogates
    prompt_ids = tok.encode_bytes(prompt_bytes)
    if prompt_ids and max(prompt_ids) >= model.cfg.vocab_size:
        print(f"error: the prompt has token id {max(prompt_ids)}, past the model's vocabulary "
              f"({model.cfg.vocab_size} ids)", file=sys.stderr)
        return 2
    out = sys.stdout
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    t0, n, first, failed, interrupted = time.perf_counter(), 0, None, None, False
    try:
        out.write(_encodable(prompt_bytes.decode("utf-8", "replace"), out))
        out.flush()
        try:
            for token, _ in stream(model, prompt_ids, cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.seed,
                                   0 if cfg.stop_at_eod else None, cfg.prompt_chunk, cfg.cuda_graph, tok.n_entries + 1):
                first = first or time.perf_counter()
                n += 1
                if token == 0:
                    continue
                out.write(_encodable(utf8.decode(tok.decode_bytes([token])), out))
                out.flush()
        except NonFiniteLogits as e:
            failed = f"error: after {n} generated tokens: {e}"
        except KeyboardInterrupt:   # Ctrl-C: end the line and report what was generated (not a traceback)
            interrupted = True
        out.write(_encodable(utf8.decode(b"", final=True), out) + "\n")
        out.flush()
    except BrokenPipeError:   # the reader went away (`... | head`): stop quietly, as a writer killed by SIGPIPE
        status = after_broken_pipe(out)
        if failed:
            print(failed, file=sys.stderr)
        return 2 if failed else status
    if failed:
        print(failed, file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    rate = f"{(n - 1) / (t1 - first):.1f} tokens/s" if n > 1 else "no rate (fewer than 2 tokens)"
    print(f"[{len(prompt_ids)} prompt tokens in {(first or t1) - t0:.2f}s, {n} generated, "
          f"{rate} on {cfg.device} {cfg.dtype}{', interrupted' if interrupted else ''}]", file=sys.stderr)
    return 130 if interrupted else 0   # 128 + SIGINT, as a shell reports a Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
