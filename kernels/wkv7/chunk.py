"""WKV7 on the GPU: `chunk_wkv7` (training; chunked Triton forward and backward) and `recurrent_wkv7`
(step-by-step Triton forward for decoding and short T; its backward is the chunked one).

Kernels and their math: triton_kernels.py. This module imports triton, so import it lazily
(`kernels.wkv7` does) to let tests choose TRITON_INTERPRET before it is loaded.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch

from . import triton_kernels as K
from .checks import check_inputs


@dataclass(frozen=True)
class WKV7KernelConfig:
    """Tuning of the Triton path; the module-level CONFIG is used (replace it with dataclasses.replace: a config
    is immutable, so a backward always runs with its forward's). Defaults: the fastest measured on an H200
    whose errors equal the official CUDA kernel's; "auto" and "bf16x3k" precisions trade 0.1-0.7% more error
    for 5-8% less time (bench/results/wkv7.md)."""

    chunk_size: int = 16
    """Steps per chunk (power of two, 16..64): larger means fewer sequential steps but bigger [C, C] work."""
    block_v: int = 0
    """Rows of the state (value index) per program in the sequential kernels; N / block_v programs per
    head share its work. 0: 16 when there are few heads (B*H <= 48, e.g. one long sequence), else N."""
    precision: str = "bf16x3"
    """Dot precision of the sequential forward (chunk_fwd_kernel). "bf16x3" (each product as three bf16
    products on hi / lo halves): y's error equals the official kernel's (1.6601e-3 on the benchmark check
    against the exact reference, H200 runs 40 and 43). "auto": "bf16x3" when it runs more programs
    (B * H * N / block_v) than the GPU has multiprocessors, else "tf32r" (H200, run 26: bf16x3 5-9% faster
    there, 3-11% slower with fewer programs: it trades shared-memory traffic for a longer dependent chain).
    "tf32r": operands rounded to tf32, with M_rk and M_rk V carried as hi + lo terms (y error 1.664e-3, 0.2%
    above the official kernel's); also "tf32c", "tf32" (truncated; 2.0e-3), "tf32x3" or "ieee" (slower)."""
    precision_cc: str = "bf16x3"
    """Dot precision of chunk_cc_kernel (the [C, C] matrices): "bf16x3" measured 10% faster than "tf32r" on
    every benchmark shape (run 26), and near float32."""
    precision_bwd: str = "bf16x3"
    """Dot precision of the backward's gradient kernel. "bf16x3" (every product as three bf16 products; the
    Gluon kernel skips the terms with the zero lo halves of bf16 dy and v): with precision and
    precision_state_bwd "bf16x3" too, every gradient's error equals the official kernel's to 4 digits and the
    all-float32 ("ieee") kernels' (H200, run 43: dr/dk/dv/da/db/dw ratio 1.0000 on both checks), in 2.36 ms
    of the Gluon kernel's time on B8-T4096-H32. "bf16x3k": the seven [C, N] x [N, N] products with the
    state and its gradient as "tf32c", the ~28 others as "bf16x3" (triton_kernels._dot_big): 2.09 ms, errors
    0.1-0.7% above the official kernel's (da, db the most); "tf32c" (tensor cores on truncated operands, the
    products scaled back by the truncation's mean error, triton_kernels._dotn): 1.68-1.75e-3; "tf32r"
    1.69-1.75e-3; "tf32" 1.8-3.0e-3."""
    grads_kernel: str = "auto"
    """The backward's gradient kernel: "gluon" (gluon_kernels.chunk_bwd_grads_gluon, explicit layouts: H200,
    session 6, run 38, 2.18 vs 4.08 ms on B8-T4096-H32, 0.22 vs 0.39 ms on B16-T512-H12, the same errors),
    "triton" (triton_kernels.chunk_bwd_grads_kernel: the reference, any chunk size, head size and precision,
    and the CPU interpreter's), or "auto": "gluon" where it applies (an NVIDIA GPU of compute capability
    >= 8.0, chunk_size 16, head size 64, precision_bwd "bf16x3k" or "bf16x3", num_warps_bwd 4, 16-byte
    aligned inputs, a triton with Gluon's 3.6 API) and compiles and launches (it needs ~102 KiB of shared
    memory per block: H100/H200/A100, not RTX 30xx/40xx or L4, which fall back with one warning), else
    "triton"."""
    precision_state_bwd: str = "bf16x3"
    """Dot precision of the backward's sequential state pass (chunk_bwd_dstate_kernel), whose dL/dS feeds
    every gradient: "bf16x3" is what brings the gradients to the official kernel's errors (run 40: with
    "tf32c" here dw's own error is 5x larger, 6.7e-5 vs 1.3e-5, and the bf16 gradients' 0.07-0.09% above).
    "auto": "bf16x3" when it runs more programs than the GPU has multiprocessors, else "tf32c" (as
    `precision`: faster with few programs)."""
    num_warps: int = 4
    """Warps per program for the sequential kernels (chunk_fwd_kernel, chunk_bwd_dstate_kernel)."""
    num_warps_bwd: int = 4
    """Warps per program for the parallel gradient kernel (chunk_bwd_grads_kernel, one program per chunk
    and head)."""
    prefetch: bool = True
    """The sequential kernels load the next chunk's inputs while computing the current one (H200, session 2,
    1-32768-32: forward kernel 4.71 vs 5.83 ms, state pass 4.02 vs 4.93)."""
    num_warps_cc: int = 1
    """Warps per program for chunk_cc_kernel, which computes every chunk's state-independent [C, C] matrices
    (4 KiB per chunk and head, kept for the backward) so the sequential kernels load them instead of
    recomputing them in their serial steps (H200, 8-4096-32, session 2: forward 1.14 + 0.34 ms vs 1.66). H200,
    8-4096-32, with the hi + lo M_rk terms (run 22): 0.50 ms with 1 warp, 0.61 with 2 (before them: 0.34 / 0.42
    / 0.78 with 1 / 2 / 4)."""
    check_decay: bool = False
    """Raise ValueError when some w < -DECAY_LIMIT / chunk_size (-5 at chunk 16), where the chunked form's
    e^{-cumsum(w)} overflows float32 and y turns NaN/inf. Off by default: it costs one GPU sync per call, and
    the model's w (-0.6065 sigmoid(.)) is always inside the bound."""
    poison_outputs: bool = False
    """Fill outputs with NaN before the kernels run (tests: an unwritten element then fails)."""

    def __post_init__(self):
        if self.chunk_size not in (16, 32, 64):
            raise ValueError(f"WKV7KernelConfig.chunk_size must be 16, 32 or 64, got {self.chunk_size!r}")
        if self.grads_kernel not in ("auto", "gluon", "triton"):
            raise ValueError(f"WKV7KernelConfig.grads_kernel must be auto, gluon or triton, got {self.grads_kernel!r}")
        if self.block_v not in (0, 16, 32, 64, 128, 256):
            raise ValueError(f"WKV7KernelConfig.block_v must be 0 (automatic) or a power of two >= 16, "
                             f"got {self.block_v!r}")
        for name, allowed in (("precision", FORWARD_PRECISIONS + ("auto",)), ("precision_cc", FORWARD_PRECISIONS),
                              ("precision_bwd", FORWARD_PRECISIONS + ("bf16x3k",)),
                              ("precision_state_bwd", FORWARD_PRECISIONS + ("auto",))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"WKV7KernelConfig.{name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")


FORWARD_PRECISIONS = ("tf32r", "tf32c", "tf32", "tf32x3", "bf16x3", "ieee")
"""Dot precisions every kernel takes; the gradient kernel also takes "bf16x3k", the sequential ones "auto"."""


CONFIG = WKV7KernelConfig()
DECAY_LIMIT = 80.0
"""Largest |sum of w over one chunk| the kernels take: e^{80} is well inside float32 (overflow at e^{88.7})."""


def _alloc(shape, dtype, device, cfg):
    if cfg.poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_COMPILED: dict = {}
"""(kernel, call key) -> (the CompiledKernel triton's JIT launched for that call, its constexpr arguments):
see _launch."""


@functools.cache
def _direct_launch_supported() -> bool:
    """triton's CompiledKernel.run takes (grid, stream, function, packed_metadata, launch_metadata, hooks, *args)
    in the versions checked (3.6 on the H200 image); other versions keep the JIT path."""
    import triton
    return tuple(int(p) for p in triton.__version__.split(".")[:2]) == (3, 6)


def _call_key(cfg, tensors, *facts):
    """What fixes the kernels' specialization in a call (with the shapes and flags in `facts`): the config, the
    current device, and each user tensor's dtype and 16-byte alignment (tensors this module allocates are
    aligned). None, so every launch takes the JIT path, off an NVIDIA GPU, with another triton, while a launch
    hook (a profiler) is set, or with triton's debug or instrumentation compile options on."""
    if not (_on_nvidia_gpu(tensors[0]) and _direct_launch_supported()):
        return None
    from triton import knobs  # triton >= 3.4 (_direct_launch_supported checked the version)
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    if any(getattr(h, "calls", h) for h in hooks) or knobs.runtime.debug or knobs.compilation.instrumentation_mode:
        return None   # hooks to call, or compile options the JIT would key its kernels on
    return (torch.cuda.current_device(), cfg, facts,
            tuple(None if t is None else (t.dtype, t.data_ptr() % 16 == 0) for t in tensors))


def _launch(kernel, grid, call, *args, **kw):
    """kernel[grid](*args, **kw). With a call key (_call_key) seen before, the CompiledKernel the JIT picked for
    it is launched directly: the JIT's per-launch argument binding, specialization and checks took 25-150 us
    per launch on the H200 VM (bench/wkv7_host.py), which set the pace of short calls such as B16-T512-H12."""
    hit = _COMPILED.get((kernel, call)) if call is not None else None
    if hit is None:
        compiled = kernel[grid](*args, **kw)
        if call is not None and compiled is not None:   # (None: a triton cache hook took the launch)
            if len(_COMPILED) >= 4096:   # many distinct shapes: start over rather than grow without bound
                _COMPILED.clear()
                _GRADS_KERNEL.clear()
            _COMPILED[(kernel, call)] = (compiled, tuple(kw[name] for name in kernel.arg_names[len(args):]))
        return
    compiled, constexprs = hit
    grid = (*grid, 1, 1)
    compiled.run(grid[0], grid[1], grid[2], _stream(call[0]), compiled.function, compiled.packed_metadata, None,
                 None, None, *args, *constexprs)


def _stream(device: int) -> int:
    """The handle of the device's current CUDA stream (where triton's JIT launches too)."""
    return torch._C._cuda_getCurrentRawStream(device)


def _check(r, w, k, v, a, b, initial_state):
    B, T, H, N = check_inputs(r, w, k, v, a, b, initial_state)
    if not r.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"wkv7: the Triton kernels need CUDA tensors, got {r.device}: use wkv7() or "
                         f"chunk_wkv7_torch() on the CPU")
    if any(x.dtype == torch.float64 for x in (r, w, k, v, a, b)):
        raise ValueError("wkv7: the Triton kernels compute in float32: use chunk_wkv7_torch() for float64")
    if N < 16 or N & (N - 1):
        raise ValueError(f"wkv7: head size N={N} must be a power of two >= 16")
    C = CONFIG.chunk_size
    chunks = -(-T // C)
    # the largest buffers the kernels index with int32 offsets: inputs, chunk-start states, [C, C] matrices
    largest = max(B * T * H * N, B * H * chunks * N * N, B * H * chunks * 4 * C * C)
    if largest >= 2**31:
        raise ValueError(f"wkv7: a buffer of {largest:,} elements (B={B}, T={T}, H={H}, N={N}, chunk {C}) overflows "
                         f"the kernels' int32 offsets: split the batch or the sequence (infctx segments)")
    if CONFIG.check_decay:
        lowest = float(w.min())
        if not lowest >= -DECAY_LIMIT / C:   # NaN too
            raise ValueError(f"wkv7: w has {lowest:.3g} < -{DECAY_LIMIT:g} / chunk_size = {-DECAY_LIMIT / C:.3g}: the "
                             f"chunked form would overflow float32 (the model's w is >= -0.6065)")


def _on_nvidia_gpu(x) -> bool:
    """x is on an NVIDIA GPU and the kernels run compiled there (not in the interpreter, not on ROCm)."""
    return x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" and not torch.version.hip


def _bias(x):
    """The "tf32c" compensation: the NVIDIA tensor cores' mean truncation error; none under the interpreter
    (its dots do not truncate) or on ROCm (whose tf32 path is not this truncation)."""
    return K.TF32_TRUNCATION_BIAS if _on_nvidia_gpu(x) else 0.0


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sequential_precision(setting: str, fallback: str, x: torch.Tensor, programs: int) -> str:
    """Resolve "auto" for the sequential kernels: "bf16x3" when they run more programs than the GPU has
    multiprocessors (shared-memory traffic bound: bf16x3 moves 16-bit operands), else `fallback` (latency
    bound: the shorter chain of one tf32 product wins). Off a CUDA device (the interpreter): `fallback`."""
    if setting != "auto":
        return setting
    if _on_nvidia_gpu(x) and programs > _multiprocessors(x.device.index or 0):
        return "bf16x3"
    return fallback


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def _gluon_importable() -> bool:
    """A triton whose Gluon has the 3.6 API the kernel is written in (3.9 renamed its cp.async call)."""
    try:
        from triton.experimental.gluon.language.nvidia.ampere import async_copy

        from . import gluon_kernels  # noqa: F401
    except Exception:  # noqa: BLE001  (no Gluon, or a Gluon whose API differs from triton 3.6's)
        return False
    return hasattr(async_copy, "async_copy_global_to_shared")


def _gluon_unmet(cfg, N, on_gpu: bool, capability: tuple[int, int], aligned: bool, api: bool) -> list[str]:
    """What the Gluon gradient kernel needs and this call lacks (an empty list: it can run)."""
    return [why for why, bad in (
        ("an NVIDIA GPU of compute capability >= 8.0 (not the interpreter or ROCm)", not on_gpu or capability < (8, 0)),
        ("chunk_size 16", cfg.chunk_size != 16), ("head size 64", N != 64),
        ('precision_bwd "bf16x3k" or "bf16x3"', cfg.precision_bwd not in ("bf16x3k", "bf16x3")),
        ("num_warps_bwd 4", cfg.num_warps_bwd != 4),
        ("16-byte aligned inputs (its cp.async copies)", not aligned),
        ("a triton with Gluon's 3.6 API", not api)) if bad]


_GLUON_FAILED: dict = {}
"""(device, dtypes, precision_bwd) -> why the Gluon kernel failed there under "auto" (e.g. not enough shared
memory per block: it needs ~102 KiB, which an H100/H200/A100 has and an RTX 30xx/40xx or L4 has not); those
calls run the Triton kernel."""


_GRADS_KERNEL: dict = {}
"""call key (_call_key) -> the gradient kernel that ran for it ("gluon" / "triton"): repeated calls skip the
checks of _launch_grads."""


def _launch_grads(cfg, tensors, N, launch_gluon, launch_triton, call=None) -> str:
    """Run the backward's gradient kernel: the Gluon one where cfg.grads_kernel and the call allow it (see
    WKV7KernelConfig), else the Triton one. Under "auto" a Gluon kernel that fails to compile or launch (a
    GPU with less shared memory, a triton API change) falls back to Triton for that device and dtypes, with
    one warning; under "gluon" it raises. Returns the kernel run: "gluon" or "triton"."""
    known = _GRADS_KERNEL.get(call) if call is not None else None
    if known is not None:
        (launch_gluon if known == "gluon" else launch_triton)()
        return known
    ran = _pick_and_launch_grads(cfg, tensors, N, launch_gluon, launch_triton)
    if call is not None:
        _GRADS_KERNEL[call] = ran
    return ran


def _pick_and_launch_grads(cfg, tensors, N, launch_gluon, launch_triton) -> str:
    x = tensors[0]
    if cfg.grads_kernel != "triton":
        on_gpu = _on_nvidia_gpu(x)
        capability = _capability(x.device.index or 0) if on_gpu else (0, 0)
        aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
        unmet = _gluon_unmet(cfg, N, on_gpu, capability, aligned, on_gpu and _gluon_importable())
        if unmet and cfg.grads_kernel == "gluon":
            raise ValueError(f"wkv7: grads_kernel='gluon' needs {', '.join(unmet)}: use 'auto' or 'triton'")
        key = (str(x.device), tuple(t.dtype for t in tensors), cfg.precision_bwd)
        if not unmet and (cfg.grads_kernel == "gluon" or key not in _GLUON_FAILED):
            try:
                launch_gluon()
                return "gluon"
            except Exception as e:  # noqa: BLE001  (compile or launch-resource errors: fall back below)
                if cfg.grads_kernel == "gluon":
                    raise
                _GLUON_FAILED[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"wkv7: the Gluon gradient kernel failed on {key[0]} ({_GLUON_FAILED[key]}); "
                              f"using the Triton kernel", RuntimeWarning, stacklevel=3)
    launch_triton()
    return "triton"


def _block_v(B, H, N, cfg):
    if cfg.block_v:
        return min(cfg.block_v, N)
    return 16 if B * H <= 48 else N


def _fwd(r, w, k, v, a, b, s0, store_final, store_states, cfg):
    """Chunked forward. Returns y [B, T, H, N] (dtype of r), final [B, H, N, N] fp32 or None,
    chunk-start states [B, H, NC, N, N] fp32 or None, the chunks' [C, C] matrices [B*H, NC, 4, C, C] fp32
    (computed with cfg.precision_cc; for the backward) or None. cfg: a WKV7KernelConfig."""
    B, T, H, N = r.shape
    C, BV = cfg.chunk_size, _block_v(B, H, N, cfg)
    NC = triton_cdiv(T, C)
    call = _call_key(cfg, (r, w, k, v, a, b, s0), B, T, H, N, store_final, store_states)
    bias = _bias(r)
    y = _alloc((B, T, H, N), r.dtype, r.device, cfg)
    sT = _alloc((B, H, N, N), torch.float32, r.device, cfg) if store_final else None
    st = _alloc((B, H, NC, N, N), torch.float32, r.device, cfg) if store_states else None
    cc = _alloc((B * H, NC, 4, C, C), torch.float32, r.device, cfg)
    _launch(K.chunk_cc_kernel, (NC * B * H,), call,
            r, w, k, a, b, cc, T, NC, H, N=N, C=C, LOG2C=int(math.log2(C)), PREC=cfg.precision_cc, BIAS=bias,
            num_warps=cfg.num_warps_cc)
    _launch(K.chunk_fwd_kernel, (B * H, N // BV), call,
            r, w, k, v, a, b, cc, s0, y, sT, st, T, NC, H, N=N, C=C, BV=BV, HAS_S0=s0 is not None,
            STORE_FINAL=store_final, STORE_STATES=store_states, PREFETCH=cfg.prefetch,
            PREC=_sequential_precision(cfg.precision, "tf32r", r, B * H * (N // BV)),
            IO_V=int(v.element_size() > 2), BIAS=bias, num_warps=cfg.num_warps)
    return y, sT, st, (cc if store_states else None)


def _bwd(r, w, k, v, a, b, st, cc, dy, dsT, need_ds0, cfg):
    """Chunked backward from the forward's chunk-start states st and [C, C] matrices cc (both stored when
    it ran with store_states). Returns (dr, dw, dk, dv, da, db, ds0)."""
    B, T, H, N = r.shape
    C, BV = cfg.chunk_size, _block_v(B, H, N, cfg)
    NC = st.shape[2]
    dy = dy.contiguous()
    call = _call_key(cfg, (r, w, k, v, a, b, dy, dsT), B, T, H, N)
    bias = _bias(r)
    dst = _alloc((B, H, NC, N, N), torch.float32, r.device, cfg)   # dL/dS at each chunk's end
    ds0 = _alloc((B, H, N, N), torch.float32, r.device, cfg)
    _launch(K.chunk_bwd_dstate_kernel, (B * H, N // BV), call,
            r, w, a, b, cc, dy, dsT, dst, ds0, T, NC, H, N=N, C=C, BV=BV, HAS_DST=dsT is not None,
            PREFETCH=cfg.prefetch, PREC=_sequential_precision(cfg.precision_state_bwd, "tf32c", r, B * H * (N // BV)),
            IO_DY=int(dy.element_size() > 2), BIAS=bias, num_warps=cfg.num_warps)
    grads = [_alloc(x.shape, x.dtype, x.device, cfg) for x in (r, w, k, v, a, b)]
    io = dict(IO_DY=int(dy.element_size() > 2), IO_V=int(v.element_size() > 2), BIAS=bias)
    args = (r, w, k, v, a, b, st, dst, dy, *grads, T, NC, H)

    def gluon():
        from .gluon_kernels import chunk_bwd_grads_gluon
        _launch(chunk_bwd_grads_gluon, (NC * B * H,), call, *args, N=N, C=C, LOG2C=int(math.log2(C)), **io,
                BIG_X3=cfg.precision_bwd == "bf16x3", LO_DY=dy.dtype != torch.bfloat16,
                LO_V=v.dtype != torch.bfloat16, num_warps=4)

    def triton():
        _launch(K.chunk_bwd_grads_kernel, (NC * B * H,), call, *args, N=N, C=C, LOG2C=int(math.log2(C)),
                PREC=cfg.precision_bwd, **io, num_warps=cfg.num_warps_bwd)

    _launch_grads(cfg, (r, w, k, v, a, b, dy), N, gluon, triton, call)
    return (*grads, ds0 if need_ds0 else None)


def triton_cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


class ChunkWKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, output_final_state):
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        s0 = None if s0 is None else s0.float().contiguous()
        ctx.cfg = CONFIG   # immutable: the backward indexes the chunks the forward saved with it
        ctx.set_materialize_grads(False)
        y, sT, st, cc = _fwd(r, w, k, v, a, b, s0, output_final_state, True, ctx.cfg)
        ctx.save_for_backward(r, w, k, v, a, b, st, cc)
        ctx.has_s0 = s0 is not None
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, st, cc = ctx.saved_tensors
        dsT = None if dsT is None else dsT.float().contiguous()
        if dy is None:   # only the final state has a gradient
            dy = torch.zeros_like(r)
        grads = _bwd(r, w, k, v, a, b, st, cc, dy, dsT, ctx.has_s0, ctx.cfg)
        return (*grads, None)


class RecurrentWKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, output_final_state):
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        s0 = None if s0 is None else s0.float().contiguous()
        ctx.cfg = CONFIG
        ctx.set_materialize_grads(False)
        B, T, H, N = r.shape
        BV = min(16, N)
        y = _alloc((B, T, H, N), r.dtype, r.device, ctx.cfg)
        sT = _alloc((B, H, N, N), torch.float32, r.device, ctx.cfg) if output_final_state else None
        K.recurrent_fwd_kernel[(B * H, N // BV)](
            r, w, k, v, a, b, s0, y, sT, T, H, N=N, BV=BV, HAS_S0=s0 is not None,
            STORE_FINAL=output_final_state, num_warps=1)
        ctx.save_for_backward(r, w, k, v, a, b, s0)
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, s0 = ctx.saved_tensors
        _, _, st, cc = _fwd(r, w, k, v, a, b, s0, False, True, ctx.cfg)
        dsT = None if dsT is None else dsT.float().contiguous()
        if dy is None:   # only the final state has a gradient
            dy = torch.zeros_like(r)
        grads = _bwd(r, w, k, v, a, b, st, cc, dy, dsT, s0 is not None, ctx.cfg)
        return (*grads, None)


def _on_device_of(x):
    """x's GPU as the current device while the kernels launch (triton launches on the current one)."""
    if x.is_cuda and x.get_device() != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def chunk_wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False):
    """Chunked Triton WKV7 (training path), forward and backward.

    r, w, k, v, a, b: [B, T, H, N] bf16/fp16/fp32, any T >= 1; w is the log decay, -80 / chunk_size <= w <= 0
    (>= -5 at the default chunk of 16; the model's w is >= -0.6065): below that the chunked form overflows
    float32 and y is NaN/inf (CONFIG.check_decay raises instead). initial_state: [B, H, N, N] fp32
    ([value][key]) or None. Returns (y [B, T, H, N] in r's dtype, final_state [B, H, N, N] fp32 or None).
    Gradients flow to all six inputs and initial_state, from y and from final_state (first order only: a
    second backward through them raises). w = -inf (a decay of exactly 0) is outside the bound: NaN. A NaN or
    inf in v or k at step t also turns y NaN at the earlier steps of its chunk (0 x NaN in the chunk's masked
    products), unlike the step-by-step loop.
    """
    _check(r, w, k, v, a, b, initial_state)
    with _on_device_of(r):
        if not (torch.is_grad_enabled()
                and any(x is not None and x.requires_grad for x in (r, w, k, v, a, b, initial_state))):
            # no backward will run (no_grad, inference_mode, or nothing requires grad): skip storing chunk states
            xs = [x.contiguous() for x in (r, w, k, v, a, b)]
            s0 = None if initial_state is None else initial_state.float().contiguous()
            y, sT, _, _ = _fwd(*xs, s0, output_final_state, False, CONFIG)
            return y, sT
        return ChunkWKV7.apply(r, w, k, v, a, b, initial_state, output_final_state)


def recurrent_wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False):
    """Step-by-step Triton WKV7 (decoding, short T). Same arguments and results as `chunk_wkv7`; the backward
    recomputes chunk states and uses the chunked backward kernel, so the same bound on w holds for gradients
    (-80 / chunk_size <= w), though this forward alone takes any w <= 0."""
    _check(r, w, k, v, a, b, initial_state)
    with _on_device_of(r):
        return RecurrentWKV7.apply(r, w, k, v, a, b, initial_state, output_final_state)
