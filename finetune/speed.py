"""Fast by default: the precision, attention kernel and optimizer flags of a run, chosen per device.

    precision, why = choose_precision("auto", device)          # "bf16" | "fp32" (+ the reason, for the log)
    attention, why = choose_attention(model, device, precision, batch_size)   # sets every block's kernel
    optimizer = create_optimizer_v2(model, ..., **optimizer_kwargs(device))

Every rule here rests on a measurement, written beside it, because the fast choice differs between
machines (BENCHMARKS.md has the tables and the commands that reproduce them):

- **Precision.** bf16 autocast pays where the hardware multiplies bf16 natively at a higher rate than
  fp32: NVIDIA GPUs from Ampere on (tensor cores) and Intel CPUs with AMX. On a 2-core AMX Xeon
  (issue 10) a ViT-B/16 training step at 384 px ran 2.3x faster in bf16 than in fp32. AVX-512 BF16
  without AMX is *not* enough: on the 2-core Xeon of BENCHMARKS.md (avx512_bf16, AMX hidden by the
  hypervisor) oneDNN's bf16 GEMMs ran at 0.5x the fp32 GEMMs and the bf16 training step at 0.6x fp32;
  so "auto" picks bf16 on a CPU only with AMX. fp16 is never chosen automatically (it needs a grad
  scaler and can overflow); ask for it explicitly.
- **Attention.** timm's `Attention` computes softmax(q k^T) v either with the fused SDPA kernel
  (`fused_attn = True`) or explicitly (two matmuls and a softmax); the results agree to float
  rounding. On GPUs the fused (flash / memory-efficient) kernel is the fast one, so CUDA takes it
  unmeasured. On CPUs it depends on the CPU, the dtype and the shape (issue 10: on an AMX Xeon the
  explicit path made the bf16 step 1.3x faster, because 37% of the fused step sat in the CPU
  flash-attention backward; on an AMD EPYC the comparison came out differently), so "auto" times both
  kernels at this model's shape, in this run's precision, for about a second at start.
- **Optimizer.** torch's fused SGD / AdamW where it has them (CUDA, CPU); see `optimizer_kwargs`.

Nothing here changes the randomness of training: the measurement runs under `torch.random.fork_rng`
with its own generator, and never runs the model itself (its weights and train/eval mode are untouched).
This module sits low in the package (the engine imports it): torch, timm and `errors` only.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .errors import FinetuneError

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
ATTENTION_CHOICES = ("auto", "fused", "explicit")
CPUINFO = Path("/proc/cpuinfo")
# The CPU flags that make bf16 autocast pay (see the module docstring: AVX-512 BF16 alone measured slower).
CPU_BF16_FAST_FLAGS = ("amx_bf16",)
CPU_BF16_SLOW_FLAGS = ("avx512_bf16",)
LOWP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# choose_attention's measurement: at least MIN_ROUNDS alternating rounds of both kernels, more
# while within budget_s, never more than MAX_ROUNDS; a kernel must win by TIE_MARGIN to displace
# the fused one (which needs less memory), and the explicit one is ruled out when the attention
# matrices it keeps for the backward would take more than EXPLICIT_MEMORY_SHARE of free memory.
MIN_ROUNDS, MAX_ROUNDS = 3, 9
MEASURE_BATCH = 2
TIE_MARGIN = 1.03
EXPLICIT_MEMORY_SHARE = 0.25


# =================================================================================== precision
def cpu_flags(cpuinfo: Optional[str] = None) -> FrozenSet[str]:
    """The feature flags of the CPU: the `flags` line of /proc/cpuinfo (or of the text `cpuinfo`);
    empty where there is no such file (macOS, Windows), which every rule below reads as 'no bf16'."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_name(cpuinfo: Optional[str] = None) -> str:
    """`model name` of /proc/cpuinfo (as lscpu prints it), else platform.processor()."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    import platform
    return platform.processor() or platform.machine() or "unknown CPU"


def choose_precision(requested: str, device: torch.device, cpuinfo: Optional[str] = None) -> Tuple[str, str]:
    """(precision, reason): "auto" resolved for `device`; "fp32", "bf16" and "fp16" pass through.

    `cpuinfo` replaces the text of /proc/cpuinfo (tests). The reason is one line for the run log.
    """
    if requested not in PRECISION_CHOICES:
        raise FinetuneError(f"precision: {requested!r} is not one of {', '.join(PRECISION_CHOICES)}")
    device = torch.device(device)
    if requested != "auto":
        return requested, f"{requested} as requested"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: bf16 ({torch.cuda.get_device_name(device)} multiplies bf16 on tensor cores)"
        return "fp32", f"auto: fp32 ({torch.cuda.get_device_name(device)} has no bf16; --precision fp16 " \
                       "uses its tensor cores with a grad scaler)"
    if device.type != "cpu":
        return "fp32", f"auto: fp32 (no bf16 rule measured for {device.type})"
    flags = cpu_flags(cpuinfo)
    fast = [f for f in CPU_BF16_FAST_FLAGS if f in flags]
    # On the real machine also ask the kernel for the AMX tile state, as oneDNN must before using it
    # (a kernel too old for AMX, or a hypervisor that withholds it, leaves only the slow path).
    if fast and torch.backends.mkldnn.is_available() and (cpuinfo is not None or amx_usable()):
        return "bf16", f"auto: bf16 (CPU has {'+'.join(fast)}: AMX bf16 matmuls, measured 2.3x the fp32 step)"
    slow = [f for f in CPU_BF16_SLOW_FLAGS if f in flags]
    if slow:
        return "fp32", (f"auto: fp32 (CPU has {'+'.join(slow)} but no AMX: bf16 matmuls measured 0.5x fp32 "
                        "on such a CPU; --precision bf16 to try anyway)")
    return "fp32", "auto: fp32 (CPU without AMX bf16)"


def amx_usable() -> bool:
    """Whether this process may use AMX tiles (Linux grants them on request; torch asks here)."""
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if init is None:
        return True  # an older torch cannot ask: trust the flags
    try:
        return bool(init())
    except RuntimeError:
        return False


def resolve_precision(requested: str, device: torch.device, cpuinfo: Optional[str] = None) -> str:
    """"auto" -> "bf16" where the device multiplies bf16 fast (CUDA with bf16, a CPU with AMX),
    else "fp32"; explicit values pass through. `choose_precision` also says why."""
    return choose_precision(requested, device, cpuinfo)[0]


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` on `device` (a no-op for fp32)."""
    dtype = LOWP_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# =================================================================================== attention
def attention_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The modules whose kernel `set_attention` switches: every one with a `fused_attn` flag
    (timm's Attention and its relatives), through a DDP wrapper too."""
    return [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


def set_attention(model: torch.nn.Module, mode: str) -> None:
    """Every attention module of `model` computes softmax(q k^T) v with `mode`: "fused" (SDPA) or
    "explicit" (two matmuls and a softmax, as timm writes it out). Same weights, same results to
    float rounding; attention maps (viz) are recomputed from qkv and do not depend on it."""
    if mode not in ("fused", "explicit"):
        raise FinetuneError(f"attention: {mode!r} is not one of fused, explicit (or auto)")
    for module in attention_modules(model):
        module.fused_attn = mode == "fused"


def current_attention(model: torch.nn.Module) -> Optional[str]:
    """"fused", "explicit", "mixed", or None for a model without attention modules."""
    flags = {m.fused_attn for m in attention_modules(model)}
    if not flags:
        return None
    return "mixed" if len(flags) > 1 else ("fused" if flags.pop() else "explicit")


def choose_attention(model: torch.nn.Module, device: torch.device, precision: str, batch_size: int,
                     requested: str = "auto", budget_s: float = 1.0) -> Tuple[str, str]:
    """Set the attention kernel of every block and return (chosen, detail).

    "fused" and "explicit" pass through. "auto": on CUDA the fused kernel (flash / memory-efficient
    SDPA, the fast one on GPUs), unmeasured; elsewhere the faster of the two for this model's
    attention shape (batch, heads, tokens, head dim) on this device under this precision's autocast,
    timed forward+backward in alternating rounds (median; about `budget_s` seconds). Only the part
    that differs is timed: softmax(q k^T) v on random q, k, v; the projections around it are the same
    for both. The model is never run, so its weights and train/eval mode are untouched, and the
    timing draws from its own generator inside `fork_rng`: the choice never changes a run's randomness.
    """
    if requested not in ATTENTION_CHOICES:
        raise FinetuneError(f"attention: {requested!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if precision not in PRECISION_CHOICES[1:]:
        raise FinetuneError(f"choose_attention: precision {precision!r} must be resolved first "
                            "(fp32, bf16 or fp16; see resolve_precision)")
    device = torch.device(device)
    modules = attention_modules(model)
    if not modules:
        return (requested if requested != "auto" else "fused"), "the model has no timm attention modules"
    if requested != "auto":
        set_attention(model, requested)
        return requested, f"{requested} as requested"
    if device.type == "cuda":
        set_attention(model, "fused")
        return "fused", "auto: fused (SDPA flash / memory-efficient kernels: the fast ones on GPUs; not timed)"
    shape = attention_shape(model, batch_size)
    if shape is None:
        set_attention(model, "fused")
        return "fused", "auto: fused (cannot tell this model's token count, so not timed)"
    lowp = LOWP_DTYPES.get(precision)
    extra = explicit_attention_extra_bytes(model, batch_size, lowp or torch.float32)
    available = available_memory_bytes()
    if available is not None and extra > EXPLICIT_MEMORY_SHARE * available:
        set_attention(model, "fused")
        return "fused", (f"auto: fused (explicit attention would keep {extra / 2**30:.1f} GiB of attention "
                         f"matrices, over {EXPLICIT_MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB free)")
    times = time_attention_kernels(shape, device, precision, dropout=_dropout_p(modules[0], model), budget_s=budget_s)
    fused, explicit = statistics.median(times["fused"]), statistics.median(times["explicit"])
    chosen = "explicit" if fused > explicit * TIE_MARGIN else "fused"
    set_attention(model, chosen)
    b, h, n, d = shape
    faster = max(fused, explicit) / min(fused, explicit)
    verdict = (f"{faster:.2f}x faster than {'fused' if chosen == 'explicit' else 'explicit'}" if faster >= TIE_MARGIN
               else f"within {TIE_MARGIN - 1:.0%} of explicit, so the one that keeps less memory")
    return chosen, (f"auto: {chosen}, {verdict} (softmax(qk^T)v forward+backward, {b}x{h} heads x {n} tokens x "
                    f"{d}, {precision}, {torch.get_num_threads()} threads, median of {len(times['fused'])}: "
                    f"fused {fused * 1e3:.3g} ms, explicit {explicit * 1e3:.3g} ms)")


def attention_shape(model: torch.nn.Module, batch_size: int) -> Optional[Tuple[int, int, int, int]]:
    """(batch, heads, tokens, head_dim) at which `choose_attention` times the kernels, from the first
    attention module of a timm ViT; None when the model does not say its token count.

    The batch is the run's, capped at MEASURE_BATCH images (the measurement must stay near a second)
    but never below what gives every thread at least two (image, head) pairs: the per-image cost of
    the kernels does depend on the batch when there are few (image, head) pairs per thread (B_16 at
    384, fp32, 2 threads: fused/explicit 1.11 at batch 1, 0.76 at 2, 0.68 at 4).
    """
    vit = getattr(model, "module", model)
    modules = attention_modules(vit)
    num_patches = getattr(getattr(vit, "patch_embed", None), "num_patches", None)
    if not modules or not isinstance(num_patches, int):
        return None
    heads, head_dim = getattr(modules[0], "num_heads", None), getattr(modules[0], "head_dim", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return None
    tokens = num_patches + int(getattr(vit, "num_prefix_tokens", 1))
    enough = math.ceil(2 * torch.get_num_threads() / heads)
    batch = max(1, min(int(batch_size), max(MEASURE_BATCH, enough)))
    return batch, heads, tokens, head_dim


def explicit_attention_extra_bytes(model: torch.nn.Module, batch_size: int, dtype: torch.dtype) -> int:
    """What explicit attention keeps for the backward beyond the fused kernel: one
    (batch, heads, tokens, tokens) probability matrix per block (fused keeps a (batch, heads, tokens)
    log-sum-exp instead)."""
    shape = attention_shape(model, 1)
    if shape is None:
        return 0
    heads, tokens = shape[1], shape[2]
    blocks = len(attention_modules(model))
    return blocks * int(batch_size) * heads * tokens * tokens * torch.empty((), dtype=dtype).element_size()


def available_memory_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _dropout_p(attn: torch.nn.Module, model: torch.nn.Module) -> float:
    drop = getattr(attn, "attn_drop", None)
    return float(getattr(drop, "p", 0.0)) if model.training else 0.0


def _fused(q, k, v, dropout: float):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)


def _explicit(q, k, v, dropout: float):
    # timm's Attention.forward with fused_attn = False, line for line.
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, dropout, training=dropout > 0)
    return attn @ v


KERNELS: Dict[str, Callable] = {"fused": _fused, "explicit": _explicit}


def time_attention_kernels(shape: Tuple[int, int, int, int], device: torch.device, precision: str,
                           dropout: float = 0.0, budget_s: float = 1.0) -> Dict[str, List[float]]:
    """Seconds per forward+backward of each kernel on random (batch, heads, tokens, head_dim) q, k,
    v, in alternating rounds after one warm-up each: at least MIN_ROUNDS, more while the total stays
    within `budget_s`, at most MAX_ROUNDS. The global RNG state is left exactly as it was."""
    device = torch.device(device)
    dtype = LOWP_DTYPES.get(precision) or torch.float32
    times: Dict[str, List[float]] = {name: [] for name in KERNELS}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v, grad = (torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)

        def run(name: str) -> float:
            start = time.perf_counter()
            with autocast(device, precision):
                out = KERNELS[name](q, k, v, dropout)
            out.backward(grad.to(out.dtype))
            q.grad = k.grad = v.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        began = time.perf_counter()
        for name in KERNELS:
            run(name)
        rounds = 0
        while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - began < budget_s):
            order = list(KERNELS) if rounds % 2 == 0 else list(reversed(KERNELS))
            for name in order:
                times[name].append(run(name))
            rounds += 1
    return times


# =================================================================================== optimizer
def optimizer_kwargs(device: torch.device) -> Dict[str, Any]:
    """Implementation flags for torch's SGD / AdamW (pass them through timm's create_optimizer_v2).

    `fused=True` wherever torch has fused kernels for the device (CUDA, and the CPU since torch 2.4):
    one pass over each parameter's memory instead of several. Measured on the 2-core Xeon of
    BENCHMARKS.md: `optimizer.step()` over ViT-B/16's 86M parameters inside a training loop (fresh
    gradients from a backward each time; the three interleaved, median of 8;
    `python -m benchmarks.optimizer_step --opt momentum|adamw`):

        momentum SGD   single-tensor (torch's CPU default) 85 ms   foreach 161 ms   fused 38 ms
        AdamW          single-tensor 168 ms                        foreach 245 ms   fused 56 ms

    so on a CPU `foreach=True` is slower, and fused is 2.2x (SGD) to 3x (AdamW) faster — though a
    B_16 training step at 384 px, batch 4, takes seconds there, so the whole step gains under 1%
    (benchmarks.engine_variants: no difference measurable). The update is the same; fused kernels
    may round differently in the last bit, so a run keeps one setting throughout (a resume rebuilds
    the optimizer the same way). Elsewhere (mps, xpu, ...): {}.
    """
    device = torch.device(device)
    if device.type in _fused_optimizer_devices():
        return {"fused": True}
    return {}


def _fused_optimizer_devices() -> Tuple[str, ...]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # torch < 2.2: fused kernels on CUDA only
        devices = ("cuda",)
    return tuple(d for d in devices if d in ("cuda", "cpu"))
