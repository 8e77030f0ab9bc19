"""The fused Triton loss (CE + L2Wrap) against the PyTorch reference: value and logits gradient.
Runs the kernels under TRITON_INTERPRET=1 on machines without a GPU."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from trainer.loss import lm_loss_fused, lm_loss_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


@pytest.mark.parametrize("V,rows,dtype", [(257, 6, torch.float32), (5000, 3, torch.float32), (4096, 4, torch.bfloat16)])
def test_fused_matches_reference(V, rows, dtype):
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(2, rows, V, generator=g) * 3).to(dtype).to(DEV)
    logits[0, 0, 7] = logits[0, 0].max() + 5         # a clear argmax for L2Wrap
    logits[1, 1, 3] = logits[1, 1, 9] = logits[1, 1].max() + 1  # a tie: the first index gets L2Wrap
    targets = torch.randint(0, V, (2, rows), generator=g).to(DEV)
    up = 0.7
    out = {}
    for name, fn in (("ref", lm_loss_reference), ("fused", lm_loss_fused)):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, targets, 0.25)
        (loss * up).backward()
        out[name] = (loss.detach().float(), x.grad.float())
    (lr, gr), (lf, gf) = out["ref"], out["fused"]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(lf, lr, rtol=1e-5), (lf, lr)
    assert ((gf - gr).norm() / gr.norm()) < tol
    assert torch.allclose(gf[0, 0, 7], gr[0, 0, 7], rtol=tol) and gf[1, 1, 9] == pytest.approx(gr[1, 1, 9].item(), rel=tol)
