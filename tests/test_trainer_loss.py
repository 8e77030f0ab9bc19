"""The fused Triton loss (CE + L2Wrap) against the PyTorch reference: value and logits gradient.

Without a GPU the kernels run under TRITON_INTERPRET=1, which must be set before triton is first
imported; other test modules import it earlier in the same session (torch._dynamo does), so on the
CPU the comparison runs in a fresh interpreter started by the test."""
import os
import subprocess
import sys
from pathlib import Path

import torch

CASES = [(257, 6, torch.float32), (5000, 3, torch.float32), (4096, 4, torch.bfloat16)]


def compare(V, rows, dtype, dev):
    from trainer.loss import lm_loss_fused, lm_loss_reference

    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(2, rows, V, generator=g) * 3).to(dtype)
    logits[0, 0, 7] = logits[0, 0].max() + 5                    # a clear argmax for L2Wrap
    logits[1, 1, 3] = logits[1, 1, 9] = logits[1, 1].max() + 1  # a tie: the first index gets L2Wrap
    logits = logits.to(dev)
    targets = torch.randint(0, V, (2, rows), generator=g).to(dev)
    out = {}
    for name, fn in (("ref", lm_loss_reference), ("fused", lm_loss_fused)):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, targets, 0.25)
        (loss * 0.7).backward()
        out[name] = (loss.detach().float().cpu(), x.grad.float().cpu())
    (lr, gr), (lf, gf) = out["ref"], out["fused"]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(lf, lr, rtol=1e-5), (lf, lr)
    assert ((gf - gr).norm() / gr.norm()) < tol
    assert abs(gf[0, 0, 7] - gr[0, 0, 7]) <= tol * abs(gr[0, 0, 7])   # includes the L2Wrap term
    assert abs(gf[1, 1, 3] - gr[1, 1, 3]) <= tol * abs(gr[1, 1, 3])
    assert abs(gf[1, 1, 9] - gr[1, 1, 9]) <= tol * abs(gr[1, 1, 9])


def strided_and_bad_targets(dev):
    """Logits sliced on the vocab axis (row stride > V) used to get gradients written at the wrong rows
    (and past the buffer); a target outside [0, V) read another row's logit. Now: the same gradient as the
    reference, and a NaN loss where the reference raises."""
    import pytest

    from trainer.loss import lm_loss_fused, lm_loss_reference

    g = torch.Generator().manual_seed(0)
    padded = torch.randn(3, 40, 301, generator=g).to(dev)
    targets = torch.randint(0, 300, (3, 40), generator=g).to(dev)
    grads = []
    for fn in (lm_loss_reference, lm_loss_fused):
        x = padded.clone().requires_grad_(True)
        fn(x[..., :300], targets).backward()
        grads.append(x.grad.cpu())
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-5 and not grads[1][..., 300:].any()
    for bad in (300, -100, -1):
        t = targets.clone()
        t[1, 5] = bad
        assert torch.isnan(lm_loss_fused(padded[..., :300], t))
        with pytest.raises((IndexError, RuntimeError)):
            lm_loss_reference(padded[..., :300], t)


def compare_all(dev):
    for V, rows, dtype in CASES:
        compare(V, rows, dtype, dev)
    strided_and_bad_targets(dev)


def test_fused_matches_reference():
    if torch.cuda.is_available():
        compare_all("cuda")
        return
    root = Path(__file__).resolve().parent.parent
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); sys.path.insert(0, {str(root / 'tests')!r}); "
            "from test_trainer_loss import compare_all; compare_all('cpu')")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
