"""RWKV-7 ("Goose", x070) language model: single device, official parameter names, infctx state.

Math, initialisation and optimizer groups follow BlinkDL's RWKV-LM `RWKV-v7/train_temp/src/model.py`;
the inference numerics (state layout, ln0 in block 0, unused v-LoRA in layer 0) follow the `rwkv` pip
package 0.8.x, which the tests use as the oracle. Facts collected in shared/specs/rwkv7.md.

The module tree mirrors RWKV-LM, so `state_dict()` keys are exactly the official checkpoint keys
(`emb.weight`, `blocks.{i}.att.w0`, ...). The WKV recurrence itself lives in `kernels.wkv7`.

State, per layer: (att_shift [B, C], wkv [B, H, N, N] fp32 (fp64 for an fp64 model), ffn_shift [B, C]).
The shifts hold the last token's LayerNorm output (ln1 for time-mix, ln2 for channel-mix), as in the
`rwkv` package; the WKV state is [value][key]. Nothing is detached: gradients flow into a state that
is passed in, which is what infctx back-propagation through segments needs.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.wkv7 import wkv7

DECAY_SCALE = 0.6065306597  # exp(-0.5): log decay = -DECAY_SCALE * sigmoid(w_raw), decay in (0.545, 1)


def _lora_dim(c: int, factor: float, power: float) -> int:
    """RWKV-LM's LoRA width rule: a multiple of 32, at least 32."""
    return max(32, int(round(factor * (c**power) / 32) * 32))


DERIVED_DIMS = ("dim_w", "dim_a", "dim_v", "dim_g", "dim_ffn")
"""RWKV7Config widths that None derives from n_embd."""


@dataclass
class RWKV7Config:
    """Shape of an RWKV-7 model. LoRA dims left as None come from the width by the formula of the
    RWKV-7 release (RWKV-LM at the x070 World release; also fla's defaults then), which reproduces the
    released checkpoints: 0.1B -> 64/64/32/128, 1.5B -> 96/96/64/256. (RWKV-LM's newest train_temp uses
    2.5/2.5/1.7/5 x sqrt(C), which differs at 1.5B: always read dims from tensors when loading.)"""

    n_layer: int = 12
    """number of blocks L"""
    n_embd: int = 768
    """width C; a multiple of head_size"""
    vocab_size: int = 65536
    """V (World vocab: 65536)"""
    head_size: int = 64
    """N; H = C / N heads"""
    dim_w: int | None = None
    """decay LoRA width (att.w1 [C, dim_w]); default max(32, round(1.8 sqrt(C) / 32) * 32)"""
    dim_a: int | None = None
    """in-context learning-rate LoRA width (att.a1); default as dim_w"""
    dim_v: int | None = None
    """value-residual LoRA width (att.v1); default max(32, round(1.3 sqrt(C) / 32) * 32)"""
    dim_g: int | None = None
    """gate LoRA width (att.g1); default max(32, round(0.6 C^0.8 / 32) * 32)"""
    dim_ffn: int | None = None
    """channel-mix hidden width (ffn.key [dim_ffn, C]); default 4C as in the released models"""

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "vocab_size", "head_size", *DERIVED_DIMS):
            v = getattr(self, name)
            if not (v is None and name in DERIVED_DIMS) and (
                    isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                also = " or None (derived from n_embd)" if name in DERIVED_DIMS else ""
                raise ValueError(f"RWKV7Config.{name} must be an integer >= 1{also}, got {v!r}")
        c = self.n_embd
        if c % self.head_size:
            raise ValueError(f"n_embd {c} is not a multiple of head_size {self.head_size}")
        self.dim_w = _lora_dim(c, 1.8, 0.5) if self.dim_w is None else self.dim_w
        self.dim_a = _lora_dim(c, 1.8, 0.5) if self.dim_a is None else self.dim_a
        self.dim_v = _lora_dim(c, 1.3, 0.5) if self.dim_v is None else self.dim_v
        self.dim_g = _lora_dim(c, 0.6, 0.8) if self.dim_g is None else self.dim_g
        self.dim_ffn = 4 * c if self.dim_ffn is None else self.dim_ffn

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


PRESETS: dict[str, RWKV7Config] = {
    "debug": RWKV7Config(n_layer=2, n_embd=128),
    "0.1b": RWKV7Config(n_layer=12, n_embd=768),  # RWKV-x070-World-0.1B
    "0.4b": RWKV7Config(n_layer=24, n_embd=1024),  # RWKV-x070-World-0.4B
    "1.5b": RWKV7Config(n_layer=24, n_embd=2048),  # RWKV-x070-World-1.5B
    "2.9b": RWKV7Config(n_layer=32, n_embd=2560),  # RWKV-x070-World-2.9B
}


def _shift(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """Previous token of each position: x [B, T, C], last [B, C] (None = zeros) -> [B, T, C]."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last.unsqueeze(1).to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def _act_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype activations run in: the autocast dtype when autocast is on, else x's dtype."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


@torch.compiler.disable
def _wkv(r, w, k, v, a, b, state):
    """WKV over [B, T, H, N] inputs from `state` ([B, H, N, N] or None) -> (y, final state fp32/fp64).
    T = 1 takes the one-step path; longer inputs go to kernels.wkv7 (Triton on CUDA, chunked torch on
    CPU). Kept out of torch.compile graphs: the kernels are their own autograd functions."""
    B, T, H, N = r.shape
    s_dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    state = r.new_zeros(B, H, N, N, dtype=s_dtype) if state is None else state.to(s_dtype)
    if T == 1:
        y, s = _wkv_one_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], state)
        return y.unsqueeze(1).to(r.dtype), s  # y in r's dtype, as from the kernels
    return wkv7(r, w, k, v, a, b, initial_state=state, output_final_state=True)


def _wkv_one_step(r, w, k, v, a, b, s):
    """One token of the WKV recurrence (the T = 1 path used in RNN-mode generation).
    r..b [B, H, N], s [B, H, N, N] [value][key] -> (y [B, H, N], new s). Same math as kernels.wkv7.naive;
    in the state's precision also under torch.autocast."""
    with torch.autocast(s.device.type, enabled=False):
        r, w, k, v, a, b = (t.to(s.dtype) for t in (r, w, k, v, a, b))
        sa = torch.einsum("bhij,bhj->bhi", s, a)  # [B, H, N]
        s = s * torch.exp(w).unsqueeze(-2) + sa.unsqueeze(-1) * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
        return torch.einsum("bhij,bhj->bhi", s, r), s


VEC_NAMES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
"""TimeMix's per-channel vectors, stored [1, 1, C] as in RWKV-LM; forward reads them as [C] views."""


class TimeMix(nn.Module):
    """RWKV-7 time mixing (the attention replacement): token shift, LoRAs, WKV, GroupNorm, bonus, gate."""

    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.first, self.H, self.N = layer_id == 0, cfg.n_head, cfg.head_size  # no int attr: compile reuse
        C = cfg.n_embd
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.w0 = nn.Parameter(torch.empty(1, 1, C))
        self.w1 = nn.Parameter(torch.empty(C, cfg.dim_w))
        self.w2 = nn.Parameter(torch.empty(cfg.dim_w, C))
        self.a0 = nn.Parameter(torch.empty(1, 1, C))
        self.a1 = nn.Parameter(torch.empty(C, cfg.dim_a))
        self.a2 = nn.Parameter(torch.empty(cfg.dim_a, C))
        v_lora = (torch.empty(1, 1, C), torch.empty(C, cfg.dim_v), torch.empty(cfg.dim_v, C))
        for name, t in zip(("v0", "v1", "v2"), v_lora):
            if layer_id == 0:  # unused in layer 0 (v_first = v), kept for the official layout; no gradient
                self.register_buffer(name, t)
            else:
                setattr(self, name, nn.Parameter(t))
        self.g1 = nn.Parameter(torch.empty(C, cfg.dim_g))
        self.g2 = nn.Parameter(torch.empty(cfg.dim_g, C))
        self.k_k = nn.Parameter(torch.empty(1, 1, C))
        self.k_a = nn.Parameter(torch.empty(1, 1, C))
        self.r_k = nn.Parameter(torch.empty(self.H, self.N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.H, C, eps=64e-5)

    def vectors(self) -> dict[str, torch.Tensor]:
        """The [1, 1, C] vectors as [C] views, by name (see `Block.forward` for why)."""
        return {name: getattr(self, name).view(-1) for name in VEC_NAMES}

    def forward(self, x, v_first, shift, wkv_state, vec: dict[str, torch.Tensor] | None = None):
        """x [B, T, C] (ln1 output); v_first [B, T, C] or None in layer 0; shift [B, C] or None;
        wkv_state [B, H, N, N] or None; vec: `self.vectors()` (None: taken here)
        -> (out [B, T, C], v_first, new shift [B, C], new wkv state)."""
        B, T, C = x.shape
        H, N = self.H, self.N
        p = self.vectors() if vec is None else vec  # [C] each
        last = x[:, -1].clone()  # no view of the input leaves the block (compiled-graph aliasing)
        dt = _act_dtype(x)  # bf16 under autocast (as RWKV-LM's bf16 training), else the model's dtype
        x = x.to(dt)
        xx = _shift(x, shift) - x
        mix = [torch.addcmul(x, xx, p[m].to(dt)) for m in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]
        xr, xw, xk, xv, xa, xg = mix

        r = self.receptance(xr)  # [B, T, C]
        k = self.key(xk)
        v = self.value(xv)
        if self.first:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(p["v0"].to(dt) + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(p["a0"].to(dt) + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        # log decay in fp32 (fp64 for an fp64 model): long-range decay products amplify its rounding
        wdt = torch.float64 if dt == torch.float64 else torch.float32
        w = -DECAY_SCALE * torch.sigmoid(p["w0"].to(wdt) + (torch.tanh(xw @ self.w1) @ self.w2).to(wdt))

        kk = F.normalize((k * p["k_k"].to(dt)).view(B, T, H, N), dim=-1, p=2.0)  # [B, T, H, N]
        k = k * (1 + (a - 1) * p["k_a"].to(dt))
        r4, w4, k4, v4 = (t.reshape(B, T, H, N) for t in (r, w, k, v))
        y, s = _wkv(r4.to(dt), w4, k4.to(dt), v4.to(dt), (-kk).to(dt), (kk * a.view(B, T, H, N)).to(dt), wkv_state)

        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C).to(dt)
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * self.r_k.to(dt)).sum(-1, keepdim=True) * v.view(B, T, H, N)
        y = y + bonus.view(B, T, C).to(dt)
        return self.output(y * g.to(dt)), v_first, last, s


class ChannelMix(nn.Module):
    """RWKV-7 channel mixing: token shift, then W_v relu(W_k x)^2."""

    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x, shift, x_k: torch.Tensor | None = None):
        """x [B, T, C] (ln2 output), shift [B, C] or None; x_k: `self.x_k` as a [C] view (None: taken
        here) -> (out [B, T, C], new shift [B, C])."""
        last = x[:, -1].clone()  # no view of the input leaves the block (compiled-graph aliasing)
        x = x.to(_act_dtype(x))
        x_k = self.x_k.view(-1) if x_k is None else x_k  # [C]
        k = torch.addcmul(x, _shift(x, shift) - x, x_k.to(x.dtype))
        return self.value(torch.relu(self.key(k)) ** 2), last


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.first = layer_id == 0
        if self.first:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, v_first, state):
        """x [B, T, C]; state (att_shift, wkv, ffn_shift) or None -> (x, v_first, new state).
        The [1, 1, C] parameters enter `_body` (what `apply_compile` compiles) as [C] views made here,
        outside any graph: torch 2.11's compiled backward returns a [1, 1, C] graph input's gradient
        as [C] and autograd rejects it ("invalid gradient ... expected shape compatible with [1, 1, C]")."""
        return self._body(x, v_first, state, self.att.vectors(), self.ffn.x_k.view(-1))

    def _body(self, x, v_first, state, att_vec: dict[str, torch.Tensor], ffn_xk: torch.Tensor):
        if self.first:
            x = self.ln0(x)
        att_shift, wkv, ffn_shift = state if state is not None else (None, None, None)
        dx, v_first, att_shift, wkv = self.att(self.ln1(x), v_first, att_shift, wkv, att_vec)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift, ffn_xk)
        return x + dx, v_first, (att_shift, wkv, ffn_shift)


@dataclass(frozen=True)
class StepWeights:
    """What `RWKV7.step` reads, gathered once per model (`RWKV7.step_weights()`): detached views of the
    parameters (matrices transposed for `x @ W.T`), the six token-shift vectors stacked [6, 1, C] and the
    decay bias w0 in the state dtype. Valid only until a parameter changes (in place, moved or replaced):
    most fields are views of the parameters but some are copies, so a stale one mixes old and new numbers."""

    dtype: torch.dtype
    """the model's dtype: activations run in it (no autocast in RNN mode)"""
    state_dtype: torch.dtype
    """WKV state and log decay: fp32 (fp64 for an fp64 model)"""
    n_head: int
    head_size: int
    eps: float
    """LayerNorm eps"""
    emb: torch.Tensor
    """[V, C]"""
    ln0: tuple[torch.Tensor, torch.Tensor]
    layers: tuple[tuple, ...]
    """one tuple per block, in the order `_block_step` unpacks it"""
    ln_out: tuple[torch.Tensor, torch.Tensor]
    head_t: torch.Tensor
    """[C, V]"""


def _block_step(x, v_first, att_shift, wkv, ffn_shift, p: tuple, sw: StepWeights):
    """One block for one token, no T axis: x [B, C] -> (x, v_first [B, C], (ln1 out [B, C], wkv [B, H, N, N],
    ln2 out [B, C])). The same math as `Block._body` at T = 1 with `_wkv_one_step`, with the T axis and the
    no-op dtype casts left out and the six token-shift mixes done as one broadcast addcmul."""
    (ln1_w, ln1_b, maa, r_t, k_t, v_t, o_t, w0, w1, w2, a0, a1, a2, v0, v1, v2, g1, g2,
     k_k, one_minus_ka, k_a, r_k, lnx_w, lnx_b, ln2_w, ln2_b, f_xk, f_kt, f_vt) = p
    B, C = x.shape
    H, N, sdt = sw.n_head, sw.head_size, sw.state_dtype
    cast = sw.dtype != sdt
    h = F.layer_norm(x, (C,), ln1_w, ln1_b, sw.eps)  # [B, C], also the next token's att shift
    xr, xw, xk, xv, xa, xg = torch.addcmul(h, att_shift - h, maa).unbind(0)  # maa [6, 1, C] -> 6 x [B, C]
    r = torch.mm(xr, r_t)
    k = torch.mm(xk, k_t)
    v = torch.mm(xv, v_t)
    if v0 is None:  # block 0
        v_first = v
    else:
        v = torch.addcmul(v, v_first - v, torch.sigmoid(torch.addmm(v0, torch.mm(xv, v1), v2)))
    a = torch.sigmoid(torch.addmm(a0, torch.mm(xa, a1), a2))  # in-context learning rate
    g = torch.mm(torch.sigmoid(torch.mm(xg, g1)), g2)
    lora_w = torch.tanh(torch.mm(xw, w1))
    lw = torch.mm(lora_w, w2).to(sdt) + w0 if cast else torch.addmm(w0, lora_w, w2)
    decay = torch.exp(torch.sigmoid(lw) * -DECAY_SCALE)  # [B, C] in sdt

    kk = (k * k_k).view(B, H, N)
    kk = kk / torch.linalg.vector_norm(kk, dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize
    k = k * torch.addcmul(one_minus_ka, a, k_a)  # k * (1 + (a - 1) * k_a)
    r4, k4, v4 = r.view(B, H, N), k.view(B, H, N), v.view(B, H, N)
    b = kk * a.view(B, H, N)
    if cast:
        kk, b, rs, ks, vs = (t.to(sdt) for t in (kk, b, r4, k4, v4))
    else:
        rs, ks, vs = r4, k4, v4
    # s <- s diag(decay) + (s a) b^T + v k^T with a = -kk ([value][key], as `_wkv_one_step`)
    sk = torch.matmul(wkv, kk.unsqueeze(-1))  # [B, H, N, 1] = -(s a)
    s = torch.addcmul(wkv * decay.view(B, H, 1, N), sk, b.unsqueeze(-2), value=-1)
    s = torch.addcmul(s, vs.unsqueeze(-1), ks.unsqueeze(-2))  # [B, H, N, N]
    y = torch.matmul(s, rs.unsqueeze(-1)).view(B, C)
    if cast:
        y = y.to(sw.dtype)
    y = F.group_norm(y, H, lnx_w, lnx_b, 64e-5)
    y = y + ((r4 * k4 * r_k).sum(-1, keepdim=True) * v4).view(B, C)  # bonus
    x = x + torch.mm(y * g, o_t)

    h2 = F.layer_norm(x, (C,), ln2_w, ln2_b, sw.eps)  # [B, C], also the next token's ffn shift
    kf = torch.relu(torch.mm(torch.addcmul(h2, ffn_shift - h2, f_xk), f_kt))
    return x + torch.mm(kf * kf, f_vt), v_first, (h, s, h2)


class RWKV7(nn.Module):
    """The RWKV-7 language model. `RWKV7(cfg)` applies the official from-scratch init in __init__
    (`init=False` leaves the tensors uninitialised, for loading a checkpoint)."""

    def __init__(self, cfg: RWKV7Config, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if init:
            self.init_weights()

    def forward(self, idx: torch.Tensor, state: list | None = None, last_only: bool = False):
        """idx [B, T] int64 -> (logits [B, T, V], state: n_layer tuples (att_shift [B, C],
        wkv [B, H, N, N], ffn_shift [B, C])). Passing the state back continues the sequence exactly.
        last_only: logits [B, 1, V] of the last position only (ln_out and head on x[:, -1:]), as the `rwkv`
        package computes by default: a prompt pass needs only that row, and the head is V x C per position."""
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"RWKV7.forward: idx must be [B, T] with T >= 1, got {tuple(idx.shape)}")
        if state is not None:
            self.check_state(state, idx.shape[0], "RWKV7.forward")
        x = self.emb(idx)  # [B, T, C]
        v_first = None
        new_state = []
        for i, block in enumerate(self.blocks):
            x, v_first, s = block(x, v_first, None if state is None else state[i])
            new_state.append(s)
        if last_only:
            x = x[:, -1:]  # [B, 1, C]
        return self.head(self.ln_out(x)), new_state

    def zero_state(self, batch: int, device=None, dtype=None) -> list:
        """The state at the start of a sequence (what `state=None` means), e.g. to carry in a trainer."""
        cfg = self.cfg
        device = device or self.emb.weight.device
        dtype = dtype or self.emb.weight.dtype
        s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        H, N, C = cfg.n_head, cfg.head_size, cfg.n_embd
        return [(torch.zeros(batch, C, device=device, dtype=dtype),
                 torch.zeros(batch, H, N, N, device=device, dtype=s_dtype),
                 torch.zeros(batch, C, device=device, dtype=dtype)) for _ in range(cfg.n_layer)]

    def check_state(self, state: list, batch: int, where: str = "RWKV7") -> None:
        """Raise a ValueError unless `state` is this model's for `batch` sequences: n_layer entries of
        (att_shift [B, C], wkv [B, H, N, N], ffn_shift [B, C]). Without it a state with fewer layers made
        `step` run only that many blocks (zip stops early) and give wrong logits without an error."""
        cfg = self.cfg
        if len(state) != cfg.n_layer:
            raise ValueError(f"{where}: state has {len(state)} layers, the model has {cfg.n_layer}")
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        want = ((batch, C), (batch, H, N, N), (batch, C))
        for i, layer in enumerate(state):
            got = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in layer)
            if got != want:
                raise ValueError(f"{where}: state layer {i} has shapes {got}, expected (att_shift, wkv, ffn_shift) "
                                 f"{want} for idx's batch of {batch}")

    @torch.no_grad()
    def step_weights(self) -> StepWeights:
        """Gather what `step` reads (see `StepWeights`): once per model, then reused for every token."""
        dt = self.emb.weight.dtype
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        layers = []
        for blk in self.blocks:
            att, ffn = blk.att, blk.ffn
            p = {name: t.detach() for name, t in att.named_parameters()} | {name: t for name, t in att.named_buffers()}
            vec = {name: p[name].view(-1) for name in VEC_NAMES}  # [C] each
            maa = torch.stack([vec[m] for m in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]).unsqueeze(1)  # [6, 1, C]
            v_lora = (None, None, None) if blk.first else (vec["v0"], p["v1"], p["v2"])
            layers.append((
                blk.ln1.weight.detach(), blk.ln1.bias.detach(), maa,
                p["receptance.weight"].t(), p["key.weight"].t(), p["value.weight"].t(), p["output.weight"].t(),
                vec["w0"].to(sdt), p["w1"], p["w2"], vec["a0"], p["a1"], p["a2"], *v_lora, p["g1"], p["g2"],
                vec["k_k"], 1 - vec["k_a"], vec["k_a"], p["r_k"], p["ln_x.weight"], p["ln_x.bias"],
                blk.ln2.weight.detach(), blk.ln2.bias.detach(),
                ffn.x_k.detach().view(-1), ffn.key.weight.detach().t(), ffn.value.weight.detach().t()))
        ln0 = self.blocks[0].ln0
        return StepWeights(dtype=dt, state_dtype=sdt, n_head=self.cfg.n_head, head_size=self.cfg.head_size,
                           eps=ln0.eps, emb=self.emb.weight.detach(), ln0=(ln0.weight.detach(), ln0.bias.detach()),
                           layers=tuple(layers), ln_out=(self.ln_out.weight.detach(), self.ln_out.bias.detach()),
                           head_t=self.head.weight.detach().t())

    def step(self, idx: torch.Tensor, state: list | None = None, weights: StepWeights | None = None):
        """One token per sequence, the RNN-mode decoding path: idx [B] int64 -> (logits [B, V], new state in
        `forward`'s layout). Equals `forward(idx[:, None], state)` (to rounding) with a fraction of its ops:
        [B, C] tensors and each parameter read once from `weights` (`self.step_weights()`, made here when
        None: pass it in when stepping many tokens). Inference only: no gradient reaches the parameters."""
        if idx.dim() != 1:   # a [B, 1] idx reached layer_norm as [B, 1, C] and failed there with a shape message
            raise ValueError(f"RWKV7.step: idx must be [B] (one token per sequence), got {tuple(idx.shape)}")
        w = self.step_weights() if weights is None else weights
        if state is None:
            state = self.zero_state(idx.shape[0], idx.device)
        else:   # as forward takes it: this model's layout and batch; shifts in the weights' dtype, WKV state in its own
            self.check_state(state, idx.shape[0], "RWKV7.step")
            state = [(a.to(w.dtype), s.to(w.state_dtype), f.to(w.dtype)) for a, s, f in state]
        x = F.embedding(idx, w.emb)  # [B, C]
        C = x.shape[1]
        x = F.layer_norm(x, (C,), *w.ln0, w.eps)
        v_first = None
        new_state = []
        for p, (att_shift, wkv, ffn_shift) in zip(w.layers, state):
            x, v_first, s = _block_step(x, v_first, att_shift, wkv, ffn_shift, p, w)
            new_state.append(s)
        return torch.mm(F.layer_norm(x, (C,), *w.ln_out, w.eps), w.head_t), new_state

    @torch.no_grad()
    def init_weights(self):
        """RWKV-LM's from-scratch init (`RWKV_Tmix_x070.__init__` and `generate_init_weight`)."""
        cfg = self.cfg
        L, C, N, V = cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.vocab_size
        dev = self.emb.weight.device
        n = torch.arange(C, device=dev, dtype=torch.float64)
        ddd = n / C
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()

        def ortho(p: torch.Tensor, gain: float):
            if gain == 0:
                p.zero_()
            else:
                tmp = torch.empty(p.shape, device=p.device, dtype=torch.float32)
                nn.init.orthogonal_(tmp, gain=gain)
                p.copy_(tmp)

        def lora2(p: torch.Tensor, scale: float):  # ortho_init: extra gain sqrt(rows/cols) for tall matrices
            gain = math.sqrt(p.shape[0] / p.shape[1]) if p.shape[0] > p.shape[1] else 1.0
            ortho(p, gain * scale)

        def put(p: torch.Tensor, values: torch.Tensor):
            p.copy_(values.reshape(p.shape).to(p.dtype))

        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        ortho(self.head.weight, 0.5 * math.sqrt(V / C) if V > C else 0.5)
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for i, blk in enumerate(self.blocks):
            att, ffn = blk.att, blk.ffn
            r01 = i / (L - 1) if L > 1 else 0.0
            r10 = 1.0 - i / L
            for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
                put(getattr(att, name), 1.0 - ddd ** (p * r10))
            www = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
            put(att.w0, www + 0.5 + zigzag * 2.5)
            put(att.a0, -0.19 + zigzag * 0.3 + linear * 0.4)
            put(att.v0, 0.73 - linear * 0.4)
            put(att.k_k, 0.71 - linear * 0.1)
            att.k_a.fill_(1.02)
            att.r_k.fill_(-0.04)
            for one, two in ((att.w1, att.w2), (att.a1, att.a2), (att.v1, att.v2), (att.g1, att.g2)):
                one.zero_()
                lora2(two, 0.1)
            ortho(att.receptance.weight, 1.0)
            ortho(att.key.weight, 0.1)
            ortho(att.value.weight, 1.0)
            ortho(att.output.weight, 0.0)
            att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
            put(ffn.x_k, 1.0 - ddd ** (r10**4))
            ortho(ffn.key.weight, 1.0)
            ortho(ffn.value.weight, 0.0)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """RWKV-LM's `configure_optimizers` groups: `att.w0` at 2x lr without decay; weight decay only
        on >=2-D `.weight` matrices (and only if weight_decay > 0); everything else 1x, no decay.
        Each group has "params", "names", "weight_decay" and "lr_scale"; empty groups are left out."""
        one, two, decay = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if "att.w0" in name:
                two.append((name, p))
            elif weight_decay > 0 and p.squeeze().dim() >= 2 and ".weight" in name:
                decay.append((name, p))
            else:
                one.append((name, p))
        groups = [(one, 0.0, 1.0), (two, 0.0, 2.0), (decay, weight_decay, 1.0)]
        return [{"params": [p for _, p in g], "names": [n for n, _ in g], "weight_decay": wd, "lr_scale": s}
                for g, wd, s in groups if g]

    def save_official(self, path, dtype: torch.dtype | None = None) -> None:
        """Write the official RWKV-LM state dict (.pth, or .safetensors by suffix), atomically."""
        from .checkpoint import save_state_dict

        sd = {k: (t if dtype is None else t.to(dtype)) for k, t in self.state_dict().items()}
        save_state_dict(sd, path)


def apply_compile(model: RWKV7, **compile_kwargs) -> RWKV7:
    """torch.compile each block's body in place (as torchtitan's apply_compile, but `Block._body`, so
    the [1, 1, C] parameters enter the graphs as [C] views): all blocks share a few graphs (block 0
    differs by ln0 and v_first), and the WKV kernel runs between them, outside the graphs.
    Static shapes by default (`dynamic=False`): one graph set per sequence length (training uses one or
    two), which sidesteps dynamic-shape recompiles."""
    compile_kwargs.setdefault("dynamic", False)
    # AOTAutograd's on-disk cache, when it hits, replays the views these graphs return across the WKV
    # graph break with garbage sizes (seen with torch 2.13: "shape '[94856407487414, ...]' is invalid");
    # a cold compile is correct, so the cache is turned off (process-wide) for compiled RWKV-7 blocks.
    torch._functorch.config.enable_autograd_cache = False
    for blk in model.blocks:
        blk._body = torch.compile(blk._body, **compile_kwargs)
    return model


class L2Wrap(torch.autograd.Function):
    """RWKV-LM's L2Wrap: returns `loss` unchanged; in backward adds 1e-4 / (positions) x max logit at
    each position's argmax to the logits' gradient, keeping logits from drifting. Uses the corrected
    form (scaled by the incoming gradient), as RWKV-LM's comment notes."""

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        factor = 1e-4 / (y.numel() // y.shape[-1])  # 1e-4 / (B * T)
        maxx, ids = torch.max(y, -1, keepdim=True)
        gy = torch.zeros_like(y).scatter_(-1, ids, maxx * factor)
        return grad_output, grad_output * gy


def l2wrap(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """loss = l2wrap(cross_entropy(logits, targets), logits)."""
    return L2Wrap.apply(loss, logits)
