"""Fast-by-default choices (finetune.speed) and the engine benchmark (finetune.bench).

No timing thresholds here: speed targets are reported by `make bench`, never asserted. These tests
check the choices follow their rules, leave the model and the randomness alone, and that the
benchmark reports every number it promises, with FLOPs that agree with an independent count.
"""
from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from finetune import FinetuneError, speed
from finetune.loading import load_model

TINY = "scratch:patch_size=8,embed_dim=32,depth=2,num_heads=2"
CPU = torch.device("cpu")


def cpuinfo_with(*flags: str) -> str:
    return ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU\n"
            f"flags\t\t: fpu sse sse2 avx avx2 avx512f {' '.join(flags)}\n\nprocessor\t: 1\n")


def tiny_model(depth: int = 2, img_size: int = 32, **kwargs):
    return load_model(f"scratch:patch_size=8,embed_dim=32,depth={depth},num_heads=2", num_classes=5,
                      img_size=img_size, **kwargs)


# ----------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("flags, expected", [
    (("amx_bf16", "amx_tile", "avx512_bf16"), "bf16"),   # AMX: bf16 matmuls run several times fp32
    (("amx_bf16",), "bf16"),
    (("avx512_bf16",), "fp32"),                          # AVX-512 BF16 alone measured slower than fp32
    ((), "fp32"),
])
def test_auto_precision_on_cpu_follows_the_cpuinfo_flags(flags, expected):
    text = cpuinfo_with(*flags)
    assert speed.resolve_precision("auto", CPU, cpuinfo=text) == expected
    choice, reason = speed.choose_precision("auto", CPU, cpuinfo=text)
    assert choice == expected and reason.startswith(f"auto: {expected}")
    if flags:
        assert any(flag in reason for flag in flags)  # the log says which flag decided


def test_cpu_flags_reads_the_flags_line_only():
    assert speed.cpu_flags(cpuinfo_with("amx_bf16")) >= {"avx512f", "amx_bf16"}
    assert speed.cpu_flags("model name\t: amx_bf16 inside a name\n") == frozenset()
    assert speed.cpu_name(cpuinfo_with()) == "Test CPU"


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_explicit_precisions_pass_through_on_every_device(requested):
    for device in (CPU, torch.device("cuda"), torch.device("meta")):
        assert speed.resolve_precision(requested, device, cpuinfo=cpuinfo_with()) == requested


def test_an_unknown_precision_is_a_one_line_error():
    with pytest.raises(FinetuneError, match="precision: 'bf32' is not one of auto, fp32, bf16, fp16"):
        speed.resolve_precision("bf32", CPU)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs /proc/cpuinfo (Linux)")
def test_the_real_machines_auto_precision_matches_its_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":")[0].strip() == "flags":
            flags = set(line.split(":", 1)[1].split())
            break
    # AMX also needs the kernel's permission for its tile state; torch asks, as oneDNN does.
    init_amx = getattr(getattr(torch._C, "_cpu", None), "_init_amx", lambda: True)
    expected = "bf16" if "amx_bf16" in flags and init_amx() and torch.backends.mkldnn.is_available() else "fp32"
    assert speed.resolve_precision("auto", CPU) == expected


# ----------------------------------------------------------------------------------- attention
def test_set_attention_toggles_every_block_and_both_kernels_agree():
    model = tiny_model(depth=3).eval()
    modules = speed.attention_modules(model)
    assert len(modules) == 3
    x = torch.randn(4, 3, 32, 32)
    outputs, grads = {}, {}
    for mode in ("explicit", "fused", "explicit"):
        speed.set_attention(model, mode)
        assert all(m.fused_attn is (mode == "fused") for m in modules)
        assert speed.current_attention(model) == mode
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        outputs[mode], grads[mode] = out.detach(), model.blocks[0].attn.qkv.weight.grad.clone()
    assert (outputs["fused"] - outputs["explicit"]).abs().max() <= 1e-5
    assert (grads["fused"] - grads["explicit"]).abs().max() <= 1e-4 * max(1.0, grads["explicit"].abs().max())


def test_set_attention_refuses_an_unknown_mode():
    with pytest.raises(FinetuneError, match="attention: 'flash' is not one of fused, explicit"):
        speed.set_attention(tiny_model(), "flash")


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())


@pytest.mark.parametrize("train", [True, False])
def test_auto_attention_is_a_valid_choice_and_changes_no_weight_mode_or_randomness(train):
    model = tiny_model().train(train)
    model.blocks[1].eval()  # a mixed tree of modes must come back exactly as it was
    weights, modes, rng, py_rng, np_rng = _snapshot(model)
    chosen, detail = speed.choose_attention(model, CPU, "fp32", batch_size=4)
    assert chosen in ("fused", "explicit")
    assert speed.current_attention(model) == chosen
    assert detail.startswith(f"auto: {chosen}") and "median of" in detail
    after_weights, after_modes, after_rng, after_py, after_np = _snapshot(model)
    assert after_modes == modes
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)
    assert torch.equal(rng, after_rng) and py_rng == after_py and np.array_equal(np_rng, after_np)


def test_auto_attention_under_bf16_autocast_is_a_valid_choice():
    model = tiny_model()
    chosen, detail = speed.choose_attention(model, CPU, "bf16", batch_size=2)
    assert chosen in ("fused", "explicit") and "bf16" in detail


def test_the_attention_measurement_is_bounded_in_rounds():
    shape = (1, 2, 17, 16)
    quick = speed.time_attention_kernels(shape, CPU, "fp32", budget_s=0.0)
    assert {len(v) for v in quick.values()} == {speed.MIN_ROUNDS}
    endless_budget = speed.time_attention_kernels(shape, CPU, "fp32", budget_s=1e9)
    assert {len(v) for v in endless_budget.values()} == {speed.MAX_ROUNDS}
    assert all(t > 0 for v in endless_budget.values() for t in v)


def test_requested_attention_passes_through_without_measuring(monkeypatch):
    monkeypatch.setattr(speed, "time_attention_kernels", _must_not_run)
    model = tiny_model()
    for mode in ("explicit", "fused"):
        assert speed.choose_attention(model, CPU, "fp32", 4, requested=mode) == (mode, f"{mode} as requested")
        assert speed.current_attention(model) == mode


def test_cuda_takes_the_fused_kernel_unmeasured(monkeypatch):
    monkeypatch.setattr(speed, "time_attention_kernels", _must_not_run)
    model = tiny_model()
    speed.set_attention(model, "explicit")
    chosen, detail = speed.choose_attention(model, torch.device("cuda"), "bf16", 16)
    assert chosen == "fused" and speed.current_attention(model) == "fused" and "not timed" in detail


def test_explicit_attention_is_ruled_out_when_its_matrices_would_not_fit(monkeypatch):
    monkeypatch.setattr(speed, "time_attention_kernels", _must_not_run)
    monkeypatch.setattr(speed, "available_memory_bytes", lambda: 1000)
    model = tiny_model()
    chosen, detail = speed.choose_attention(model, CPU, "fp32", 4)
    assert chosen == "fused" and "GiB" in detail
    # depth 2 x batch 4 x 2 heads x 17 tokens^2 x 4 bytes
    assert speed.explicit_attention_extra_bytes(model, 4, torch.float32) == 2 * 4 * 2 * 17 * 17 * 4


def test_the_measured_shape_is_the_models_with_a_capped_batch():
    model = tiny_model(img_size=64)  # 8x8 patches + the class token
    batch, heads, tokens, head_dim = speed.attention_shape(model, 64)
    assert (heads, tokens, head_dim) == (2, 65, 16)
    assert 1 <= batch <= max(speed.MEASURE_BATCH, math.ceil(2 * torch.get_num_threads() / 2))
    assert speed.attention_shape(model, 1)[0] == 1


def _must_not_run(*args, **kwargs):
    raise AssertionError("the attention kernels were timed")


# ----------------------------------------------------------------------------------- optimizer
def test_optimizer_kwargs_are_fused_on_cuda_and_valid_here():
    assert speed.optimizer_kwargs(torch.device("cuda")) == {"fused": True}
    assert speed.optimizer_kwargs("meta") == {}


@pytest.mark.parametrize("name, extra", [("momentum", {"momentum": 0.9}), ("adamw", {})])
def test_optimizer_kwargs_build_timms_optimizers_and_step_like_the_default(name, extra):
    model = tiny_model()
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    fast = create_optimizer_v2(model, opt=name, lr=0.01, weight_decay=0.05, **extra, **speed.optimizer_kwargs(CPU))
    plain = create_optimizer_v2(twin, opt=name, lr=0.01, weight_decay=0.05, **extra)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    # Two steps: the same update up to rounding. (Later AdamW steps amplify rounding where the true
    # gradient is 0, e.g. the key biases, whose gradient softmax cancels: m / sqrt(v) of noise.)
    for _ in range(2):
        for net, opt in ((model, fast), (twin, plain)):
            F.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), key


# ----------------------------------------------------------------------------------- structure
def test_speed_sits_low_and_bench_never_imports_the_cli():
    from test_structure import package_imports
    graph = package_imports()
    assert graph["speed"] <= {"errors", "loading"}
    assert "cli" not in graph["bench"]


# ----------------------------------------------------------------------------------- bench
def vit_flops_per_image(img_size: int, patch: int, dim: int, depth: int, mlp_ratio: float, classes: int) -> float:
    """The analytic count: matmul FLOPs (2 per multiply-add) of the forward, tripled for
    forward+backward, except the patch embedding, whose input needs no gradient (2x)."""
    patches = (img_size // patch) ** 2
    tokens = patches + 1
    hidden = int(dim * mlp_ratio)
    block = 2 * tokens * dim * 3 * dim + 2 * 2 * tokens * tokens * dim + 2 * tokens * dim * dim \
        + 2 * 2 * tokens * dim * hidden
    embed = 2 * patches * 3 * patch * patch * dim
    return 3 * (depth * block + 2 * dim * classes) + 2 * embed


@pytest.fixture(scope="module")
def tiny_bench():
    from finetune.bench import bench
    return bench(TINY, img_size=32, batch_size=4, steps=2, warmup=1, num_classes=5)


def test_bench_reports_every_number_positive_and_finite(tiny_bench):
    from finetune.bench import REQUIRED_KEYS
    result = tiny_bench
    numbers = [k for k in REQUIRED_KEYS if k not in ("device", "precision", "attention", "weights")]
    for key in numbers:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["precision"] in ("fp32", "bf16") and result["attention"] in ("fused", "explicit")
    assert result["weights"] == "random (scratch)"
    assert result["device"].startswith("cpu")
    # ratios and MFU are medians of per-round (paired) values
    times = result["step_seconds"]
    assert set(times) == {"engine", "ppv_fp32", "timm_fp32", "timm_bf16"}
    assert all(len(v) == 2 for v in times.values())
    assert result["engine_img_s"] == pytest.approx(4 / statistics.median(times["engine"]))
    assert result["engine_vs_ppv_fp32"] == pytest.approx(
        statistics.median(p / e for p, e in zip(times["ppv_fp32"], times["engine"])))
    assert result["engine_vs_timm_bf16"] == pytest.approx(
        statistics.median(b / e for b, e in zip(times["timm_bf16"], times["engine"])))
    assert result["matmul_peak_flops"] == max(result["matmul_peak_rounds"])
    assert result["mfu_rounds"] == pytest.approx([4 * result["flops_per_img"] / t / peak for t, peak in
                                                  zip(times["engine"], result["matmul_peak_rounds"])])
    assert result["mfu"] == pytest.approx(statistics.median(result["mfu_rounds"]))
    assert result["data_decoder"] in ("pil", "decode_jpeg")
    assert json.loads(json.dumps(result)) == result  # --json prints it as is


def test_bench_flops_match_an_independent_count(tiny_bench):
    # 1. the analytic ViT formula, within 5%
    analytic = vit_flops_per_image(32, 8, 32, 2, 4.0, 5)
    assert tiny_bench["flops_per_img"] == pytest.approx(analytic, rel=0.05)
    # 2. torch's counter over a real forward+backward of the plain timm model, explicit attention
    from torch.utils.flop_counter import FlopCounterMode
    model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                             num_heads=2, num_classes=5)
    speed.set_attention(model, "explicit")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(torch.randn(1, 3, 32, 32)), torch.tensor([1])).backward()
    assert tiny_bench["flops_per_img"] == counter.get_total_flops()


def test_format_bench_shows_the_rates_and_ratios(tiny_bench):
    from finetune.bench import format_bench
    text = format_bench(tiny_bench)
    for needle in ("pytorch-pretrained-vit", "timm, fp32", "timm, bf16 autocast, fused attention",
                   "finetune engine", "engine vs", "MFU", "per worker", "evaluation"):
        assert needle in text, needle


def test_bench_of_a_zoo_model_offline_uses_random_weights_and_can_skip_baselines():
    from finetune.bench import bench, format_bench
    result = bench("Ti_16", img_size=32, batch_size=2, steps=1, warmup=0, baselines=False, data=False,
                   precision="fp32", attention="explicit")
    assert result["weights"] == "random (not cached)"
    assert result["precision"] == "fp32" and result["attention"] == "explicit"
    assert result["engine_img_s"] > 0 and result["flops_per_img"] > 0
    for key in ("ppv_fp32_img_s", "timm_fp32_img_s", "timm_bf16_img_s", "engine_vs_ppv_fp32", "engine_vs_timm_bf16"):
        assert result[key] is None
    assert "skipped" in format_bench(result)


@pytest.mark.parametrize("ref, architecture", [("B_16", "vit_base_patch16_384"), ("ppv:B_16_imagenet1k",
                                                                                    "vit_base_patch16_384")])
def test_an_uncached_ref_is_benched_with_random_weights_of_its_architecture(ref, architecture):
    from finetune.bench import bench_model
    model, weights = bench_model(ref, 37, 32)
    assert weights == "random (not cached)"
    assert (model.embed_dim, len(model.blocks), model.patch_embed.patch_size) == (768, 12, (16, 16))
    assert model.patch_embed.img_size == (32, 32) and model.num_classes == 37


def test_the_ppv_baseline_has_the_engine_models_shape():
    from finetune.bench import ppv_model
    model = tiny_model()
    ppv = ppv_model(model)
    assert ppv is not None
    assert sum(p.numel() for p in ppv.parameters()) == pytest.approx(sum(p.numel() for p in model.parameters()),
                                                                      rel=0.01)
    assert ppv(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_the_ppv_baseline_of_a_b16_is_the_seed_notes_model_by_name(monkeypatch):
    from pytorch_pretrained_vit import model as ppv
    from finetune.bench import ppv_model
    built = {}
    monkeypatch.setattr(ppv, "ViT", lambda *args, **kwargs: built.update(args=args, kwargs=kwargs) or "vit")
    with torch.device("meta"):
        b16 = timm.create_model("vit_base_patch16_384", pretrained=False, num_classes=37, img_size=64)
    assert ppv_model(b16) == "vit"
    assert built["args"] == ("B_16_imagenet1k",)
    assert built["kwargs"] == {"pretrained": False, "image_size": 64, "num_classes": 37}
