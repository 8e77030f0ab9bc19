"""infctx: a segmented run with carried state gives the same loss and gradients as one pass."""
import pytest
import torch
import torch.nn.functional as F

from trainer.infctx import InfctxLM
from trainer.models.rwkv7 import RWKV7, RWKV7Config, l2wrap


def _model(seed=0):
    torch.manual_seed(seed)
    m = RWKV7(RWKV7Config(n_layer=2, n_embd=128, head_size=64, vocab_size=97)).double()
    # from-scratch init zeroes att.output / ffn.value and the LoRA "1" matrices: perturb every
    # parameter so every gradient path (through the carried state too) is exercised
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _one_pass_grads(m, tokens):
    m.zero_grad()
    logits, _ = m(tokens[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss = l2wrap(ce, logits)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def _segmented_grads(m, tokens, ctx_len, **kw):
    m.zero_grad()
    loss = InfctxLM(m, ctx_len, **kw)(tokens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("recompute", [True, False])
def test_four_segments_equal_one_pass_float64(recompute):
    m = _model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 4 * 12 + 1), generator=g)
    loss1, ref = _one_pass_grads(m, tokens)
    loss4, got = _segmented_grads(m, tokens, ctx_len=12, recompute=recompute)
    assert torch.allclose(loss1, loss4, rtol=1e-12, atol=0)
    for name, r in ref.items():
        rel = (got[name] - r).norm() / r.norm().clamp_min(1e-300)
        assert r.norm() > 0, name
        assert rel <= 1e-8, (name, rel.item())


def test_uneven_last_segment_float64():
    m = _model(3)
    tokens = torch.randint(0, 97, (1, 30 + 1), generator=torch.Generator().manual_seed(2))
    _, ref = _one_pass_grads(m, tokens)
    _, got = _segmented_grads(m, tokens, ctx_len=8)  # segments 8, 8, 8, 6
    for name, r in ref.items():
        assert ((got[name] - r).norm() / r.norm()) <= 1e-8, name


def test_truncated_bptt_differs_and_matches_detached_reference():
    m = _model(5)
    tokens = torch.randint(0, 97, (2, 2 * 10 + 1), generator=torch.Generator().manual_seed(4))
    _, full = _segmented_grads(m, tokens, ctx_len=10)
    _, trunc = _segmented_grads(m, tokens, ctx_len=10, bptt_truncate=True)
    # reference for truncation: segment 2 starts from a detached copy of segment 1's final state
    m.zero_grad()
    idx, tgt = tokens[:, :-1], tokens[:, 1:]
    total = 0
    state = None
    for lo in (0, 10):
        logits, state = m(idx[:, lo:lo + 10], state)
        ce = F.cross_entropy(logits.reshape(-1, 97), tgt[:, lo:lo + 10].reshape(-1))
        total = total + l2wrap(ce, logits) * 0.5
        state = [tuple(t.detach() for t in layer) for layer in state]
    total.backward()
    diff = max(((full[n] - trunc[n]).norm() / full[n].norm()).item() for n in full)
    assert diff > 1e-6  # truncation drops the cross-segment gradient
    for n, p in m.named_parameters():
        assert ((trunc[n] - p.grad).norm() / p.grad.norm()) <= 1e-10, n


def test_bad_ctx_len_and_too_short_tokens_are_errors():
    """Used to return None (no segment ran) or divide by zero: now a clear error."""
    m = _model()
    for ctx_len in (0, -4):
        with pytest.raises(ValueError, match="ctx_len"):
            InfctxLM(m, ctx_len)
    with pytest.raises(ValueError, match=r"\[B, D \+ 1\]"):
        InfctxLM(m, 8)(torch.zeros(2, 1, dtype=torch.long))
