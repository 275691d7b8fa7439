"""`finetune bench`: the engine's own training step, timed side by side with what users write by hand.

    result = bench("B_16", img_size=384, batch_size=4)      # precision and attention "auto", as `train`
    print(format_bench(result))

One process, one device, every contender timed in alternating rounds (a noisy neighbour slows all
of them alike) and reported as the median over rounds after warm-up:

    engine           `engine.train_one_epoch` over an in-memory loader of random images, with the model
                     from `loading.load_model`, the optimizer from `engine.build_optimizer` and the
                     precision and attention kernel `finetune.speed` picks: the same code path as
                     `finetune train`
    ppv fp32         pytorch-pretrained-vit's `ViT` of the same shape, fp32: the seed notes' way
    timm fp32        timm's VisionTransformer as `timm.create_model` gives it (fused attention), fp32
    timm bf16        the same under bf16 autocast, fused attention: the usual "fast" hand-written loop

The baselines are plain `loss.backward(); opt.step(); opt.zero_grad()` loops with torch's momentum SGD.
Beside the rates: model FLOPs per image (forward+backward, `torch.utils.flop_counter`), the best
matmul rate measured on the spot at the model's own GEMM shapes in the run's dtype, MFU against it
(and, on CUDA, against the card's datasheet bf16 peak), evaluation images/s, the data pipeline's
images/s per worker (PIL vs torchvision.io.decode_jpeg) and the step's peak memory.

Weights never matter for speed, so a ref whose weights are not cached is benched with random weights
of its architecture (nothing is downloaded); the result says which (`weights`).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import math
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import engine, evaluation, speed
from .errors import FinetuneError
from .loading import PPV_MODELS, ZOO, build_model, data_config_of, is_cached, load_model
from .recipes import recipe_from_dict

# bf16 dense tensor-core peaks (no sparsity), FLOP/s, from NVIDIA's datasheets; matched in order
# against torch.cuda.get_device_name. Used only for `mfu_card`; `mfu` uses the measured peak.
CARD_BF16_PEAK = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
                  ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12),
                  ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("A6000", 155e12))
REQUIRED_KEYS = ("engine_img_s", "ppv_fp32_img_s", "timm_fp32_img_s", "timm_bf16_img_s", "flops_per_img",
                 "matmul_peak_flops", "mfu", "device", "precision", "attention", "weights", "eval_img_s",
                 "data_img_s_per_worker", "peak_memory_bytes", "engine_vs_ppv_fp32", "engine_vs_timm_bf16")
SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"
BENCH_OPTIMIZER = {"name": "sgd", "lr": 0.002, "momentum": 0.9, "weight_decay": 0.0}   # pets37's


# ====================================================================================== bench
def bench(model_ref: str, img_size: Optional[int] = None, batch_size: int = 4, precision: str = "auto",
          device: Optional[str] = None, attention: str = "auto", steps: int = 3, warmup: int = 1,
          baselines: bool = True, num_classes: int = 37, eval_batch_size: Optional[int] = None,
          data: bool = True, data_images: Optional[str] = None, log: Optional[Callable[[str], None]] = None
          ) -> Dict[str, Any]:
    """Time the engine's training step for `model_ref` at `img_size` (default: the weights' own) and
    `batch_size`, beside the baselines (`baselines=False` skips them); see the module docstring.

    Returns one flat dict (JSON-ready); `REQUIRED_KEYS` are always present (None where skipped).
    `steps` rounds are timed after `warmup` rounds; `data_images` is a folder of JPEGs for the data
    pipeline (default: ../shared's hymenoptera photos when present, else JPEGs made in memory).
    """
    say = log or (lambda message: None)
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise FinetuneError(f"bench: steps ({steps}) and batch_size ({batch_size}) must be >= 1, warmup "
                            f"({warmup}) >= 0")
    began = time.perf_counter()
    dev = evaluation.choose_device(device)
    model, weights = bench_model(model_ref, num_classes, img_size)
    img_size = model.patch_embed.img_size[0]
    chosen_precision, precision_reason = speed.choose_precision(precision, dev, model, batch_size)
    model.to(dev)
    chosen_attention, attention_detail = speed.choose_attention(model, dev, chosen_precision, batch_size, attention)
    say(f"model {model_ref} ({weights}), {img_size}px, batch {batch_size}, {_device_label(dev)}")
    say(f"precision: {precision_reason}")
    say(f"attention: {attention_detail}")

    recipe = recipe_from_dict({"name": "bench", "model": model_ref, "img_size": img_size, "epochs": 1,
                               "batch_size": batch_size, "precision": chosen_precision,
                               "optimizer": dict(BENCH_OPTIMIZER), "schedule": {"name": "none"},
                               "data": {"dataset": "digits", "workers": 0, "augment": "none"}},
                              source="<bench>")
    optimizer = engine.build_optimizer(recipe, model, dev)   # as `finetune train` builds it: fused where torch can
    scaler = torch.amp.GradScaler(dev.type, enabled=chosen_precision == "fp16" and dev.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    if dev.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    loader = RepeatedBatch(images, labels, 1)

    def engine_step() -> None:
        engine.train_one_epoch(model, loader, optimizer, scaler, recipe=recipe, epoch=1, device=dev, progress=False)

    flops = count_flops_per_image(model, img_size, num_classes)
    probe = MatmulProbe(model, batch_size, chosen_precision, dev)
    contenders: Dict[str, Callable[[], Any]] = {"engine": engine_step}
    if baselines:
        contenders.update(_baselines(model, dev, images, labels, say))
    contenders["matmul"] = probe
    say(f"timing {', '.join(contenders)}: {warmup} warm-up + {steps} timed rounds")
    cpu_seconds: Dict[str, List[float]] = {}
    times = time_rounds(contenders, dev, steps, warmup, say, cpu=cpu_seconds)
    peaks = probe.rates[warmup:]  # the best GEMM rate of each timed round
    del times["matmul"], cpu_seconds["matmul"], contenders
    _free(dev)
    rates = {name: batch_size / statistics.median(seconds) for name, seconds in times.items()}
    best = {name: batch_size / min(seconds) for name, seconds in times.items()}
    # A neighbour's load (or the host's) moves every contender of a round alike, so ratios and MFU
    # are taken per round (paired) and their median reported; the rates are plain medians.
    mfu_rounds = [batch_size * flops / seconds / peak for seconds, peak in zip(times["engine"], peaks)]
    engine_flops = rates["engine"] * flops
    card_peak = card_bf16_peak(dev)

    def ratio(baseline: str) -> Optional[float]:
        if baseline not in times:
            return None
        return statistics.median(b / e for b, e in zip(times[baseline], times["engine"]))

    by_cpu_time = cpu_time_view(cpu_seconds, batch_size) if dev.type == "cpu" else None

    peak_bytes, state_bytes, peak_method = step_peak_memory(engine_step, model, optimizer, dev)
    eval_batch = eval_batch_size or 2 * batch_size
    eval_rate = eval_images_per_second(model, dev, chosen_precision, eval_batch, img_size, num_classes, steps, warmup)
    data_rates = (data_pipeline_rates(data_config_of(model), img_size, data_images) if data
                  else {"data_img_s_per_worker": None})

    result: Dict[str, Any] = {
        "model": model_ref, "weights": weights, "img_size": img_size, "batch_size": batch_size,
        "num_classes": num_classes, "device": _device_label(dev), "device_type": dev.type,
        "threads": torch.get_num_threads(), "precision": chosen_precision, "precision_requested": precision,
        "precision_reason": precision_reason, "attention": chosen_attention, "attention_requested": attention,
        "attention_detail": attention_detail, "optimizer": _optimizer_flags(optimizer),
        "steps": steps, "warmup": warmup,
        "engine_img_s": rates["engine"], "ppv_fp32_img_s": rates.get("ppv_fp32"),
        "timm_fp32_img_s": rates.get("timm_fp32"), "timm_bf16_img_s": rates.get("timm_bf16"),
        "engine_vs_ppv_fp32": ratio("ppv_fp32"), "engine_vs_timm_fp32": ratio("timm_fp32"),
        "engine_vs_timm_bf16": ratio("timm_bf16"),
        "best_img_s": best, "step_seconds": times,
        "flops_per_img": flops, "engine_flops_per_s": engine_flops,
        "matmul_peak_flops": max(peaks), "matmul_peak_shape": probe.best_shape, "matmul_peak_rounds": peaks,
        "mfu": statistics.median(mfu_rounds), "mfu_rounds": mfu_rounds,
        "card_peak_flops": card_peak, "mfu_card": engine_flops / card_peak if card_peak else None,
        "by_cpu_time": by_cpu_time, "step_cpu_seconds": cpu_seconds if dev.type == "cpu" else None,
        "eval_img_s": eval_rate, "eval_batch_size": eval_batch,
        **data_rates,
        "peak_memory_bytes": peak_bytes, "state_memory_bytes": state_bytes, "peak_memory_method": peak_method,
        "torch": torch.__version__, "timm": _timm_version(), "python": sys.version.split()[0],
        "elapsed_s": time.perf_counter() - began,
    }
    if data and result.get("data_img_s_per_worker"):
        result["workers_needed"] = math.ceil(rates["engine"] / result["data_img_s_per_worker"])
    return result


# =============================================================================== the model
def bench_model(ref: str, num_classes: int, img_size: Optional[int]) -> Tuple[torch.nn.Module, str]:
    """(model, weights): the model `loading.load_model` gives when its weights are on disk, else a
    randomly initialised one of the same architecture (weights do not change the speed, and a
    benchmark should not download hundreds of megabytes)."""
    scheme, sep, rest = ref.partition(":")
    if sep and scheme == "scratch":
        return load_model(ref, num_classes=num_classes, img_size=img_size), "random (scratch)"
    architecture = _architecture_of(ref)
    if architecture is None:  # a checkpoint path, hf:, npz: only the weights say what the model is
        if sep and scheme in ("hf", "npz") and not is_cached(ref):
            raise FinetuneError(f"bench: {ref} is not cached, and only its weights say which architecture it "
                                "is; bench the zoo name or timm:TAG of the same architecture instead (nothing "
                                "is downloaded for a benchmark)")
        return load_model(ref, num_classes=num_classes, img_size=img_size), "pretrained"
    source = ZOO[ref].sources[0] if ref in ZOO else ref
    if is_cached(source):
        return load_model(ref, num_classes=num_classes, img_size=img_size), "pretrained"
    if img_size is None:  # the architecture's own resolution, as the weights would have given it
        import timm
        with torch.device("meta"):
            img_size = timm.create_model(architecture, pretrained=False).patch_embed.img_size[0]
    return random_model({"timm_name": architecture}, num_classes, int(img_size)), "random (not cached)"


def random_model(arch: Dict[str, Any], num_classes: int, img_size: int) -> torch.nn.Module:
    """`loading.build_model(arch, ...)` with quick random weights: built on the meta device, then
    given storage and each layer's own `reset_parameters` (uniform / ones / zeros) and N(0, 0.02)
    embeddings. timm's truncated-normal init of B_16 takes tens of seconds on 2 cores, and the values
    never change the speed (they are finite and far from denormal either way)."""
    with torch.device("meta"):
        model = build_model(arch, num_classes, img_size)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "reset_parameters") and module is not model:
                module.reset_parameters()
        for name, param in model.named_parameters(recurse=False):
            param.normal_(0, 0.02, generator=generator)
    return model


def _architecture_of(ref: str) -> Optional[str]:
    if ref in ZOO:
        return ZOO[ref].timm_name
    scheme, _, rest = ref.partition(":")
    if scheme == "ppv" and rest in PPV_MODELS:
        return PPV_MODELS[rest][0]
    if scheme == "timm" and rest:
        return rest.split(".")[0]
    return None


class RepeatedBatch:
    """A loader of `count` copies of one in-memory batch: no decoding in the timed step."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, count: int):
        self.images, self.labels, self.count = images, labels, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.count):
            yield self.images, self.labels


# ============================================================================== baselines
def _baselines(model, device: torch.device, images: torch.Tensor, labels: torch.Tensor,
               say: Callable[[str], None]) -> Dict[str, Callable[[], None]]:
    """The hand-written loops, each with its own momentum-SGD optimizer."""
    contenders: Dict[str, Callable[[], None]] = {}
    ppv = ppv_model(model)
    if ppv is not None:
        ppv.to(device).train()
        contenders["ppv_fp32"] = hand_step(ppv, device, images, labels, "fp32")
    else:
        say("ppv fp32: skipped (pytorch-pretrained-vit is not installed or cannot build this shape)")
    # timm fp32 and timm bf16 step one model (weights do not change the speed; one copy of memory).
    timm_model = copy.deepcopy(getattr(model, "module", model)).train()
    speed.set_attention(timm_model, "fused")  # timm's default
    sgd = _sgd(timm_model)
    contenders["timm_fp32"] = hand_step(timm_model, device, images, labels, "fp32", sgd)
    contenders["timm_bf16"] = hand_step(timm_model, device, images, labels, "bf16", sgd)
    return contenders


def hand_step(model, device: torch.device, images: torch.Tensor, labels: torch.Tensor, precision: str,
              optimizer: Optional[torch.optim.Optimizer] = None) -> Callable[[], None]:
    """One step as users write it: forward under autocast, backward, SGD step, zero_grad."""
    optimizer = optimizer or _sgd(model)

    def step() -> None:
        x, y = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with speed.autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _sgd(model) -> torch.optim.Optimizer:
    """torch's momentum SGD with its defaults (what a hand-written loop uses)."""
    return torch.optim.SGD(model.parameters(), lr=BENCH_OPTIMIZER["lr"], momentum=BENCH_OPTIMIZER["momentum"])


def ppv_model(model) -> Optional[torch.nn.Module]:
    """pytorch-pretrained-vit's ViT with `model`'s shape (patch, width, depth, heads, MLP, classes,
    resolution), by its config name where one matches (B_16, B_32, L_16, L_32), else from explicit
    arguments. None when the package is missing or the shape is not one it can build."""
    try:
        from pytorch_pretrained_vit import model as ppv
        from pytorch_pretrained_vit.configs import PRETRAINED_MODELS
    except ImportError:
        return None
    vit = getattr(model, "module", model)
    block = vit.blocks[0]
    shape = dict(patches=vit.patch_embed.patch_size[0], dim=vit.embed_dim, ff_dim=block.mlp.fc1.out_features,
                 num_heads=block.attn.num_heads, num_layers=len(vit.blocks))
    size, classes = vit.patch_embed.img_size[0], vit.num_classes
    for name, entry in PRETRAINED_MODELS.items():  # e.g. B_16_imagenet1k, the seed notes' model
        config = dict(entry["config"], patches=tuple(entry["config"]["patches"])[0])
        if all(config.get(k) == v for k, v in shape.items()) and not config.get("representation_size"):
            return ppv.ViT(name, pretrained=False, image_size=size, num_classes=classes)
    # ViT(name=None) asserts on a module-level name that 0.0.7 never defines: define it (False).
    if not hasattr(ppv, "resize_positional_embedding"):
        ppv.resize_positional_embedding = False
    try:
        return ppv.ViT(None, pretrained=False, image_size=size, num_classes=classes, dropout_rate=0.1, **shape)
    except (AssertionError, RuntimeError, ValueError, TypeError):
        return None


# ================================================================================== timing
def time_rounds(contenders: Dict[str, Callable[[], None]], device: torch.device, steps: int, warmup: int,
                say: Callable[[str], None] = lambda m: None, cpu: Optional[Dict[str, List[float]]] = None
                ) -> Dict[str, List[float]]:
    """Seconds per call of each contender: `warmup` untimed rounds, then `steps` timed ones, each
    round calling every contender once (in an order that alternates, so none always runs first).
    With `cpu`, also this process's CPU seconds (all threads) per call, into `cpu[name]`."""
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    if cpu is not None:
        cpu.update({name: [] for name in contenders})
    names = list(contenders)
    for round_ in range(warmup + steps):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            cpu_before = time.process_time()
            seconds = timed(contenders[name], device)
            if round_ >= warmup:
                times[name].append(seconds)
                if cpu is not None:
                    cpu[name].append(time.process_time() - cpu_before)
        if round_ >= warmup:
            say(f"round {round_ - warmup + 1}/{steps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
    return times


def cpu_time_view(cpu_seconds: Dict[str, List[float]], batch_size: int) -> Dict[str, Any]:
    """The same comparison by CPU time (CPU only): on a machine shared with other jobs, wall time
    depends on how much of the CPU this process got, while the CPU seconds a step burns (over all
    threads) hardly do. Rates are images per (CPU seconds / threads), i.e. what the step would
    reach with the cores to itself; MFU divides FLOPs per CPU second by the matmul probe's."""
    threads = torch.get_num_threads()
    median = {name: statistics.median(seconds) for name, seconds in cpu_seconds.items()}
    view: Dict[str, Any] = {f"{name}_img_s": batch_size * threads / seconds for name, seconds in median.items()}
    for baseline in ("ppv_fp32", "timm_fp32", "timm_bf16"):
        view[f"engine_vs_{baseline}"] = median[baseline] / median["engine"] if baseline in median else None
    # No MFU by CPU time: MKL runs small GEMMs on fewer threads than it has, so a matmul probe's
    # FLOP per CPU second is not a peak that a multi-threaded step could reach.
    return view


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# =================================================================================== FLOPs
def count_flops_per_image(model, img_size: int, num_classes: int) -> int:
    """Model FLOPs of one image's forward+backward (cross-entropy loss), counted by
    `torch.utils.flop_counter` on a meta-device copy (no arithmetic is done). Attention is counted
    in its explicit form: the counter does not know the CPU flash kernel, and MFU counts the
    model's FLOPs, not a kernel's recomputation."""
    from torch.utils.flop_counter import FlopCounterMode
    vit = copy.deepcopy(getattr(model, "module", model)).float()
    speed.set_attention(vit, "explicit")
    vit = vit.to("meta").train()
    x = torch.empty(1, 3, img_size, img_size, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(vit(x), y).backward()
    return int(counter.get_total_flops())


def linear_shapes(model) -> List[Tuple[int, int]]:
    """(in_features, out_features) of the first block's Linear layers: qkv, proj, fc1, fc2 for a ViT."""
    vit = getattr(model, "module", model)
    block = vit.blocks[0] if hasattr(vit, "blocks") and len(vit.blocks) else vit
    shapes = []
    for module in block.modules():
        if isinstance(module, torch.nn.Linear) and (module.in_features, module.out_features) not in shapes:
            shapes.append((module.in_features, module.out_features))
    return shapes


class MatmulProbe:
    """The attainable matmul rate, measured beside the contenders: each call runs `F.linear` once in
    the run's dtype at each of the model's own GEMM shapes (M = batch x tokens, K x N of the qkv,
    proj, fc1 and fc2 weights) and appends the best FLOP/s of the call to `rates`. Timed in the same
    rounds as the training steps, so each round's MFU divides by a peak taken under that round's
    load (on a shared machine the attainable rate itself drifts by 2-3x over minutes)."""

    def __init__(self, model, batch_size: int, precision: str, device: torch.device):
        vit = getattr(model, "module", model)
        shape = speed.attention_shape(vit, 1)
        m = batch_size * (shape[2] if shape else 197)
        self.dtype = speed.LOWP_DTYPES.get(precision) or torch.float32
        self.device = device
        generator = torch.Generator(device=device).manual_seed(0)
        self.operands = [(torch.randn(m, k, generator=generator, device=device, dtype=self.dtype),
                          torch.randn(n, k, generator=generator, device=device, dtype=self.dtype))
                         for k, n in linear_shapes(vit)]
        self.inner = 10 if device.type == "cuda" else 1
        self.rates: List[float] = []  # FLOP/s, the best of each call
        self.best_shape: Optional[str] = None
        self._best = 0.0

    def __call__(self) -> float:
        best = 0.0
        with torch.no_grad():
            for a, w in self.operands:
                seconds = timed(lambda: [F.linear(a, w) for _ in range(self.inner)], self.device) / self.inner
                flop = 2 * a.shape[0] * a.shape[1] * w.shape[0]
                best = max(best, flop / seconds)
                if flop / seconds > self._best:
                    self._best = flop / seconds
                    self.best_shape = f"{a.shape[0]}x{a.shape[1]}x{w.shape[0]} {str(self.dtype).replace('torch.', '')}"
        self.rates.append(best)
        return best


def card_bf16_peak(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in CARD_BF16_PEAK:
        if key in name:
            return peak
    return None


# ================================================================================== memory
def step_peak_memory(step: Callable[[], None], model, optimizer, device: torch.device
                     ) -> Tuple[Optional[int], int, str]:
    """(peak bytes of one engine step above what was resident before it, bytes of the weights and
    optimizer state, how the peak was read). CUDA: `max_memory_allocated` minus `memory_allocated`
    before. CPU (Linux): the process's VmHWM, reset through /proc/self/clear_refs after giving
    freed heap back (malloc_trim), minus VmRSS before: activations, gradients and workspaces."""
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, state, "cuda max_memory_allocated - allocated before"
    _free(device)
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None, state, "not measured (no /proc/self/clear_refs to reset the peak RSS)"
    before = _proc_status_bytes("VmRSS")
    step()
    peak = _proc_status_bytes("VmHWM")
    if before is None or peak is None:
        return None, state, "not measured (no VmHWM in /proc/self/status)"
    return max(peak - before, 0), state, "VmHWM over one step (reset via /proc/self/clear_refs) - VmRSS before"


def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        found = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ==================================================================================== eval
def eval_images_per_second(model, device: torch.device, precision: str, batch_size: int, img_size: int,
                           num_classes: int, steps: int, warmup: int) -> float:
    """`evaluation.evaluate` (inference_mode, the run's autocast) over one in-memory batch per call;
    batch size / median seconds per call."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    loader = RepeatedBatch(images, labels, 1)
    times = time_rounds({"eval": lambda: evaluation.evaluate(model, loader, device=device, precision=precision)},
                        device, steps, warmup)
    return batch_size / statistics.median(times["eval"])


# ==================================================================================== data
def data_pipeline_rates(data_config: Dict[str, Any], img_size: int, folder: Optional[str] = None,
                        count: int = 16, rounds: int = 3) -> Dict[str, Any]:
    """Images/s of one data worker (one thread) decoding JPEG bytes held in memory and applying the
    training transform at `img_size` (resize, centre crop, flip, to float, normalise): PIL (what
    `finetune.data` does) vs `torchvision.io.decode_jpeg` + tensor transforms. Reports both and the
    faster."""
    files, source = jpeg_samples(folder, count)
    from . import data as data_lib
    pil_transform = data_lib.build_transforms(data_config, img_size, augment="flip", train=True)
    tensor_transform = _tensor_transform(data_config, img_size)
    from PIL import Image
    with warnings.catch_warnings():  # torchvision 0.29 points at torchcodec; decode_jpeg still works
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import decode_jpeg

    def pil() -> None:
        for raw in files:
            with Image.open(io.BytesIO(raw)) as image:
                pil_transform(image.convert("RGB"))

    def tensor() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for raw in files:
                tensor_transform(decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8)))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs one thread
    try:
        times = time_rounds({"pil": pil, "decode_jpeg": tensor}, torch.device("cpu"), rounds, 1)
    finally:
        torch.set_num_threads(threads)
    rates = {name: len(files) / statistics.median(seconds) for name, seconds in times.items()}
    best = max(rates, key=rates.get)
    return {"data_img_s_per_worker": rates[best], "data_decoder": best, "data_img_s_per_worker_pil": rates["pil"],
            "data_img_s_per_worker_decode_jpeg": rates["decode_jpeg"], "data_images": source}


def _tensor_transform(data_config: Dict[str, Any], img_size: int):
    from torchvision.transforms import InterpolationMode, v2
    crop_pct = float(data_config.get("crop_pct", 0.875))
    interpolation = InterpolationMode(data_config.get("interpolation", "bicubic"))
    resize = ([v2.Resize((img_size, img_size), interpolation=interpolation, antialias=True)] if crop_pct == 1.0 else
              [v2.Resize(int(img_size / crop_pct), interpolation=interpolation, antialias=True),
               v2.CenterCrop(img_size)])
    return v2.Compose(resize + [v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize(list(data_config["mean"]), list(data_config["std"]))])


def jpeg_samples(folder: Optional[str], count: int) -> Tuple[List[bytes], str]:
    """(JPEG bytes, where from): up to `count` JPEGs under `folder` (or ../shared's hymenoptera
    photos), else `count` 500x375 photo-like JPEGs encoded in memory."""
    root = Path(folder) if folder else SHARED_IMAGES
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:count] if root.is_dir() else []
    if paths:
        return [p.read_bytes() for p in paths], f"{len(paths)} JPEGs from {root}"
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(count):
        # Smooth colour fields plus noise compress like photos (pure noise would decode slower).
        low = torch.rand(3, 12, 16, generator=generator)
        image = F.interpolate(low[None], size=(375, 500), mode="bicubic", align_corners=False)[0]
        image = (image + 0.05 * torch.randn(image.shape, generator=generator)).clamp(0, 1)
        buffer = io.BytesIO()
        Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(buffer, format="JPEG", quality=90)
        samples.append(buffer.getvalue())
    return samples, f"{count} synthetic 500x375 JPEGs (no image folder found)"


# ================================================================================== report
def _optimizer_flags(optimizer: torch.optim.Optimizer) -> str:
    """"SGD (fused)", "AdamW (foreach)", or "SGD (default: ...)" as torch resolves foreach=None."""
    defaults = optimizer.defaults
    if defaults.get("fused"):
        return f"{type(optimizer).__name__} (fused)"
    if defaults.get("foreach"):
        return f"{type(optimizer).__name__} (foreach)"
    if defaults.get("foreach") is None:
        return f"{type(optimizer).__name__} (torch default: foreach on CUDA, single-tensor loop on CPU)"
    return f"{type(optimizer).__name__} (single-tensor loop)"


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({speed.cpu_name()}, {torch.get_num_threads()} threads)"
    return str(device)


def _timm_version() -> str:
    import timm
    return timm.__version__


def format_bench(result: Dict[str, Any]) -> str:
    """The human table of a `bench` result."""
    r = result

    def rate(x: Optional[float]) -> str:
        return "skipped" if x is None else f"{x:.3g}"


    def times(x: Optional[float]) -> str:
        return "" if x is None else f"{x:.2f}x"

    # "engine vs" is the median of per-round ratios (paired), so it is not always the quotient of the
    # median rates shown beside it.
    rows = [("pytorch-pretrained-vit, fp32 (the seeds' way)", r.get("ppv_fp32_img_s"), r.get("engine_vs_ppv_fp32")),
            ("timm, fp32", r.get("timm_fp32_img_s"), r.get("engine_vs_timm_fp32")),
            ("timm, bf16 autocast, fused attention", r.get("timm_bf16_img_s"), r.get("engine_vs_timm_bf16")),
            (f"finetune engine: {r['precision']}, {r['attention']} attention", r.get("engine_img_s"), None)]
    best = r.get("best_img_s") or {}
    by_cpu = r.get("by_cpu_time") or {}
    keys = ("ppv_fp32", "timm_fp32", "timm_bf16", "engine")
    lines = [f"finetune bench: {r['model']} ({r['weights']} weights), {r['img_size']}px, batch {r['batch_size']}, "
             f"{r['device']}",
             f"precision  {r['precision_reason']}",
             f"attention  {r['attention_detail']}",
             f"optimizer  {r['optimizer']}",
             "",
             f"{'training step, ' + str(r['steps']) + ' rounds':48} {'img/s':>9} {'best':>9} {'engine vs':>10}"
             + (f" {'by CPU time: img/s':>19} {'engine vs':>10}" if by_cpu else "")]
    for (label, value, versus), key in zip(rows, keys):
        line = f"{label:48} {rate(value):>9} {rate(best.get(key)):>9} {times(versus):>10}"
        if by_cpu:
            cpu_rate = by_cpu.get(f"{key}_img_s")
            line += f" {rate(cpu_rate):>19} {times(by_cpu.get(f'engine_vs_{key}')):>10}"
        lines.append(line)
    flops, peak = r.get("flops_per_img"), r.get("matmul_peak_flops")
    lines.append("")
    lines.append(f"FLOPs per image (fwd+bwd)   {_si(flops, 'FLOP')}" if flops else "FLOPs per image: n/a")
    if peak:
        lines.append(f"matmul peak, measured       {_si(peak, 'FLOP/s')} ({r['matmul_peak_shape']}; best of the rounds)")
        lines.append(f"engine achieved             {_si(r['engine_flops_per_s'], 'FLOP/s')} (median); MFU "
                     f"{r['mfu']:.1%} (per round: engine FLOP/s / that round's matmul peak; median)")
    if r.get("mfu_card"):
        lines.append(f"vs the card's bf16 peak     {r['card_peak_flops'] / 1e12:.0f} TFLOP/s: {r['mfu_card']:.1%}")
    lines.append(f"evaluation                  {rate(r.get('eval_img_s'))} img/s (batch {r['eval_batch_size']}, "
                 f"inference_mode, {r['precision']})")
    if r.get("data_img_s_per_worker"):
        lines.append(f"data, per worker            {rate(r['data_img_s_per_worker'])} img/s with {r['data_decoder']} "
                     f"(PIL {rate(r['data_img_s_per_worker_pil'])}, decode_jpeg "
                     f"{rate(r['data_img_s_per_worker_decode_jpeg'])}; {r['data_images']})"
                     + (f"; {r['workers_needed']} worker(s) keep up" if r.get("workers_needed") else ""))
    if r.get("peak_memory_bytes") is not None:
        lines.append(f"memory                      step peak {r['peak_memory_bytes'] / 2**20:.0f} MiB above resident "
                     f"weights+optimizer ({r['state_memory_bytes'] / 2**20:.0f} MiB) [{r['peak_memory_method']}]")
    lines.append(f"torch {r['torch']}, timm {r['timm']}, python {r['python']}; {r['elapsed_s']:.0f} s")
    return "\n".join(lines)
