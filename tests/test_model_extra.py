"""RWKV-7 model extras: `forward(last_only=True)` (the prompt pass of generation) against the full
forward's last row, and checkpoint loading from a run folder (its newest complete checkpoint)."""
from __future__ import annotations

import pytest
import torch

from trainer.models import RWKV7, CheckpointError, load_official
from trainer.models.checkpoint import load_state_dict, resolve_checkpoint
from trainer.models.rwkv7 import RWKV7Config
from trainer.testing import randomize_weights

TINY = RWKV7Config(n_layer=2, n_embd=64, vocab_size=300, head_size=32)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_last_only_is_the_full_forwards_last_row(dtype, tol):
    """last_only gives logits [B, 1, V] equal to the full forward's last row (to matmul rounding: the head
    runs on one row instead of T), and the same state, bit for bit, from the zero state and a carried one."""
    m = randomize_weights(RWKV7(TINY, init=False), 2).to(dtype).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, prior = m(idx[:, :5])
        for state in (None, prior):
            full, s_full = m(idx, state)
            last, s_last = m(idx, state, last_only=True)
            assert last.shape == (2, 1, TINY.vocab_size) and last.dtype == dtype
            err = ((last[:, 0] - full[:, -1]).norm() / full[:, -1].norm()).item()
            assert err < tol, err
            assert full[:, :-1].sub(full[:, -1:]).abs().max() > 1e-3  # the rows differ: picking the wrong one fails
            for a, b in zip(s_full, s_last):
                assert all(torch.equal(x, y) for x, y in zip(a, b))
        one, _ = m(idx[:, :1], last_only=True)  # T = 1: the whole output
        assert torch.equal(one, m(idx[:, :1])[0])


def save_tiny(folder, seed):
    model = randomize_weights(RWKV7(TINY, init=False), seed)
    folder.mkdir(parents=True)
    model.save_official(folder / "model.pth")
    return model.state_dict()


def test_run_folder_loads_its_newest_complete_checkpoint(tmp_path):
    """runs/NAME and runs/NAME/checkpoints stand for the highest step-N folder that holds model.pth: a
    higher step without it (a folder a killed copy left), temporary folders and other files are passed over."""
    run = tmp_path / "runs" / "demo"
    ck = run / "checkpoints"
    save_tiny(ck / "step-00000010", 1)
    newest = save_tiny(ck / "step-00000020", 2)
    (ck / "step-00000030").mkdir()                     # incomplete: no model.pth
    (ck / "step-00000030" / "resume.pt").write_bytes(b"")
    save_tiny(ck / ".tmp-step-00000040", 4)           # a save in progress
    (ck / "step-00000050").write_bytes(b"")            # a file, not a folder
    (run / "config.json").write_text("{}")
    for arg in (run, ck, str(run)):
        assert resolve_checkpoint(arg) == ck / "step-00000020" / "model.pth"
        sd = load_state_dict(arg)
        assert sd.keys() == newest.keys() and all(torch.equal(sd[k], newest[k]) for k in sd)
    got = load_official(run).state_dict()
    assert all(torch.equal(got[k], newest[k]) for k in newest)
    # numeric order, not text order: step-9 < step-10 with the trainer's unpadded names too
    other = tmp_path / "other"
    save_tiny(other / "checkpoints" / "step-9", 5)
    save_tiny(other / "checkpoints" / "step-10", 6)
    assert resolve_checkpoint(other) == other / "checkpoints" / "step-10" / "model.pth"
    # a checkpoint folder and a file still stand for themselves
    assert resolve_checkpoint(ck / "step-00000010") == ck / "step-00000010" / "model.pth"
    assert resolve_checkpoint(ck / "step-00000010" / "model.pth") == ck / "step-00000010" / "model.pth"


def test_run_folder_without_a_complete_checkpoint_is_one_clear_error(tmp_path):
    run = tmp_path / "empty-run"
    (run / "checkpoints" / "step-00000005").mkdir(parents=True)
    for arg in (run, run / "checkpoints"):
        with pytest.raises(CheckpointError, match=r"empty-run.*without a complete checkpoint.*1 step folder"):
            load_official(arg)
    (tmp_path / "bare-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"bare-run.*without a complete checkpoint.*0 step folder"):
        load_state_dict(tmp_path / "bare-run")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="plain: a folder without model.pth"):
        load_state_dict(tmp_path / "plain")


def test_a_state_of_another_layout_is_one_clear_error():
    """`step` zipped the blocks with the state, so a state with fewer layers ran only that many blocks and
    returned wrong logits without an error; forward ignored extra layers and failed deep inside on another
    batch or width. Both now check the state's layers and shapes against the model and idx."""
    m = randomize_weights(RWKV7(TINY, init=False), 3).eval()
    wide = RWKV7(RWKV7Config(n_layer=2, n_embd=128, vocab_size=300, head_size=32), init=False)
    with torch.no_grad():
        _, state = m(torch.tensor([[1, 2, 3]]))
        _, pair = m(torch.tensor([[1, 2, 3], [4, 5, 6]]))
        for bad, needle in ((state[:1], "state has 1 layers, the model has 2"),
                            (state + state, "state has 4 layers, the model has 2"),
                            (pair, "batch of 1"),
                            (wide.zero_state(1), r"expected \(att_shift, wkv, ffn_shift\)"),
                            ([(a, w) for a, w, _ in state], r"shapes \(\(1, 64\), \(1, 2, 32, 32\)\)")):
            with pytest.raises(ValueError, match=needle):
                m.step(torch.tensor([4]), bad)
            with pytest.raises(ValueError, match=needle):
                m(torch.tensor([[4, 5]]), bad)
        logits, _ = m.step(torch.tensor([4]), state)   # the right state still runs, as forward at T = 1
        torch.testing.assert_close(logits, m(torch.tensor([[4]]), state)[0][:, 0])


def test_config_rejects_widths_below_one(tmp_path):
    """head_size 0 raised ZeroDivisionError and a negative width a TypeError (through the trainer's config:
    tracebacks, not its ConfigError); n_layer 0 or vocab_size 0 built a model, and dim_* = 0 was silently
    replaced by the derived width. A checkpoint with a zero-width LoRA is one CheckpointError."""
    for field, value in (("head_size", 0), ("n_embd", -64), ("n_layer", 0), ("vocab_size", 0), ("dim_w", 0),
                         ("dim_ffn", 0), ("dim_g", -3), ("n_layer", 2.5), ("n_layer", True)):
        with pytest.raises(ValueError, match=f"RWKV7Config.{field} must be an integer >= 1"):
            RWKV7Config(**{"n_layer": 2, "n_embd": 64, "head_size": 32, field: value})
    assert RWKV7Config(n_layer=1, n_embd=64, head_size=32, dim_w=None).dim_w == 32   # None: derived
    sd = RWKV7(TINY, init=False).state_dict()
    for i in range(TINY.n_layer):
        sd[f"blocks.{i}.att.a1"] = torch.zeros(TINY.n_embd, 0)
        sd[f"blocks.{i}.att.a2"] = torch.zeros(0, TINY.n_embd)
    torch.save(sd, tmp_path / "zero_lora.pth")
    with pytest.raises(CheckpointError, match="zero_lora.pth: .*dim_a must be an integer >= 1"):
        load_official(tmp_path / "zero_lora.pth")


def test_one_layer_file_without_the_unused_v_lora_loads(tmp_path):
    """Layer 0's v-LoRA may be absent (the `rwkv` package ignores it), but a 1-layer file without it was
    refused ("missing blocks.0.att.v1": its width was read from that tensor). With more layers the gap in
    layer 1 is still named."""
    one = randomize_weights(RWKV7(RWKV7Config(n_layer=1, n_embd=64, vocab_size=300, head_size=32), init=False), 6)
    unused = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
    torch.save({k: v for k, v in one.state_dict().items() if k not in unused}, tmp_path / "one.pth")
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(load_official(tmp_path / "one.pth")(idx)[0], one(idx)[0], rtol=0, atol=0)
    two = RWKV7(TINY, init=False).state_dict()
    torch.save({k: v for k, v in two.items() if ".att.v" not in k or "value" in k}, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"missing \(3\): blocks\.1\.att\.v0, blocks\.1\.att\.v1, blocks\.1\.att\.v2"):
        load_official(tmp_path / "two.pth")


def test_every_parameter_follows_rwkv_lms_init():
    """Each tensor against RWKV-LM's x070 init rule, written out per channel as RWKV-LM's loops do
    (`RWKV_Tmix_x070.__init__`, `RWKV_CMix_x070.__init__`, `generate_init_weight`): the six token-shift mixes,
    w0 / a0 / v0 / k_k / k_a / r_k, zero LoRA "1" matrices and 0.1-orthogonal "2" matrices, the orthogonal
    gains of the big matrices, ln_x's layer scale and the LayerNorm defaults. head_size 32 and 3 layers, so
    the per-head zigzag and both layer ratios are exercised."""
    import math

    torch.manual_seed(0)
    cfg = RWKV7Config(n_layer=3, n_embd=96, vocab_size=500, head_size=32, dim_w=32, dim_a=64, dim_v=32, dim_g=64)
    m = RWKV7(cfg)
    C, L, N = cfg.n_embd, cfg.n_layer, cfg.head_size

    def close(t, values):
        torch.testing.assert_close(t.detach().double().reshape(-1), torch.tensor(values, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)

    def orthogonal(w, gain):   # rows or columns orthonormal times gain, whichever are fewer
        w = w.detach().double()
        g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(g, gain**2 * torch.eye(g.shape[0], dtype=torch.float64), rtol=0, atol=1e-5 * gain**2)

    for i, blk in enumerate(m.blocks):
        att, ffn = blk.att, blk.ffn
        r01, r10 = i / (L - 1), 1.0 - i / L
        ddd = [n / C for n in range(C)]
        for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            close(getattr(att, name), [1.0 - d ** (p * r10) for d in ddd])
        close(ffn.x_k, [1.0 - d ** (r10**4) for d in ddd])
        lin = [n / (C - 1) - 0.5 for n in range(C)]
        zz = [((n % N) - (N - 1) / 2) / ((N - 1) / 2) for n in range(C)]
        zz = [z * abs(z) for z in zz]
        close(att.w0, [-6 + 6 * (n / (C - 1)) ** (1 + r01**0.3) + 0.5 + 2.5 * zz[n] for n in range(C)])
        close(att.a0, [-0.19 + 0.3 * zz[n] + 0.4 * lin[n] for n in range(C)])
        close(att.v0, [0.73 - 0.4 * lin[n] for n in range(C)])
        close(att.k_k, [0.71 - 0.1 * lin[n] for n in range(C)])
        close(att.k_a, [1.02] * C)
        close(att.r_k, [-0.04] * C)
        for one, two in ((att.w1, att.w2), (att.a1, att.a2), (att.v1, att.v2), (att.g1, att.g2)):
            assert one.abs().max() == 0
            orthogonal(two, 0.1)                         # [D, C] with D < C: gain 1 x 0.1
        orthogonal(att.receptance.weight, 1.0)
        orthogonal(att.key.weight, 0.1)
        orthogonal(att.value.weight, 1.0)
        orthogonal(ffn.key.weight, 1.0)
        assert att.output.weight.abs().max() == 0 and ffn.value.weight.abs().max() == 0
        close(att.ln_x.weight, [((1 + i) / L) ** 0.7] * C)
        close(att.ln_x.bias, [0.0] * C)
        for ln in [blk.ln1, blk.ln2] + ([blk.ln0] if i == 0 else []):
            close(ln.weight, [1.0] * C)
            close(ln.bias, [0.0] * C)
    assert 0 < m.emb.weight.abs().max() <= 1e-4 and m.emb.weight.std() > 0.5e-4   # U(-1e-4, 1e-4)
    orthogonal(m.head.weight, 0.5 * math.sqrt(cfg.vocab_size / C))
    close(m.ln_out.weight, [1.0] * C)
    close(m.ln_out.bias, [0.0] * C)


def test_step_takes_one_token_per_sequence():
    """`step` with a [B, 1] idx (forward's layout) failed inside layer_norm with a shape message about its
    weight, and a 0-d idx with an IndexError; both are now one ValueError naming the expected [B]."""
    m = RWKV7(TINY, init=False)
    for idx in (torch.tensor([[1], [2]]), torch.tensor(3)):
        with pytest.raises(ValueError, match=r"RWKV7.step: idx must be \[B\]"):
            m.step(idx)


def test_loaded_parameters_are_contiguous(tmp_path):
    """A file written from transposed views (as conversion scripts make them) keeps their strides through
    torch.load, and load_official's copies kept them: strided parameters. Now every tensor is contiguous and
    the logits are unchanged."""
    model = randomize_weights(RWKV7(TINY, init=False), 9)
    sd = {k: (v.t().contiguous().t() if v.dim() == 2 else v) for k, v in model.state_dict().items()}
    assert sum(not v.is_contiguous() for v in sd.values()) > 10
    torch.save(sd, tmp_path / "strided.pth")
    loaded = load_official(tmp_path / "strided.pth")
    assert all(t.is_contiguous() for t in loaded.state_dict().values())
    idx = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
