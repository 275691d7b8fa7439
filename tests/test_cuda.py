"""What only a CUDA machine can check (issue 14): scoring, bf16 autocast, fp16 with the grad scaler,
the fused optimizer, pinned loaders, torch.compile and a whole (tiny) `engine.train` run on the GPU.

Every test here is marked `cuda` (the module's `pytestmark`) and skips, with the reason, where
`torch.cuda.is_available()` is False: on a CPU-only machine `make test` collects them and reports
them skipped. `make gpu-check` (tools/gpu_check.py) runs them with `pytest -m cuda tests/test_cuda.py`
on a machine that has a GPU, beside the B_16 benchmark and a real fine-tune.

Nothing here needs ../shared or a download: the models are tiny `scratch:` ViTs and the data is
scikit-learn's bundled digits (the `demo` recipe's dataset) or tensors made in the test.

Tolerances are reasoned where they are set. The fp32 comparisons run with TF32 switched off
(cuDNN's convolutions, which the patch embedding uses, default to TF32 on Ampere and later), so
both sides are IEEE fp32 and differ only by the order of summation; the bf16 ones allow for bf16's
8 significant bits.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from finetune import data as data_lib
from finetune import engine, rundir, speed
from finetune.checkpoints import read_checkpoint, read_meta
from finetune.evaluation import evaluate
from finetune.loading import data_config_of, load_model
from finetune.recipes import recipe_from_dict

NO_CUDA = (f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
           f"{torch.version.cuda or 'none'}); these tests run on a GPU machine (`make gpu-check`)")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

TINY = "scratch:patch_size=4,embed_dim=32,depth=2,num_heads=2,mlp_ratio=2"
IMG = 16
CLASSES = 10
# The demo recipe (digits) cut down to seconds: a tiny ViT, 4 optimizer steps per epoch.
TINY_RUN = ["epochs=2", "schedule.warmup_epochs=0", "max_steps_per_epoch=4", "batch_size=32", f"model={TINY}",
            "keep_best=2", "data.augment=none"]
# The engine's two optimizers (recipe `optimizer.name`), with momentum and decay so every term counts.
OPTIMIZERS = [{"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
              {"name": "adamw", "lr": 0.01, "weight_decay": 0.05}]
OPTIMIZER_IDS = ["momentum-sgd", "adamw"]


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture
def cuda():
    return torch.device("cuda")


@pytest.fixture
def no_tf32():
    """Plain fp32 on both sides for the duration of a test (restored after)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_model(seed: int = 0):
    """A 2-block ViT for 16 px digits. `scratch:` builds a zero head for new classes (every logit 0,
    every prediction a tie), so the head gets random weights here: logits with a spread of ~3."""
    model = load_model(TINY, num_classes=CLASSES, img_size=IMG)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator) * 0.5)
        model.head.bias.zero_()
    return model


def digits_splits(model):
    return data_lib.build_datasets("digits", None, img_size=IMG, data_config=data_config_of(model), augment="none",
                                   val_split=0.1, test_split=0.2, seed=0)


def tiny_recipe(precision: str, optimizer=None, batch_size: int = 16):
    return recipe_from_dict({"name": "cuda-test", "model": TINY, "img_size": IMG, "epochs": 1,
                             "batch_size": batch_size, "precision": precision,
                             "optimizer": optimizer or {"name": "sgd", "lr": 0.1, "momentum": 0.9,
                                                        "weight_decay": 0.0},
                             "schedule": {"name": "none"}, "data": {"dataset": "digits", "workers": 0,
                                                                    "augment": "none"}},
                            source="<tests/test_cuda.py>")


def one_batch(batch_size: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch_size, 3, IMG, IMG, generator=generator),
            torch.randint(0, CLASSES, (batch_size,), generator=generator))


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().float().cpu().flatten() for p in model.parameters()])


def cpu_logits(model, loader) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(images) for images, _ in loader])


def near_ties(logits: torch.Tensor, margin: float) -> int:
    """How many samples have their two best logits closer than `margin`: the only ones whose
    top-1 may legitimately differ between two computations that agree to `margin / 2`."""
    top2 = logits.float().topk(2, dim=1).values
    return int((top2[:, 0] - top2[:, 1] < margin).sum())


# ------------------------------------------------------------------------------------ scoring
def test_evaluate_on_cuda_equals_the_cpu_result(cuda, no_tf32):
    """`evaluation.evaluate` on CUDA vs the CPU, same weights, same loader (digits val, 180 images).

    fp32: IEEE fp32 on both sides (TF32 off), differing only in summation order (GEMM blocking, the
    memory-efficient SDPA kernel vs the CPU's): each dot product (length <= 128 here) carries a
    relative error ~sqrt(K) * 2^-24 ~ 1e-6, so through 2 blocks the logits (spread ~3) agree to
    ~1e-5 and the mean loss to ~1e-5; we allow 1e-4 (10x margin). Top-1 may differ only on a
    sample whose two best CPU logits are within 1e-3 (100x the expected logit error).

    bf16 (what `precision: auto` scores with on a GPU that has it): every matmul input rounded to 8
    significant bits (relative 2^-9 ~ 2e-3 per rounding, accumulation in fp32); ~10 roundings deep
    (qkv, proj, fc1, fc2 per block, the head) the logits move by ~1% of their scale, ~3% at the
    worst of 1800 logits: we allow 5% of the largest |logit|, 0.05 on the mean loss (~2.3 for a
    random model), and top-1 flips only on samples whose two best logits are within twice that.
    """
    model = tiny_model().eval()
    splits = digits_splits(model)
    loader = data_lib.build_loader(splits.val, batch_size=64, train=False, workers=0)
    reference_logits = cpu_logits(model, loader)
    cpu = evaluate(model, loader, device=torch.device("cpu"), precision="fp32")
    model.to(cuda)
    on_cuda = evaluate(model, loader, device=cuda, precision="fp32")
    assert on_cuda["n"] == cpu["n"] == len(splits.val)
    assert abs(on_cuda["loss"] - cpu["loss"]) <= 1e-4, (on_cuda["loss"], cpu["loss"])
    flips = sum(abs(a - b) for a, b in zip(sum(on_cuda["confusion"], []), sum(cpu["confusion"], []))) // 2
    assert flips <= near_ties(reference_logits, 1e-3), (on_cuda["top1"], cpu["top1"])
    assert abs(on_cuda["top1"] - cpu["top1"]) * cpu["n"] <= near_ties(reference_logits, 1e-3)

    if torch.cuda.is_bf16_supported():
        bf16 = evaluate(model, loader, device=cuda, precision="bf16")
        with torch.inference_mode(), torch.autocast(cuda.type, dtype=torch.bfloat16):
            bf16_logits = torch.cat([model(images.to(cuda)).float().cpu() for images, _ in loader])
        tolerance = 0.05 * reference_logits.abs().max().item()
        assert (bf16_logits - reference_logits).abs().max() <= tolerance
        assert abs(bf16["loss"] - cpu["loss"]) <= 0.05, (bf16["loss"], cpu["loss"])
        assert abs(bf16["top1"] - cpu["top1"]) * cpu["n"] <= near_ties(reference_logits, 2 * tolerance)
    assert next(model.parameters()).device.type == cuda.type and not model.training  # evaluate restores the mode


# ---------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_training_step_follows_the_fp32_step(cuda):
    """`engine.train_one_epoch` with `precision: bf16` on CUDA: the matmuls run in bf16 (a hook
    on the first qkv projection sees bf16), the loss is finite, and the SGD update it makes points
    where the CPU's fp32 update points. bf16 gradients carry ~2^-9 relative rounding per element,
    uncorrelated between elements, so over the ~20k parameters the two updates' cosine similarity
    is ~0.9999; we ask for 0.99 and the norms within 5%."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")
    images, labels = one_batch()
    loader = [(images, labels)]
    start, updates = tiny_model(), {}
    for device, precision in ((torch.device("cpu"), "fp32"), (cuda, "bf16")):
        model = copy.deepcopy(start).to(device)
        recipe = tiny_recipe(precision)
        optimizer = engine.build_optimizer(recipe, model, device)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        seen = []
        hook = model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        before = flat(model)
        stats = engine.train_one_epoch(model, loader, optimizer, scaler, recipe=recipe, epoch=1, device=device,
                                       progress=False)
        hook.remove()
        assert math.isfinite(stats["loss"]) and stats["steps"] == 1
        assert seen == [torch.bfloat16 if precision == "bf16" else torch.float32]
        updates[precision] = flat(model) - before
    cosine = F.cosine_similarity(updates["bf16"], updates["fp32"], dim=0).item()
    ratio = (updates["bf16"].norm() / updates["fp32"].norm()).item()
    assert cosine >= 0.99 and abs(ratio - 1) <= 0.05, (cosine, ratio)


def test_fp16_run_keeps_an_enabled_grad_scaler(cuda, tmp_path):
    """`precision: fp16` on CUDA: the engine builds `torch.amp.GradScaler("cuda", enabled=True)`,
    trains with it (finite losses) and commits its state (the loss scale) in the resume point."""
    result = engine.train_recipe("demo", TINY_RUN + ["precision=fp16"], out_dir=str(tmp_path / "run"),
                                 progress=False)
    assert result.status == "finished"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows)
    scaler_state = rundir.read_resume_point(tmp_path / "run")["scaler"]
    assert scaler_state.get("scale", 0) > 0, scaler_state   # a disabled scaler's state is {}
    assert read_meta(tmp_path / "run" / "last.safetensors")["recipe"]["precision"] == "fp16"


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_fp16_grad_scaler_skips_an_overflowing_step_and_takes_the_next(cuda, optimizer):
    """The scaler in the engine's step, with the optimizer the engine builds on CUDA (fused). A loss
    scale of 2^40 overflows fp16 (the logits' gradient is ~2^40 / batch; fp16's maximum is 65504):
    the step must be skipped, the scale halved and the weights left as they were. Then, at 2^10
    (logit gradients <= 2^10 / 16 = 64, weight gradients far below 65504), the next step goes
    through, and must land where torch's stock (unfused) optimizer lands after the same two steps.

    A fused optimizer takes the scaler's `found_inf` into its kernel instead of being skipped by
    the scaler, so what a skipped step leaves behind is the fused kernel's business: torch's fused
    SGD allocates its momentum buffers with `empty_like` on the first step and its kernel returns on
    found_inf before filling them, so after a skipped first step the buffers hold whatever memory
    they got (NaN here on the CPU, torch 2.14), and the next step moves the weights by that.

    Tolerance: both runs do the same fp16 forward and backward on the same GPU; they may differ by a
    few fp16 roundings of the gradient (2^-11 relative) where a kernel accumulates atomically, so
    the updates agree to ~1e-3 of their size; we allow 1e-2 of the largest update."""
    start = tiny_model()
    recipe = tiny_recipe("fp16", optimizer)
    loader = [one_batch()]
    after = {}
    for name, device in (("engine", cuda), ("stock", None)):
        model = copy.deepcopy(start).to(cuda)
        built = engine.build_optimizer(recipe, model, device)   # device=None: no fused flag
        # The engine leaves momentum SGD unfused under the scaler (speed.optimizer_kwargs says why).
        fused_here = name == "engine" and bool(speed.optimizer_kwargs(cuda, recipe.optimizer.name, grad_scaler=True))
        assert bool(built.defaults.get("fused")) == fused_here
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40, enabled=True)
        engine.train_one_epoch(model, loader, built, scaler, recipe=recipe, epoch=1, device=cuda, progress=False)
        assert scaler.get_scale() == 2.0 ** 39
        assert torch.equal(flat(model), flat(start))   # the step was skipped
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10, enabled=True)
        stats = engine.train_one_epoch(model, loader, built, scaler, recipe=recipe, epoch=1, device=cuda,
                                       progress=False)
        assert math.isfinite(stats["loss"]) and scaler.get_scale() == 2.0 ** 10   # no overflow, no backoff
        after[name] = flat(model)
    update = after["stock"] - flat(start)
    assert update.abs().max() > 0
    assert torch.isfinite(after["engine"]).all(), (
        "the engine's fused optimizer made non-finite weights on the step after a skipped (overflowed) one")
    error = (after["engine"] - after["stock"]).abs().max().item()
    assert error <= 1e-2 * update.abs().max().item(), (error, update.abs().max().item())


# ---------------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_fused_optimizer_step_equals_a_float64_cpu_reference(cuda, optimizer):
    """`speed.optimizer_kwargs('cuda')` is `fused=True`, and `engine.build_optimizer` builds that
    optimizer; three steps on CUDA from fresh N(0, 1) gradients land where torch's plain CPU
    implementation lands in float64 from the same fp32 weights and gradients (exact in float64).

    Tolerance: the fused kernel does each update in fp32, a handful of roundings of 2^-24 relative
    per step (AdamW's sqrt, division and bias corrections included, ~1e-5 relative of the update
    at worst for its fp32 `1 - beta2^step`), so after 3 steps the weights (|w| <~ 1) are within
    ~1e-7 of the float64 ones. We allow 1e-6 absolute + 1e-5 relative: 10x that, and still ~1000x
    below one update (lr x |g| ~ 1e-2), which a wrong momentum, decay or bias correction would
    move by."""
    assert speed.optimizer_kwargs(cuda) == {"fused": True}
    recipe = tiny_recipe("fp32", optimizer)
    model = tiny_model().to(cuda)
    reference = copy.deepcopy(model).cpu().double()
    fused = engine.build_optimizer(recipe, model, cuda)
    plain = engine.build_optimizer(recipe, reference)   # no device: torch's default (single-tensor) loop
    assert fused.defaults.get("fused") is True and not plain.defaults.get("fused")
    start = flat(reference).double()
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            grad = torch.randn(p.shape, generator=generator)
            p.grad, q.grad = grad.to(cuda), grad.double()
        fused.step()
        plain.step()
    got = torch.cat([p.detach().cpu().double().flatten() for p in model.parameters()])
    want = torch.cat([q.detach().flatten() for q in reference.parameters()])
    error = (got - want).abs()
    assert (error <= 1e-6 + 1e-5 * want.abs()).all(), error.max().item()
    assert (want - start).abs().max() > 1e-3   # the steps did move the weights: the comparison has teeth


# ------------------------------------------------------------------------------------ loaders
@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_pin_memory_on_a_cuda_machine(cuda, workers):
    """`data.build_loader` sets `pin_memory=torch.cuda.is_available()`: on a CUDA machine every
    batch (training and evaluation) arrives in page-locked memory, which is what makes the engine's
    `.to(device, non_blocking=True)` an asynchronous copy. (On a CPU-only machine nothing is pinned;
    the flag follows CUDA's presence, not the run's device.)"""
    model = tiny_model()
    splits = digits_splits(model)
    train = data_lib.build_loader(splits.train, batch_size=32, train=True, workers=workers, seed=0)
    data_lib.set_epoch(train, 1)
    val = data_lib.build_loader(splits.val, batch_size=64, train=False, workers=workers)
    for loader in (train, val):
        assert loader.pin_memory is True
        images, labels = next(iter(loader))
        assert images.is_pinned() and labels.is_pinned()
        on_device = images.to(cuda, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_device.cpu(), images)


# ------------------------------------------------------------------------------------ compile
def test_compiled_tiny_model_gives_the_eager_logits(cuda, no_tf32):
    """`torch.compile` (inductor, default mode, what `compile: true` does to the model in place) on
    CUDA: the compiled forward agrees with eager. Inductor fuses the pointwise work and rewrites
    LayerNorm and softmax reductions (the GEMMs stay cuBLAS's), all in fp32 here, so the logits
    (spread ~3) differ by rounding, ~1e-6; we allow 1e-4 absolute + 1e-4 relative."""
    model = tiny_model().to(cuda).eval()
    images = one_batch(32)[0].to(cuda)
    with torch.inference_mode():
        eager = model(images)
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled.compile()
    with torch.inference_mode():
        got = compiled(images)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0   # it did compile
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ a whole run
def test_tiny_train_run_on_cuda(tmp_path):
    """`engine.train` end to end on the GPU (the demo recipe's digits, a tiny ViT, 2 epochs of 4
    steps, `precision: auto`): it trains on CUDA, resolves `auto`, writes every file of a run
    directory, and its checkpoints are CPU tensors that load and score on the CPU."""
    result = engine.train_recipe("demo", TINY_RUN, out_dir=str(tmp_path / "run"), progress=False)
    run = tmp_path / "run"
    assert result.status == "finished" and result.best_checkpoint is not None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["val_top1"] <= 1 for r in rows)
    precision = read_meta(run / "last.safetensors")["recipe"]["precision"]
    assert precision in ("fp32", "bf16"), precision   # auto resolved (bf16 where the GPU has it)
    weights = read_checkpoint(result.best_checkpoint)[0]
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    test = json.loads((run / "results.json").read_text())["test"]
    assert 0 <= test["top1"] <= 1 and test["n"] > 0
    model = load_model(str(result.best_checkpoint))
    splits = digits_splits(model)
    loader = data_lib.build_loader(splits.test, batch_size=128, train=False, workers=0)
    on_cpu = evaluate(model, loader, device=torch.device("cpu"), precision="fp32")
    assert on_cpu["n"] == test["n"]
    # results.json was scored on CUDA under the run's precision: in bf16 the logits move by up to
    # ~5% of their scale (see the scoring test), in fp32 by TF32's rounding in the patch embedding
    # (cuDNN's default, 2^-11 relative: ~1%); only samples within twice that of a tie may flip.
    logits = cpu_logits(model, loader)
    margin = 2 * (0.05 if precision == "bf16" else 0.01) * logits.abs().max().item()
    assert abs(on_cpu["top1"] - test["top1"]) * test["n"] <= near_ties(logits, margin)
