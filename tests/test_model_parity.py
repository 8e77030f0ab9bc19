"""RWKV-7 model vs the `rwkv` pip package (the inference oracle), on random weights in the official layout.

LoRA widths (24/40/16/48) differ from every preset, so a loader that assumes preset widths fails here.
Every tensor is nonzero random, so no term of the forward can be silently dropped.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ["RWKV_V7_ON"] = "1"
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ["RWKV_CUDA_ON"] = "0"
from rwkv.model import RWKV  # noqa: E402

from trainer.models import RWKV7, load_official  # noqa: E402
from trainer.models.rwkv7 import RWKV7Config  # noqa: E402
from trainer.testing import randomize_weights  # noqa: E402

CFG = RWKV7Config(n_layer=2, n_embd=128, vocab_size=300, dim_w=24, dim_a=40, dim_v=16, dim_g=48)
TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_weights(RWKV7(CFG, init=False), seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "rand.pth"
    model.save_official(path)
    return model, path


def oracle(path):
    return RWKV(model=str(path)[: -len(".pth")], strategy="cpu fp32")


def tokens(n=100, seed=2):
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_match_rwkv_package(ckpt):
    model, path = ckpt
    ref = oracle(path)
    toks = tokens()
    ref_logits, ref_state = ref.forward(toks, None, full_output=True)
    assert all(t.abs().min() > 0 for t in model.state_dict().values())  # every tensor nonzero
    logits, state = model(torch.tensor([toks]))
    assert rel(logits[0], ref_logits) < TOL
    for i, (att_shift, wkv, ffn_shift) in enumerate(state):
        assert rel(att_shift[0], ref_state[3 * i]) < TOL
        assert rel(wkv[0], ref_state[3 * i + 1]) < TOL
        assert rel(ffn_shift[0], ref_state[3 * i + 2]) < TOL
    # float64 model (the trainer's exact-gradient path) agrees too
    m64 = RWKV7(CFG, init=False)
    m64.load_state_dict(model.state_dict())
    logits64, _ = m64.double()(torch.tensor([toks]))
    assert logits64.dtype == torch.float64 and rel(logits64[0], ref_logits) < TOL


def test_two_parts_through_state_match(ckpt):
    model, path = ckpt
    ref = oracle(path)
    toks = tokens()
    ref_logits, _ = ref.forward(toks, None, full_output=True)
    la, state = model(torch.tensor([toks[:37]]))
    lb, state = model(torch.tensor([toks[37:]]), state)
    assert rel(torch.cat([la[0], lb[0]]), ref_logits) < TOL
    # the oracle fed in two parts, and token by token through our T = 1 path, agree too
    ra, rs = ref.forward(toks[:37], None, full_output=True)
    rb, _ = ref.forward(toks[37:], [t.clone() for t in rs], full_output=True)
    assert rel(torch.cat([ra, rb]), ref_logits) < TOL
    state, steps = None, []
    for t in toks[:20]:
        lo, state = model(torch.tensor([[t]]), state)
        steps.append(lo[0, 0])
    assert rel(torch.stack(steps), ref_logits[:20]) < TOL


def test_saved_file_loads_in_rwkv_package(ckpt, tmp_path):
    model, path = ckpt
    loaded = load_official(path)  # our loader: dims from tensors
    assert (loaded.cfg.dim_w, loaded.cfg.dim_a, loaded.cfg.dim_v, loaded.cfg.dim_g) == (24, 40, 16, 48)
    out = tmp_path / "resaved.pth"
    loaded.save_official(out)
    toks = tokens(seed=3)
    ref_logits, _ = oracle(out).forward(toks, None, full_output=True)
    mine, _ = model(torch.tensor([toks]))
    assert rel(mine[0], ref_logits) < TOL
    # safetensors round trip gives the same model
    st = tmp_path / "resaved.safetensors"
    loaded.save_official(st)
    again, _ = load_official(st)(torch.tensor([toks]))
    assert rel(again[0], ref_logits) < TOL


def test_comparison_has_power(ckpt, tmp_path):
    """The oracle ignores blocks.0.att.v0/v1/v2 and uses every other tensor: perturbing layer 1's v0
    must break parity (so the tolerance can fail), perturbing layer 0's must not."""
    model, path = ckpt
    toks = tokens(seed=4)
    for key, should_change in (("blocks.0.att.v0", False), ("blocks.1.att.v0", True), ("blocks.1.att.r_k", True)):
        m = RWKV7(CFG, init=False)
        sd = dict(model.state_dict())
        sd[key] = sd[key] + 0.5
        m.load_state_dict(sd)
        p = tmp_path / f"{key}.pth"
        m.save_official(p)
        ref_logits, _ = oracle(p).forward(toks, None, full_output=True)
        base, _ = model(torch.tensor([toks]))
        assert (rel(base[0], ref_logits) > 10 * TOL) == should_change, key
