"""Fast by default: the precision, attention kernel and optimizer flags of a run, chosen per device.

    precision, why = choose_precision("auto", device)          # "bf16" | "fp32" (+ the reason, for the log)
    attention, why = choose_attention(model, device, precision, batch_size)   # sets every block's kernel
    optimizer = create_optimizer_v2(model, ..., **optimizer_kwargs(device))

Every rule here rests on a measurement, written beside it, because the fast choice differs between
machines (BENCHMARKS.md has the tables and the commands that reproduce them):

- **Precision.** bf16 autocast pays where the hardware multiplies bf16 at a higher rate than fp32,
  and no CPU flag tells that: measured on 2-core machines, a ViT-B/16 step at 384 px ran in bf16 at
  2.3x fp32 on an AMX Xeon, 0.6x on an AVX-512 BF16 Xeon without AMX (oneDNN's bf16 GEMMs at half
  the fp32 rate there) and 1.8x on an AMD EPYC with AVX-512 BF16 and no AMX. So on a CPU "auto"
  times one block of the model in both (forward+backward, about a second, cached per CPU model,
  torch version, threads and shape) and takes bf16 only when it wins by PRECISION_MARGIN. On CUDA
  a rule: bf16 where the card multiplies it on tensor cores (Ampere on). fp16 is never chosen
  automatically (it needs a grad scaler and can overflow); ask for it explicitly.
- **Attention.** timm's `Attention` computes softmax(q k^T) v either with the fused SDPA kernel
  (`fused_attn = True`) or explicitly (two matmuls and a softmax); the results agree to float
  rounding. On GPUs the fused (flash / memory-efficient) kernel is the fast one, so CUDA takes it
  unmeasured. On CPUs it depends on the CPU, the dtype and the shape (issue 10: on an AMX Xeon the
  explicit path made the bf16 step 1.3x faster, because 37% of the fused step sat in the CPU
  flash-attention backward; on an AMD EPYC the comparison came out differently), so "auto" times both
  kernels at this model's shape, in this run's precision, for about a second at start.
- **Optimizer.** torch's fused SGD / AdamW where it has them (CUDA, CPU); see `optimizer_kwargs`.

Nothing here changes the randomness of training: the measurements run under `torch.random.fork_rng`
with their own generator, and never run the model itself (the precision probe is a copy of one
block; the model's weights and train/eval mode are untouched).
This module sits low in the package (the engine imports it): torch, timm and `errors` only.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .errors import FinetuneError

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
ATTENTION_CHOICES = ("auto", "fused", "explicit")
CPUINFO = Path("/proc/cpuinfo")
LOWP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# choose_attention's measurement: at least MIN_ROUNDS alternating rounds of both kernels, more
# while within budget_s, never more than MAX_ROUNDS; a kernel must win by TIE_MARGIN to displace
# the fused one (which needs less memory), and the explicit one is ruled out when the attention
# matrices it keeps for the backward would take more than EXPLICIT_MEMORY_SHARE of free memory.
MIN_ROUNDS, MAX_ROUNDS = 3, 9
MEASURE_BATCH = 2
TIE_MARGIN = 1.03
EXPLICIT_MEMORY_SHARE = 0.25
# choose_precision's measurement: bf16 must beat fp32 by PRECISION_MARGIN (fp32 rounds less, so a
# tie goes to it), on about MEASURE_ROWS token rows; verdicts kept in cache_dir() / PRECISION_CACHE.
PRECISION_MARGIN = 1.05
DECISIVE_RATIO = 2.0
MEASURE_ROWS = 512
PRECISION_CACHE = "precision.json"


# =================================================================================== precision
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


def choose_precision(requested: str, device: torch.device, model: Optional[torch.nn.Module] = None,
                     batch_size: int = MEASURE_BATCH, train: bool = True, budget_s: float = 1.0,
                     timer: Optional[Callable[..., Dict[str, List[float]]]] = None) -> Tuple[str, str]:
    """(precision, reason): "auto" resolved for `device`; "fp32", "bf16" and "fp16" pass through.

    On a CPU "auto" is a measurement, never a flag: one transformer block of `model` (a copy: its
    own GEMM shapes and attention, at `batch_size` images capped near MEASURE_ROWS tokens), timed
    forward + backward (`train`) or forward alone in fp32 and under bf16 autocast in alternating
    rounds for about `budget_s`; bf16 wins only when faster by PRECISION_MARGIN. The verdict is
    cached per (CPU model, torch version, threads, shape) in `cache_dir()`. On CUDA a rule (bf16
    where the card multiplies it on tensor cores), logged; fp16 is never chosen automatically.
    `timer` replaces `time_precisions` (tests of the decision rule). The reason is one log line.
    """
    if requested not in PRECISION_CHOICES:
        raise FinetuneError(f"precision: {requested!r} is not one of {', '.join(PRECISION_CHOICES)}")
    device = torch.device(device)
    if requested != "auto":
        return requested, f"{requested} as requested"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: bf16 ({torch.cuda.get_device_name(device)} multiplies bf16 on tensor cores; not timed)"
        return "fp32", f"auto: fp32 ({torch.cuda.get_device_name(device)} has no bf16; --precision fp16 " \
                       "uses its tensor cores with a grad scaler)"
    if device.type != "cpu":
        return "fp32", f"auto: fp32 (no bf16 measurement for {device.type})"
    block = first_block(model) if model is not None else None
    if block is None:
        return "fp32", "auto: fp32 (no transformer block to time bf16 against fp32 on)"
    shape = precision_shape(model, block, batch_size)
    key = (f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
           f"{'train' if train else 'inference'} {'x'.join(map(str, shape))}")
    cached = None if timer is not None else _read_precision_cache(key)
    if cached is not None:
        times, when = cached["times"], f"measured {cached['when']}, cached"
    else:
        times = (timer or time_precisions)(block, shape, device, train=train, budget_s=budget_s)
        when = f"best of {len(times['fp32'])}"
        if timer is None:
            _write_precision_cache(key, times)
    fp32, bf16 = best_time(times["fp32"]), best_time(times["bf16"])
    chosen = "bf16" if fp32 > bf16 * PRECISION_MARGIN else "fp32"
    b, n, d = shape
    verdict = (f"bf16 {fp32 / bf16:.2f}x fp32" if chosen == "bf16" else
               f"bf16 {fp32 / bf16:.2f}x fp32, under the {PRECISION_MARGIN:.2f}x it must beat")
    return chosen, (f"auto: {chosen}, {verdict} (one block {'forward+backward' if train else 'forward'}, "
                    f"{b} images x {n} tokens x {d}, {torch.get_num_threads()} threads, {when}: "
                    f"fp32 {fp32 * 1e3:.3g} ms, bf16 {bf16 * 1e3:.3g} ms; {cpu_name()})")


def resolve_precision(requested: str, device: torch.device, model: Optional[torch.nn.Module] = None,
                      batch_size: int = MEASURE_BATCH, train: bool = True) -> str:
    """`choose_precision` without the reason."""
    return choose_precision(requested, device, model, batch_size, train)[0]


def first_block(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The first transformer block of `model` (timm's Block and its relatives: a module with `attn`
    and `mlp`), through DDP, peft and EMA wrappers; None where there is none."""
    for module in model.modules():
        if isinstance(getattr(module, "attn", None), torch.nn.Module) and \
                isinstance(getattr(module, "mlp", None), torch.nn.Module):
            return module
    return None


def precision_shape(model: torch.nn.Module, block: torch.nn.Module, batch_size: int) -> Tuple[int, int, int]:
    """(images, tokens, width) of the block input `choose_precision` times: the model's tokens and
    width, and the run's batch capped at about MEASURE_ROWS token rows (the GEMMs' M; enough rows
    for the kernels' steady-state rate, few enough to stay near a second on two cores)."""
    vit = getattr(model, "module", model)
    patch_embed = next((m for m in vit.modules() if isinstance(getattr(m, "num_patches", None), int)), None)
    prefix = next((int(m.num_prefix_tokens) for m in vit.modules()
                   if isinstance(getattr(m, "num_prefix_tokens", None), int)), 1)
    tokens = (patch_embed.num_patches if patch_embed is not None else 196) + prefix
    width = next(m.in_features for m in block.modules() if isinstance(m, torch.nn.Linear))  # qkv's input
    batch = max(1, min(int(batch_size), math.ceil(MEASURE_ROWS / tokens)))
    return batch, tokens, int(width)


def time_precisions(block: torch.nn.Module, shape: Tuple[int, int, int], device: torch.device, train: bool = True,
                    budget_s: float = 1.0) -> Dict[str, List[float]]:
    """Seconds per forward (+ backward when `train`) of a float32 copy of `block` on random input
    of `shape`, in fp32 and under bf16 autocast, in alternating rounds after one warm-up each: at
    least MIN_ROUNDS (one when a precision is DECISIVE_RATIO times slower), more while within
    `budget_s`, at most MAX_ROUNDS. The block itself, its
    mode and the global RNG state are left exactly as they were."""
    device = torch.device(device)
    probe = copy.deepcopy(block).float().to(device).train(train)
    for parameter in probe.parameters():
        parameter.requires_grad_(train)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, generator=generator, device=device).requires_grad_(train)

        def run(precision: str) -> float:
            start = time.perf_counter()
            with (contextlib.nullcontext() if train else torch.inference_mode()), autocast(device, precision):
                out = probe(x)
            if train:
                out.float().sum().backward()
                probe.zero_grad(set_to_none=True)
                x.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        return alternate_rounds({name: (lambda name=name: run(name)) for name in ("fp32", "bf16")}, budget_s,
                                done=_decisive)


def _decisive(times: Dict[str, List[float]]) -> bool:
    """One precision several times slower than the other (bf16 emulated on a CPU without native bf16
    ran a ViT-B block 6-18x slower): more rounds could not change the verdict, only cost seconds."""
    best = [best_time(v) for v in times.values()]
    return max(best) > DECISIVE_RATIO * min(best)


def cache_dir() -> Path:
    """Where measured verdicts are kept: $FINETUNE_CACHE_DIR, else $XDG_CACHE_HOME/finetune, else
    ~/.cache/finetune."""
    if os.environ.get("FINETUNE_CACHE_DIR"):
        return Path(os.environ["FINETUNE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune"


def _read_precision_cache(key: str) -> Optional[Dict[str, Any]]:
    try:
        entry = json.loads((cache_dir() / PRECISION_CACHE).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(entry, dict) and all(isinstance(entry.get("times", {}).get(p), list) and entry["times"][p]
                                         for p in ("fp32", "bf16"))
    return entry if ok else None


def _write_precision_cache(key: str, times: Dict[str, List[float]]) -> None:
    """Add one verdict to the cache file, atomically; a cache that cannot be written (read-only home,
    another process racing) only costs the next run its measurement."""
    path = cache_dir() / PRECISION_CACHE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            entries = json.loads(path.read_text())
            entries = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            entries = {}
        entries[key] = {"times": times, "when": datetime.now().strftime("%Y-%m-%d %H:%M")}
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(entries, indent=1))
        os.replace(temp, path)
    except OSError:
        pass


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
    timed forward+backward in alternating rounds (best_time of each; about `budget_s` seconds). Only the part
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
    fused, explicit = best_time(times["fused"]), best_time(times["explicit"])
    chosen = "explicit" if fused > explicit * TIE_MARGIN else "fused"
    set_attention(model, chosen)
    b, h, n, d = shape
    faster = max(fused, explicit) / min(fused, explicit)
    verdict = (f"{faster:.2f}x faster than {'fused' if chosen == 'explicit' else 'explicit'}" if faster >= TIE_MARGIN
               else f"within {TIE_MARGIN - 1:.0%} of explicit, so the one that keeps less memory")
    return chosen, (f"auto: {chosen}, {verdict} (softmax(qk^T)v forward+backward, {b}x{h} heads x {n} tokens x "
                    f"{d}, {precision}, {torch.get_num_threads()} threads, best of {len(times['fused'])}: "
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

        return alternate_rounds({name: (lambda name=name: run(name)) for name in KERNELS}, budget_s)


def best_time(seconds: List[float]) -> float:
    """The fastest of repeated timings: what the kernel costs when nothing else holds the cores.
    Not the median: on a shared 2-core machine interference comes in bursts that hit alternate
    rounds (a DeiT-Tiny block measured fp32 17-43 ms, bf16 24-38 ms in one run), the median then
    fell on a slow fp32 round and took bf16, 1.4x slower at its best. Noise only ever adds time, so
    the minimum is the estimate it disturbs least (timeit's advice too)."""
    return min(seconds)


def alternate_rounds(contenders: Dict[str, Callable[[], float]], budget_s: float,
                     done: Optional[Callable[[Dict[str, List[float]]], bool]] = None) -> Dict[str, List[float]]:
    """The seconds each contender's call reports, in rounds whose order alternates (so drift in the
    machine's speed hits both alike), after one warm-up call each: at least MIN_ROUNDS unless
    `done(times)` says the verdict is settled, more while the total stays within `budget_s`, at
    most MAX_ROUNDS."""
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    began = time.perf_counter()
    for call in contenders.values():
        call()
    rounds = 0
    while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - began < budget_s):
        for name in (list(contenders) if rounds % 2 == 0 else list(reversed(contenders))):
            times[name].append(contenders[name]())
        rounds += 1
        if done is not None and done(times):
            break
    return times


# =================================================================================== optimizer
def optimizer_kwargs(device: torch.device, opt: str = "adamw", grad_scaler: bool = False) -> Dict[str, Any]:
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

    Not for momentum SGD under an fp16 grad scaler (`grad_scaler`): the scaler hands a fused
    optimizer its `found_inf` instead of skipping the step, and torch's fused SGD (2.14) allocates its
    momentum buffers with `empty_like` on the first step and returns on `found_inf` before filling
    them, so after an overflowing first step the next one moves the weights by uninitialised memory
    (NaN or 1e36 seen; tests/test_cuda.py). Fused AdamW initialises its state and is safe.
    """
    device = torch.device(device)
    if grad_scaler and opt in ("sgd", "momentum"):
        return {}
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
