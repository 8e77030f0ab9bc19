"""Text generation with an RWKV-7 checkpoint in RNN mode: constant memory and time per token.

The prompt goes through the model in chunks (`RWKV7.forward`, the parallel WKV path); then each new
token is one `RWKV7.step` (the T = 1 math on [1, C] tensors, parameters gathered once by
`RWKV7.step_weights`) that carries the fixed-size state (per layer: two [1, C] shifts and one
[1, H, N, N] WKV state), so nothing grows with the number of tokens generated. Sampling is RWKV's usual
temperature + nucleus (top-p) rule, as in the `rwkv` package's PIPELINE.sample_logits.

    python -m trainer.generate --model X.pth --prompt "..." --max-tokens N [--temperature T --top-p P --seed S]
"""
from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from trainer.models import load_official
from trainer.models.rwkv7 import RWKV7


@dataclass
class GenerateConfig:
    """Options of `python -m trainer.generate`."""

    model: str
    """official RWKV-7 checkpoint, .pth or .safetensors"""
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


def sample_logits(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """logits [V] -> token id. Top-p cut on the softmax, then temperature on the kept probabilities."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p < 1.0:
        sorted_probs, _ = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        cutoff = sorted_probs[torch.searchsorted(cum, torch.tensor([top_p], device=cum.device)).clamp(max=len(cum) - 1)]
        probs = torch.where(probs < cutoff, torch.zeros_like(probs), probs)
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def stream(model: RWKV7, prompt_ids: list[int], max_tokens: int, temperature: float = 1.0, top_p: float = 0.85,
           seed: int | None = None, stop_token: int | None = 0, prompt_chunk: int = 512) -> Iterator[tuple[int, list]]:
    """Yield (token, state) for each generated token; state is the model's fixed-size RNN state."""
    device = model.emb.weight.device
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    ids = prompt_ids or [0]
    state = None
    for i in range(0, len(ids), prompt_chunk):
        logits, state = model(torch.tensor([ids[i:i + prompt_chunk]], device=device), state)
    last = logits[0, -1]
    weights = model.step_weights()  # gathered once; each token then costs one `RWKV7.step`
    step = torch.empty(1, dtype=torch.long, device=device)  # [B = 1]
    for _ in range(max_tokens):
        tok = sample_logits(last, temperature, top_p, gen)
        yield tok, state
        if stop_token is not None and tok == stop_token:
            return
        step.fill_(tok)
        logits, state = model.step(step, state, weights)
        last = logits[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=GenerateConfig.device)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--no-stop", action="store_true", help="keep going past the end-of-document token 0")
    a = p.parse_args(argv)
    cfg = GenerateConfig(model=a.model, prompt=a.prompt, max_tokens=a.max_tokens, temperature=a.temperature,
                         top_p=a.top_p, seed=a.seed, device=a.device, dtype=a.dtype, stop_at_eod=not a.no_stop)

    from tokenizer import WorldTokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    model = load_official(cfg.model, dtype=dtype, device=cfg.device).eval()
    tok = WorldTokenizer()
    prompt_ids = tok.encode(cfg.prompt)
    out = sys.stdout
    out.write(cfg.prompt)
    out.flush()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    t0, n, first = time.perf_counter(), 0, None
    for token, _ in stream(model, prompt_ids, cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.seed,
                           0 if cfg.stop_at_eod else None, cfg.prompt_chunk):
        first = first or time.perf_counter()
        n += 1
        if token == 0:
            continue
        out.write(utf8.decode(tok.decode_bytes([token])))
        out.flush()
    out.write(utf8.decode(b"", final=True) + "\n")
    t1 = time.perf_counter()
    rate = (n - 1) / (t1 - first) if n > 1 else float("nan")
    print(f"[{len(prompt_ids)} prompt tokens in {(first or t1) - t0:.2f}s, {n} generated, "
          f"{rate:.1f} tokens/s on {cfg.device} {cfg.dtype}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
