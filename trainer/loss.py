"""Next-token loss with RWKV-LM's L2Wrap: a plain PyTorch reference and a fused Triton path.

loss = weight × mean_rows CE(logits, targets), with L2Wrap adding weight × g × 1e-4 / rows × max_logit
at each row's argmax to the logits' gradient (RWKV-LM `L2Wrap`, the form scaled by the incoming
gradient g, as trainer.models.rwkv7.L2Wrap).

`lm_loss_reference`: F.cross_entropy in fp32 + `l2wrap`. On the GPU it materialises fp32 copies of
the [rows, V] logits in forward and backward and L2Wrap adds three more full passes; with V = 65536
that is most of the memory traffic of a small model's step.
`lm_loss_fused`: two Triton kernels, one program per row. Forward: one pass over the row in blocks
with an online log-sum-exp and a first-index argmax; keeps only lse, max and argmax per row.
Backward: one pass writing g × (softmax − onehot(target) + 1e-4 × max × onehot(argmax)) / rows in the
logits' dtype. Nothing [rows, V]-sized is allocated besides the gradient itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.models.rwkv7 import l2wrap

L2WRAP = 1e-4
_NO_IGNORE = -(2**62)  # an ignore_index no target can have: F.cross_entropy then raises on -100 as on any
                       # other out-of-range target


def lm_loss_reference(logits: torch.Tensor, targets: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """logits [..., V], targets [...] in [0, V) -> weight × L2Wrap(mean CE). Every row counts (no ignore
    index: F.cross_entropy's -100 would be skipped here but not by the fused path, so it is an error)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.float()                               # CE in fp32 (fp64 for an fp64 model)
    ce = F.cross_entropy(flat, targets.reshape(-1), ignore_index=_NO_IGNORE)
    return l2wrap(ce, logits) * weight


_kernels = None


def _build():
    global _kernels
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def lm_loss_fwd_kernel(X, TGT, LSE, LOSS, MX, AMX, V, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_ptr = X + row * stride
        m = -float("inf")
        s = 0.0
        best = -float("inf")
        best_i = 0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            bm = tl.max(x, 0)
            bi = tl.argmax(x, 0)
            best_i = tl.where(bm > best, start + bi, best_i)  # strict: the first maximal index wins
            best = tl.maximum(best, bm)
            m_new = tl.maximum(m, bm)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(TGT + row)
        ok = (t >= 0) & (t < V)                  # an out-of-range target makes the loss NaN (no host sync)
        xt = tl.load(x_ptr + t, mask=ok, other=0.0).to(tl.float32)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(ok, lse - xt, float("nan")))
        tl.store(MX + row, best)
        tl.store(AMX + row, best_i)

    @triton.jit
    def lm_loss_bwd_kernel(X, DX, TGT, LSE, MX, AMX, SCALE, V, stride, l2: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_ptr = X + row * stride
        dx_ptr = DX + row * stride
        g = tl.load(SCALE)
        lse = tl.load(LSE + row)
        t = tl.load(TGT + row)
        amx = tl.load(AMX + row)
        mx = tl.load(MX + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            d = tl.exp(x - lse)
            d = tl.where(cols == t, d - 1.0, d)
            d = tl.where(cols == amx, d + l2 * mx, d)
            tl.store(dx_ptr + cols, (d * g).to(DX.dtype.element_ty), mask=mask)

    _kernels = (lm_loss_fwd_kernel, lm_loss_bwd_kernel)
    return _kernels


class _FusedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, weight):
        fwd, _ = _build()
        V = logits.shape[-1]
        x = logits.reshape(-1, V)
        if not x.is_contiguous():   # the kernels index rows by x's stride and write dx densely: one layout
            x = x.contiguous()
        t = targets.reshape(-1).contiguous()
        n = x.shape[0]
        lse = torch.empty(n, device=x.device, dtype=torch.float32)
        loss = torch.empty_like(lse)
        mx = torch.empty_like(lse)
        amx = torch.empty(n, device=x.device, dtype=torch.int64)
        fwd[(n,)](x, t, lse, loss, mx, amx, V, x.stride(0), BLOCK=4096, num_warps=8)
        ctx.save_for_backward(x, t, lse, mx, amx)
        ctx.weight, ctx.shape = weight, logits.shape
        return loss.sum() * (weight / n)

    @staticmethod
    def backward(ctx, g):
        _, bwd = _build()
        x, t, lse, mx, amx = ctx.saved_tensors
        n, V = x.shape
        scale = (g.float() * (ctx.weight / n)).reshape(1).contiguous()
        dx = torch.empty_like(x)
        bwd[(n,)](x, dx, t, lse, mx, amx, scale, V, x.stride(0), l2=L2WRAP, BLOCK=4096, num_warps=8)
        return dx.view(ctx.shape), None, None


def lm_loss_fused(logits: torch.Tensor, targets: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Same value and gradient as `lm_loss_reference` (fp32 arithmetic), one read of the logits
    forward and one read + one write backward. A target outside [0, V) gives a NaN loss (the reference
    raises; checking here would make every step wait for the GPU, and the trainer stops on a NaN loss)."""
    return _FusedLMLoss.apply(logits, targets, float(weight))


USE_FUSED: bool | None = None  # None: fused on CUDA (not fp64); bench/train.py sets False to time the reference


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, weight: float = 1.0, fused: bool | None = None):
    """The trainer's loss: fused on CUDA for fp32/bf16/fp16 logits (unless fused=False), else reference."""
    if fused is None:
        fused = USE_FUSED if USE_FUSED is not None else (logits.is_cuda and logits.dtype != torch.float64)
    return (lm_loss_fused if fused else lm_loss_reference)(logits, targets, weight)
