"""infctx: train on samples longer than the context window by carrying the recurrent state.

A sample of T = data_ctx_len tokens runs as ceil(T / ctx_len) segments, one after another. Per layer,
the time-mix shift state, the WKV state [B, H, N, N] and the channel-mix shift state leave segment k
and enter segment k + 1 (all zero for segment 0), as in RWKV-infctx-trainer (see
shared/specs/infctx.md). Differences from it:
- Full BPTT by default: the carried state keeps its graph, so the loss of segment k back-propagates
  into every earlier segment (`bptt_truncate=True` detaches instead).
- Bounded memory by recomputation, not by a backward per segment: each segment runs under
  `torch.utils.checkpoint` (non-reentrant) with its loss computed inside, so only its inputs
  (token ids and the small carried states) are kept; its activations and logits are rebuilt during
  the backward pass, one segment at a time. Peak memory is one segment's activations plus
  n_segments × the per-layer states.
- Loss: segment k's mean cross-entropy weighted by T_k / T, summed, equals the mean over the whole
  sample; L2Wrap (scaled by its incoming gradient) then adds 1e-4 / (B·T) per position, the same as
  a single pass over the sample. So the segmented gradient equals the one-pass gradient exactly.

`InfctxLM` wraps the language model as one module whose forward is the whole segment loop: Fabric's
DDP/FSDP wrap it and see one forward and one backward per micro-batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from trainer.loss import lm_loss


def segment_loss(lm: nn.Module, idx: torch.Tensor, targets: torch.Tensor, state, weight: float):
    """One segment: idx, targets [B, t] -> (weight × L2Wrap(mean CE), new state); the loss is the fused
    Triton kernel on the GPU (trainer/loss.py), the plain PyTorch reference elsewhere."""
    logits, new_state = lm(idx, state)                     # [B, t, V]
    return lm_loss(logits, targets, weight), new_state


def _flat(state) -> list[torch.Tensor]:
    return [t for layer in state for t in layer]


def _unflat(flat, per_layer: int = 3) -> list[tuple]:
    return [tuple(flat[i:i + per_layer]) for i in range(0, len(flat), per_layer)]


class InfctxLM(nn.Module):
    """forward(tokens [B, D + 1]) -> mean next-token loss over the D positions, run in ctx_len segments."""

    def __init__(self, lm: nn.Module, ctx_len: int, bptt_truncate: bool = False, recompute: bool = True):
        super().__init__()
        if int(ctx_len) < 1:
            raise ValueError(f"InfctxLM: ctx_len must be >= 1, got {ctx_len}")
        self.lm = lm
        self.ctx_len = int(ctx_len)
        self.bptt_truncate = bptt_truncate
        self.recompute = recompute

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"InfctxLM: tokens must be [B, D + 1] with D >= 1 (an input and its next token), "
                             f"got shape {tuple(tokens.shape)}")
        idx, targets = tokens[:, :-1], tokens[:, 1:]       # [B, D] each
        T = idx.shape[1]
        n_seg = math.ceil(T / self.ctx_len)
        ckpt = self.recompute and n_seg > 1 and torch.is_grad_enabled()
        state = None
        total = None
        for s in range(n_seg):
            lo, hi = s * self.ctx_len, min(T, (s + 1) * self.ctx_len)
            weight = (hi - lo) / T
            if ckpt:
                n_state = 0 if state is None else len(_flat(state))

                def run(i, t, *flat, _w=weight, _n=n_state):
                    loss, new = segment_loss(self.lm, i, t, _unflat(list(flat)) if _n else None, _w)
                    return (loss, *_flat(new))

                out = checkpoint(run, idx[:, lo:hi], targets[:, lo:hi],
                                 *([] if state is None else _flat(state)), use_reentrant=False)
                loss, state = out[0], _unflat(list(out[1:]))
            else:
                loss, state = segment_loss(self.lm, idx[:, lo:hi], targets[:, lo:hi], state, weight)
            if self.bptt_truncate:
                state = [tuple(t.detach() for t in layer) for layer in state]
            total = loss if total is None else total + loss
        return total
