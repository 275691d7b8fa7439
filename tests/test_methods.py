"""The fine-tuning methods (issue 11): each recipe key changes training as documented."""
from __future__ import annotations

import json

import pytest
import torch

import finetune
from finetune import engine, methods, soup
from finetune.checkpoints import read_checkpoint
from finetune.data import build_transforms
from finetune.loading import load_model
from finetune.recipes import load_recipe

TINY = ["model=scratch:patch_size=4,embed_dim=32,depth=2,num_heads=2,mlp_ratio=2", "batch_size=32",
        "schedule.warmup_epochs=0", "max_steps_per_epoch=3", "precision=fp32", "data.augment=none",
        "attention=fused"]  # runs compared bitwise must not each time their own kernel (auto)


def tiny_vit(depth=3):
    model = load_model(f"scratch:patch_size=8,embed_dim=32,depth={depth},num_heads=2", num_classes=4, img_size=32)
    with torch.no_grad():  # a new head starts at zero: logits would say nothing
        model.head.weight.normal_(0, 1.0)
    return model


def train(tmp_path, overrides, name="run"):
    return engine.train_recipe("demo", TINY + overrides, out_dir=str(tmp_path / name), progress=False)


def point_of(run):
    return torch.load(run / "last.state.pt", map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ EMA
def test_ema_weights_equal_a_hand_ema_of_the_raw_weights(tmp_path, monkeypatch):
    raw_after_each_step = []
    real_step = engine._optimizer_step

    def recording_step(model, *args):
        real_step(model, *args)
        raw_after_each_step.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    monkeypatch.setattr(engine, "_optimizer_step", recording_step)
    result = train(tmp_path, ["epochs=2", "model_ema.decay=0.8"])
    decay, hand = 0.8, None
    for step, raw in enumerate(raw_after_each_step, start=1):
        # timm's ModelEmaV3 copies the weights at the first update (its decay is 0 at step 1).
        hand = {k: v.clone() for k, v in raw.items()} if step == 1 else \
            {k: decay * hand[k] + (1 - decay) * raw[k] if raw[k].is_floating_point() else raw[k] for k in raw}
    ema = point_of(result.run_dir)["ema"]
    assert len(raw_after_each_step) == 6
    for key, value in hand.items():
        assert torch.allclose(ema[key], value, atol=1e-6), key
    assert not torch.equal(ema["head.weight"], raw_after_each_step[-1]["head.weight"])


def test_ema_is_evaluated_ranked_and_kept_under_its_own_name(tmp_path):
    result = train(tmp_path, ["epochs=3", "model_ema.decay=0.5", "keep_best=6"])
    run = result.run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("ema_val_top1" in r and "val_top1" in r for r in rows)
    best = json.loads((run / "best.json").read_text())["checkpoints"]
    assert {b["weights"] for b in best} == {"raw", "ema"} and len(best) == 6
    ema_file = run / "epoch-003-ema.safetensors"
    assert ema_file.is_file()
    assert torch.equal(read_checkpoint(ema_file)[0]["head.weight"], point_of(run)["ema"]["head.weight"])
    made = soup.make_soup([run], evaluate=False)  # raw and EMA checkpoints soup together
    assert len(finetune.read_meta(made)["soup"]["ingredients"]) == 6


def test_a_run_with_ema_resumes_exactly(tmp_path, monkeypatch):
    straight = train(tmp_path, ["epochs=2", "model_ema.decay=0.7"], "straight").run_dir
    train(tmp_path, ["epochs=1", "model_ema.decay=0.7"], "resumed")
    resumed = engine.resume_run(str(tmp_path / "resumed"), ["epochs=2"], progress=False).run_dir
    a, b = point_of(straight), point_of(resumed)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"]) and a["steps"] == b["steps"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---------------------------------------------------------------------------------- layer decay
def test_layer_decay_scales_each_layers_lr(tmp_path):
    model = tiny_vit(depth=3)
    recipe = load_recipe("demo", ["optimizer.layer_decay=0.5", "optimizer.lr=0.01", "optimizer.weight_decay=0.05"])
    optimizer = engine.build_optimizer(recipe, model)
    lr_of = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    # timm's layer ids for a ViT: embeddings 0, block i -> i + 1, head and final norm -> depth + 1.
    assert lr_of[id(params["head.weight"])] == pytest.approx(0.01)
    assert lr_of[id(params["blocks.2.mlp.fc1.weight"])] == pytest.approx(0.01 * 0.5)
    assert lr_of[id(params["blocks.0.attn.qkv.weight"])] == pytest.approx(0.01 * 0.5 ** 3)
    assert lr_of[id(params["pos_embed"])] == pytest.approx(0.01 * 0.5 ** 4)
    engine.set_epoch_lr(optimizer, recipe, 1)
    assert {g["lr"] for g in optimizer.param_groups} == {g["initial_lr"] * engine.lr_factor(recipe, 1)
                                                          for g in optimizer.param_groups}


# ---------------------------------------------------------------------------- drop path, dropout
def test_drop_path_and_dropout_are_set_on_the_modules_not_the_architecture():
    model = tiny_vit(depth=3)
    arch = dict(model.finetune_info["arch"])
    methods.set_drop_rates(model, drop_path=0.2, dropout=0.1)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    dropouts = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert {p for name, p in dropouts.items() if not name.endswith("attn_drop")} == {0.1}
    assert {p for name, p in dropouts.items() if name.endswith("attn_drop")} == {0.0}
    assert model.finetune_info["arch"] == arch
    model.train()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(model(x), model(x))  # stochastic in training
    model.eval()
    assert torch.equal(model(x), model(x))


# ------------------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("spec,frozen_prefixes,trained_prefixes", [
    ("backbone", ("patch_embed", "blocks.0", "blocks.1", "pos_embed", "norm."), ("head.",)),
    ("blocks:1", ("patch_embed", "pos_embed", "cls_token", "blocks.0."), ("blocks.1.", "head.")),
])
def test_frozen_parameters_do_not_change(tmp_path, monkeypatch, spec, frozen_prefixes, trained_prefixes):
    initial = {}
    real_prepare = methods.prepare

    def recording_prepare(model, recipe):
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_prepare(model, recipe)

    monkeypatch.setattr(methods, "prepare", recording_prepare)
    before = initial
    after = read_checkpoint(train(tmp_path, ["epochs=2", f"freeze={spec}", "optimizer.lr=0.01"]).run_dir
                            / "last.safetensors")[0]
    assert before.keys() == after.keys()
    for key in before:
        changed = not torch.allclose(before[key], after[key], atol=1e-7)
        if key.startswith(frozen_prefixes):
            assert not changed, f"{key} changed though frozen"
        if key.startswith(trained_prefixes) and key.endswith("weight"):
            assert changed, f"{key} did not train"


def test_freeze_blocks_beyond_the_depth_is_a_one_line_error():
    with pytest.raises(finetune.FinetuneError, match="blocks:9.*depth"):
        methods.freeze(tiny_vit(depth=3), "blocks:9")


# ----------------------------------------------------------------------------------------- LoRA
def test_lora_trains_adapters_and_head_and_its_merged_checkpoint_has_the_same_logits(tmp_path):
    model = tiny_vit(depth=2)
    recipe = load_recipe("demo", ["lora.rank=4", "lora.alpha=8"])
    adapted = methods.add_lora(model, recipe)
    trainable, total = methods.trainable_share(adapted)
    dim, hidden, depth, rank = 32, 128, 2, 4
    lora = depth * rank * ((dim + 3 * dim) + (dim + hidden) + (hidden + dim))  # A and B of qkv, fc1, fc2
    assert trainable == lora + 4 * dim + 4  # + the head
    with torch.no_grad():  # B starts at zero (no change); give the adapters something to merge
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    x = torch.randn(3, 3, 32, 32)
    adapted.eval()
    expected = adapted(x)
    path = finetune.save_checkpoint(tmp_path / "lora.safetensors", adapted, state=methods.plain_state(adapted))
    state, _ = read_checkpoint(path)
    assert not any("lora" in k or "base_layer" in k for k in state)
    reloaded = load_model(str(path)).eval()
    assert torch.allclose(reloaded(x), expected, atol=1e-5)
    unadapted = tiny_vit(depth=2)
    unadapted.load_state_dict(methods.unadapted_state(adapted.state_dict()))
    assert not torch.allclose(unadapted.eval()(x), expected, atol=1e-3)  # the adapters did change it


def test_a_lora_run_writes_plain_checkpoints_logs_the_trainable_share_and_resumes_exactly(tmp_path, capsys):
    straight = train(tmp_path, ["epochs=2", "lora.rank=2", "optimizer.lr=0.01"], "straight").run_dir
    assert "trainable parameters:" in capsys.readouterr().out
    train(tmp_path, ["epochs=1", "lora.rank=2", "optimizer.lr=0.01"], "resumed")
    resumed = engine.resume_run(str(tmp_path / "resumed"), ["epochs=2"], progress=False).run_dir
    a, b = read_checkpoint(straight / "last.safetensors")[0], read_checkpoint(resumed / "last.safetensors")[0]
    assert a.keys() == set(load_model(str(straight / "last.safetensors")).state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- mixup, erasing
def test_mixup_mixes_the_inputs_until_its_off_epoch(tmp_path, monkeypatch):
    seen = {}
    real = engine._loss

    def spy(model, images, labels, recipe, mixup):
        seen.setdefault(len(seen) + 1, mixup is not None)
        return real(model, images, labels, recipe, mixup)

    monkeypatch.setattr(engine, "_loss", spy)
    train(tmp_path, ["epochs=3", "max_steps_per_epoch=1", "mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0",
                     "mixup.off_epoch=3"])
    assert seen == {1: True, 2: True, 3: False}
    mixup = methods.make_mixup(load_recipe("demo", ["mixup.mixup_alpha=0.8"]), num_classes=10)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, targets = mixup(images.clone(), labels)
    assert not torch.equal(mixed, images) and targets.shape == (4, 10)
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_random_erasing_erases_part_of_training_images_only():
    from PIL import Image
    config = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    plain = build_transforms(config, 32, "none", train=True)(image)
    torch.manual_seed(0)
    erased = build_transforms(config, 32, "none", train=True, random_erasing=1.0)(image)
    evaluation = build_transforms(config, 32, "none", train=False)(image)
    assert not torch.equal(plain, erased) and torch.equal(plain, evaluation)
    assert (erased != plain).float().mean() < 0.5  # a patch, not the whole image
