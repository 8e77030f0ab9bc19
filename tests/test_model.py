"""RWKV-7 model: presets and parameter counts, init, optimizer groups, L2Wrap, state carrying with
gradients, bf16 autocast, and checkpoint validation errors. (Parity with the `rwkv` package:
test_model_parity.py.)"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from trainer.models import PRESETS, RWKV7, CheckpointError, load_official, official_shapes
from trainer.models.rwkv7 import RWKV7Config, l2wrap


def rwkv_lm_param_count(L, C, V, dw, da, dv, dg, ffn=None):
    """RWKV-LM x070 parameter count, written out term by term from its module definitions."""
    ffn = ffn or 4 * C
    att = 6 * C + (C + 2 * C * dw) + (C + 2 * C * da) + (C + 2 * C * dv) + 2 * C * dg + 2 * C + C + 4 * C * C + 2 * C
    block = 2 * 2 * C + att + C + 2 * C * ffn
    return V * C + 2 * C + L * block + 2 * C + V * C  # emb, ln0, blocks, ln_out, head


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_count_matches_rwkv_lm(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = RWKV7(cfg, init=False)
    n = sum(t.numel() for t in model.state_dict().values())
    assert n == rwkv_lm_param_count(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.dim_w, cfg.dim_a, cfg.dim_v, cfg.dim_g)
    shapes = official_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    # trainable = all but layer 0's unused value-residual LoRA (kept as buffers, as RWKV-LM never trains it)
    unused = sum(math.prod(shapes[f"blocks.0.att.{k}"]) for k in ("v0", "v1", "v2"))
    assert sum(p.numel() for p in model.parameters()) == n - unused


def test_released_sizes():
    assert abs(sum(math.prod(s) for s in official_shapes(PRESETS["0.1b"]).values()) - 191e6) < 0.5e6
    assert abs(sum(math.prod(s) for s in official_shapes(PRESETS["1.5b"]).values()) - 1.53e9) < 0.01e9
    c = PRESETS["0.1b"]
    assert (c.dim_w, c.dim_a, c.dim_v, c.dim_g) == (64, 64, 32, 128)  # RWKV-x070-World-0.1B
    c = PRESETS["1.5b"]
    assert (c.dim_w, c.dim_a, c.dim_v, c.dim_g) == (96, 96, 64, 256)  # RWKV-x070-World-1.5B
    assert RWKV7Config(n_layer=2, n_embd=256, dim_w=40).dim_w == 40
    with pytest.raises(ValueError, match="head_size"):
        RWKV7Config(n_embd=100)


def test_official_init():
    torch.manual_seed(0)
    cfg = RWKV7Config(n_layer=3, n_embd=128, vocab_size=1000)
    m = RWKV7(cfg)
    C, L = cfg.n_embd, cfg.n_layer
    assert m.emb.weight.abs().max() <= 1e-4 and m.emb.weight.abs().max() > 0
    h = m.head.weight  # [V, C] orthogonal columns, gain 0.5 sqrt(V / C)
    gain = 0.5 * math.sqrt(cfg.vocab_size / C)
    assert torch.allclose(h.T @ h, gain**2 * torch.eye(C), atol=1e-3 * gain**2)
    for i, b in enumerate(m.blocks):
        att = b.att
        assert att.output.weight.abs().max() == 0 and b.ffn.value.weight.abs().max() == 0
        assert all(p.abs().max() == 0 for p in (att.w1, att.a1, att.v1, att.g1))
        assert torch.allclose(att.w2 @ att.w2.T, 0.01 * torch.eye(cfg.dim_w), atol=1e-5)
        k = att.key.weight
        assert torch.allclose(k @ k.T, 0.01 * torch.eye(C), atol=1e-5)
        assert torch.allclose(att.ln_x.weight, torch.full((C,), ((1 + i) / L) ** 0.7))
        r10, r01 = 1 - i / L, i / (L - 1)
        n = 5  # one channel, formulas from RWKV-LM
        assert att.x_r[0, 0, n].item() == pytest.approx(1 - (n / C) ** (0.2 * r10), rel=1e-6)
        assert b.ffn.x_k[0, 0, n].item() == pytest.approx(1 - (n / C) ** (r10**4), rel=1e-6)
        zz = ((n % 64) - 31.5) / 31.5
        w0 = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3) + 0.5 + 2.5 * zz * abs(zz)
        assert att.w0[0, 0, n].item() == pytest.approx(w0, rel=1e-6)
        assert att.k_a.eq(1.02).all() and att.r_k.eq(-0.04).all()
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    logits, _ = m(idx)
    # zero att.output and ffn.value: every block is the identity at init
    expect = m.head(m.ln_out(m.blocks[0].ln0(m.emb(idx))))
    torch.testing.assert_close(logits, expect)


def test_optimizer_groups_follow_rwkv_lm():
    m = RWKV7(PRESETS["debug"], init=False)
    groups = m.optimizer_groups(0.1)
    by_scale = {(g["lr_scale"], g["weight_decay"]): g for g in groups}
    assert set(by_scale) == {(1.0, 0.0), (2.0, 0.0), (1.0, 0.1)}
    assert by_scale[(2.0, 0.0)]["names"] == [f"blocks.{i}.att.w0" for i in range(2)]
    decay = set(by_scale[(1.0, 0.1)]["names"])
    assert {"emb.weight", "head.weight", "blocks.0.att.receptance.weight", "blocks.1.ffn.key.weight"} <= decay
    assert all(n.endswith(".weight") for n in decay)
    assert "blocks.1.att.w1" in by_scale[(1.0, 0.0)]["names"]  # 2-D but not .weight: no decay
    assert "blocks.0.att.ln_x.weight" not in decay  # 1-D
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert {(g["lr_scale"], g["weight_decay"]) for g in m.optimizer_groups(0.0)} == {(1.0, 0.0), (2.0, 0.0)}
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input


def test_l2wrap_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    ce = F.cross_entropy(logits.view(-1, 11), targets.view(-1))
    loss = l2wrap(ce, logits)
    assert loss.item() == ce.item()
    (3.0 * loss).backward()
    ref = logits.detach().clone().requires_grad_(True)
    (3.0 * F.cross_entropy(ref.view(-1, 11), targets.view(-1))).backward()
    maxx, ids = ref.detach().max(-1, keepdim=True)
    extra = torch.zeros_like(ref).scatter_(-1, ids, maxx * 1e-4 / 10) * 3.0
    assert torch.allclose(logits.grad, ref.grad + extra)


def _tiny(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = RWKV7Config(n_layer=2, n_embd=64, vocab_size=50, head_size=32, dim_w=32, dim_a=32, dim_v=32, dim_g=32)
    m = RWKV7(cfg).to(dtype)
    with torch.no_grad():  # move off the init's zeros so every path carries signal
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_state_carries_exactly_with_gradients_fp64():
    """Two segments through the returned state == one pass: logits, final state and every gradient."""
    m = _tiny()
    idx = torch.randint(0, 50, (2, 24))
    full, s_full = m(idx)
    (full.square().mean() + sum(s[1].sum() for s in s_full)).backward()
    g_full = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    a, s = m(idx[:, :10])
    b, s2 = m(idx[:, 10:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-12)
    for x, y in zip(s2, s_full):
        for u, v in zip(x, y):
            assert u.dtype == v.dtype and torch.allclose(u, v, rtol=1e-10, atol=1e-12)
    assert s2[0][1].dtype == torch.float64 and s2[0][1].shape == (2, 2, 32, 32)
    (torch.cat([a, b], 1).square().mean() + sum(t[1].sum() for t in s2)).backward()
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, g_full[n], rtol=1e-8, atol=1e-12), n
    # gradient reaches a state passed in from outside
    st = [tuple(t.clone().requires_grad_(True) for t in layer) for layer in m.zero_state(2)]
    out, _ = m(idx[:, :5], st)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in st[1])


def test_bf16_autocast_forward_backward():
    m = _tiny(torch.float32, seed=1)
    idx = torch.randint(0, 50, (2, 16))
    ref, _ = m(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = m(idx)
        loss = l2wrap(F.cross_entropy(out.float().view(-1, 50), idx.view(-1)), out)
    loss.backward()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-2
    assert state[0][1].dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_bf16_weights_forward_and_one_step():
    """A bf16 model without autocast (generation with --dtype bf16): sequence and T = 1 paths run."""
    m = _tiny(torch.float32, seed=2)
    idx = torch.randint(0, 50, (1, 12))
    ref, _ = m(idx)
    mb = _tiny(torch.float32, seed=2).to(torch.bfloat16)
    a, s = mb(idx[:, :11])
    b, _ = mb(idx[:, 11:], s)
    out = torch.cat([a, b], 1).float()
    assert out.dtype == torch.float32 and ((out - ref).norm() / ref.norm()).item() < 5e-2


def test_bad_checkpoints_one_clear_error(tmp_path):
    m = RWKV7(RWKV7Config(n_layer=2, n_embd=64, vocab_size=40, head_size=32), init=False)
    sd = {k: torch.zeros(v.shape) for k, v in m.state_dict().items()}
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    assert load_official(good).cfg.n_layer == 2
    bad = dict(sd)
    del bad["blocks.1.att.k_a"]
    bad["blocks.1.att.extra"] = torch.zeros(3)
    bad["blocks.0.ffn.value.weight"] = torch.zeros(64, 100)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_official(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "bad.pth" in msg and "blocks.1.att.k_a" in msg and "blocks.1.att.extra" in msg
    assert "blocks.0.ffn.value.weight (64, 100) (expected (64, 256))" in msg
    torch.save({"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_decay": torch.zeros(4)}, tmp_path / "v6.pth")
    with pytest.raises(CheckpointError, match="v6.pth: not an RWKV-7 checkpoint.*RWKV-6"):
        load_official(tmp_path / "v6.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: cannot be read"):
        load_official(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_official(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        load_official(tmp_path / "absent.pth")
    (tmp_path / "step-1").mkdir()                  # a checkpoint folder stands for its model.pth
    with pytest.raises(CheckpointError, match="step-1: a folder without model.pth"):
        load_official(tmp_path / "step-1")
    torch.save(sd, tmp_path / "step-1" / "model.pth")
    assert load_official(tmp_path / "step-1").cfg == load_official(good).cfg
    # tensors the config is read from, misshaped: the same one error, naming the file and the key
    for key, shape in (("blocks.0.att.r_k", (64,)), ("blocks.0.att.w1", (64,)), ("emb.weight", (40, 64, 1)),
                       ("blocks.0.att.r_k", (2, 30))):
        odd = dict(sd, **{key: torch.zeros(shape)})
        torch.save(odd, tmp_path / "odd.pth")
        with pytest.raises(CheckpointError, match=rf"odd\.pth: .*{key.replace('.', chr(92) + '.')}"):
            load_official(tmp_path / "odd.pth")


def test_save_is_atomic_and_keeps_dtype(tmp_path):
    m = _tiny(torch.float32)
    m.save_official(tmp_path / "m.pth", dtype=torch.bfloat16)
    m.save_official(tmp_path / "m.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["m.pth", "m.safetensors"]  # no temp files left
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    assert set(sd) == set(official_shapes(m.cfg)) and all(t.dtype == torch.bfloat16 for t in sd.values())
    back = load_official(tmp_path / "m.safetensors")
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.slow
def test_apply_compile_matches_eager():
    """Per-block torch.compile (the fast training path) == eager: logits, carried state, gradients."""
    from trainer.models.rwkv7 import apply_compile

    eager, comp = _tiny(torch.float32, seed=3), apply_compile(_tiny(torch.float32, seed=3))
    idx = torch.randint(0, 50, (2, 40))
    outs = []
    for m in (eager, comp):
        a, s = m(idx[:, :25])
        b, s = m(idx[:, 25:], s)
        (torch.cat([a, b], 1).square().mean() + s[-1][1].sum()).backward()
        outs.append((torch.cat([a, b], 1).detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    for n, g in outs[0][1].items():  # fp32 reassociation only
        assert ((outs[1][1][n] - g).norm() / g.norm()).item() < 1e-4, n


def test_one_token_wkv_step_stays_in_state_precision_under_autocast():
    """The T = 1 WKV step (generation, infctx length-1 segments) computes in the state's dtype also under
    torch.autocast (its einsums used to run in bf16: 1.5e-4 from the fp32 result)."""
    from trainer.models.rwkv7 import _wkv_one_step
    g = torch.Generator().manual_seed(0)
    r, w, k, v, a, b = (torch.randn(2, 3, 64, generator=g) for _ in range(6))
    w = -0.6 * torch.sigmoid(w)
    s = torch.randn(2, 3, 64, 64, generator=g)
    y0, s0 = _wkv_one_step(r, w, k, v, a, b, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, s1 = _wkv_one_step(r, w, k, v, a, b, s)
    assert s1.dtype == torch.float32 and torch.equal(s1, s0) and torch.equal(y1, y0)


def test_model_review_fixes(tmp_path):
    """A review of checkpoint IO and the model's API: a file without layer 0's unused v-LoRA (the `rwkv`
    package loads it) was refused; {"state_dict": ...} wrappers and DDP / torch.compile prefixes were not
    taken off; a legacy-format torch file got an mmap message; `step` broadcast a batch-1 state over two
    tokens and failed on a state of another dtype; forward at T = 0 raised a bare IndexError."""
    model = _tiny(torch.float32)
    sd = model.state_dict()
    idx = torch.tensor([[3, 7, 11]])
    with torch.no_grad():
        ref = model(idx)[0]

    def loads_same(obj, name, **save_kw):
        path = tmp_path / name
        torch.save(obj, path, **save_kw)
        with torch.no_grad():
            got = load_official(path)(idx)[0]
        assert torch.equal(got, ref), name

    loads_same({k: v for k, v in sd.items() if k not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")},
               "no_v0.pth")
    loads_same({"state_dict": sd, "epoch": 3}, "wrapped.pth")
    loads_same({"module." + k: v for k, v in sd.items()}, "ddp.pth")
    loads_same({"_orig_mod." + k: v for k, v in sd.items()}, "compiled.pth")
    loads_same(dict(sd), "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save(sd, tmp_path / "bare.pth")
    with torch.no_grad():
        assert torch.equal(load_official(tmp_path / "bare")(idx)[0], ref)     # NAME for NAME.pth, as `rwkv`
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pth: cannot be read") as e:
        load_official(tmp_path / "text.pth")
    assert "mmap" not in str(e.value)

    with torch.no_grad():
        with pytest.raises(ValueError, match="T >= 1"):
            model(torch.zeros(1, 0, dtype=torch.long))
        state = model.zero_state(1)
        with pytest.raises(ValueError, match=r"expected .* for idx's batch of 2"):
            model.step(torch.tensor([1, 2]), state)
        s64 = model.zero_state(1, dtype=torch.float64)
        assert torch.allclose(model.step(torch.tensor([5]), s64)[0], model.step(torch.tensor([5]), state)[0])
