"""See inside (issue 8): attention maps, rollout, position embeddings, features and the figures."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import finetune
from finetune import engine, evaluation, viz
from finetune.checkpoints import save_checkpoint
from finetune.errors import FinetuneError
from finetune.recipes import load_recipe

from conftest import DEIT_WEIGHTS, REPO, require_shared

TINY_RUN = ["epochs=2", "max_steps_per_epoch=3", "schedule.warmup_epochs=0", "batch_size=32",
            "model=scratch:patch_size=4,embed_dim=32,depth=2,num_heads=2,mlp_ratio=2"]


def tiny_vit(**kwargs) -> VisionTransformer:
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=3, **kwargs)
    return model.eval()


def attention_by_hand(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) from each block's qkv weights, q/k norms applied, layer by layer."""
    maps = []
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks:
            attn = block.attn
            batch, tokens, dim = x.shape
            qkv = F.linear(block.norm1(x), attn.qkv.weight, attn.qkv.bias)
            q, k, _ = qkv.reshape(batch, tokens, 3, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(q), attn.k_norm(k)
            maps.append((q @ k.transpose(-2, -1) / (dim // attn.num_heads) ** 0.5).softmax(-1))
            x = block(x)
    return torch.stack(maps, dim=1)


# ------------------------------------------------------------------------------- attention maps
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("kwargs", [{}, {"qk_norm": True}, {"class_token": False, "global_pool": "avg"},
                                    {"reg_tokens": 4}], ids=["cls", "qk_norm", "no_class_token", "registers"])
def test_attention_maps_equal_hand_computation_with_either_kernel(kwargs, fused):
    model = tiny_vit(**kwargs)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.fused_attn = fused  # fused: the SDPA path timm's own AttentionExtract cannot see
            if kwargs.get("qk_norm"):
                block.attn.q_norm.weight.normal_()
                block.attn.k_norm.bias.normal_()
    assert model.blocks[0].attn.fused_attn is fused
    images = torch.randn(2, 3, 32, 32)
    before = model(images)

    maps = viz.attention_maps(model, images)

    tokens = 16 + model.num_prefix_tokens
    assert maps.shape == (2, 3, 4, tokens, tokens)
    torch.testing.assert_close(maps, attention_by_hand(model, images), atol=1e-5, rtol=0)
    assert torch.equal(model(images), before)
    assert all(block.attn.fused_attn is fused for block in model.blocks)
    assert not any(module.training for module in model.modules())


def test_attention_maps_restore_each_modules_mode_and_refuse_non_vits():
    model = tiny_vit().train()
    model.blocks[1].eval()
    modes = [module.training for module in model.modules()]
    viz.attention_maps(model, torch.randn(1, 3, 32, 32))
    assert [module.training for module in model.modules()] == modes
    with pytest.raises(FinetuneError, match="not a ViT"):
        viz.attention_maps(torch.nn.Linear(3, 3), torch.randn(1, 3))


def test_features_are_what_the_head_reads():
    model = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    feats = viz.features(model, images)
    assert feats.shape == (3, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.head(feats), model(images))


# -------------------------------------------------------------------------------------- rollout
@pytest.mark.parametrize("head_fusion", viz.HEAD_FUSIONS)
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.9])
def test_rollout_rows_sum_to_one(head_fusion, discard_ratio):
    maps = viz.attention_maps(tiny_vit(reg_tokens=2), torch.randn(2, 3, 32, 32))
    joint = viz.rollout_matrix(maps, discard_ratio, head_fusion)
    assert joint.shape == (2, 19, 19) and (joint >= 0).all()
    torch.testing.assert_close(joint.sum(-1), torch.ones(2, 19))
    heat = viz.attention_rollout(maps, discard_ratio, head_fusion, num_prefix_tokens=3)
    assert heat.shape == (2, 4, 4)


def test_discarding_never_drops_the_cls_to_cls_link():
    maps = torch.full((1, 1, 1, 5, 5), 0.2)
    maps[..., 0, 0] = 0.0001  # the weakest link of all
    fused = viz._discard_lowest(viz._fuse_heads(maps, "mean"), 0.9)
    assert fused[0, 0, 0, 0] > 0 and (fused > 0).sum() < 25


def test_cls_attention_and_mean_query_row_without_class_token():
    maps = torch.rand(2, 3, 4, 17, 17).softmax(-1)
    last = viz.cls_attention(maps, num_prefix_tokens=1)
    torch.testing.assert_close(last, maps[:, -1].mean(1)[:, 0, 1:].reshape(2, 4, 4))
    pooled = torch.rand(2, 3, 4, 16, 16).softmax(-1)
    torch.testing.assert_close(viz.cls_attention(pooled, num_prefix_tokens=0, class_token=False),
                               pooled[:, -1].mean(1).mean(1).reshape(2, 4, 4))
    with pytest.raises(FinetuneError, match="square grid"):
        viz.cls_attention(torch.rand(1, 1, 1, 13, 13), num_prefix_tokens=1)
    assert viz.cls_attention(torch.rand(1, 1, 1, 13, 13), grid=(3, 4)).shape == (1, 3, 4)


PATCH, GRID = 8, 4


def shapes() -> torch.Tensor:
    cross = torch.zeros(PATCH, PATCH)
    cross[3:5, :] = cross[:, 3:5] = 1
    square = torch.zeros(PATCH, PATCH)
    square[[0, 1, -2, -1], :] = square[:, [0, 1, -2, -1]] = 1
    diagonal = torch.eye(PATCH)
    return torch.stack([cross, square, ((diagonal + diagonal.flip(1)) > 0).float()])


def object_in_clutter(n: int, generator: torch.Generator):
    """32x32 noise with two random blobs; the class is which shape sits on a random patch."""
    tiles = torch.rand(n, GRID * GRID, PATCH, PATCH, generator=generator) * 0.5
    labels = torch.randint(0, 3, (n,), generator=generator)
    order = torch.rand(n, GRID * GRID, generator=generator).argsort(dim=1)
    where, clutter, rows = order[:, 0], order[:, 1:3], torch.arange(n)
    blobs = (torch.rand(n, 2, PATCH, PATCH, generator=generator) < 0.35).float()
    tiles[rows[:, None], clutter] = torch.maximum(tiles[rows[:, None], clutter], blobs)
    tiles[rows, where] = torch.maximum(tiles[rows, where], shapes()[labels])
    images = tiles.view(n, GRID, GRID, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(n, 1, 32, 32)
    return (images.expand(-1, 3, -1, -1) - 0.5) / 0.5, labels, where


def share_on(heat: torch.Tensor, where: torch.Tensor) -> float:
    """Mean fraction of the patch mass on the object's patch, over all images."""
    flat = heat.flatten(1)
    return (flat[torch.arange(len(where)), where] / flat.sum(1)).mean().item()


def test_rollout_finds_the_small_object_that_decides_the_class():
    generator = torch.Generator().manual_seed(0)
    train_x, train_y, _ = object_in_clutter(3000, generator)
    test_x, test_y, where = object_in_clutter(500, generator)
    model = VisionTransformer(img_size=32, patch_size=PATCH, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2,
                              num_classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for batch in torch.randperm(len(train_x), generator=generator).split(64):  # one epoch is enough
        loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(test_x).argmax(1) == test_y).float().mean() >= 0.9

    maps = viz.attention_maps(model, test_x)
    layout = viz.token_layout(model)
    uniform = 1 / GRID ** 2
    # The settings the figures use (strongest head, faintest 90% of links dropped): measured
    # 10-12x the uniform share for seeds 0-2.
    assert share_on(viz.attention_rollout(maps, viz.ROLLOUT_DISCARD_RATIO, viz.ROLLOUT_HEAD_FUSION, **layout),
                    where) >= 3 * uniform
    # Plain rollout (mean of heads, nothing dropped) is more diffuse (2.6-3.7x), as is the last
    # layer alone (2.7-4.5x): both still clearly on the object.
    assert share_on(viz.attention_rollout(maps, **layout), where) >= 2 * uniform
    assert share_on(viz.cls_attention(maps, **layout), where) >= 2 * uniform


# --------------------------------------------------------------------------- position embeddings
def test_deit_tiny_position_embeddings_are_most_similar_nearby():
    require_shared(DEIT_WEIGHTS)
    similarity = viz.posembed_similarity(finetune.load_model(str(DEIT_WEIGHTS)))
    assert similarity.shape == (196, 14, 14)
    flat = similarity.flatten(1)
    assert torch.equal(flat.argmax(1), torch.arange(196))
    rows, cols = np.divmod(np.arange(196), 14)
    row_gap = np.abs(rows[:, None] - rows[None, :])
    col_gap = np.abs(cols[:, None] - cols[None, :])
    neighbours = torch.from_numpy(row_gap + col_gap == 1)          # the 4-neighbourhood
    far = torch.from_numpy(np.maximum(row_gap, col_gap) >= 4)      # Chebyshev distance >= 4
    near_mean = torch.stack([flat[i][neighbours[i]].mean() for i in range(196)]).mean()
    far_mean = torch.stack([flat[i][far[i]].mean() for i in range(196)]).mean()
    assert near_mean > far_mean + 0.3, (near_mean, far_mean)


@pytest.mark.parametrize("kwargs, prefix", [({}, 1), ({"no_embed_class": True, "reg_tokens": 2}, 0),
                                            ({"class_token": False, "global_pool": "avg"}, 0)])
def test_posembed_similarity_skips_prefix_positions(kwargs, prefix):
    model = tiny_vit(**kwargs)
    expected = F.normalize(model.pos_embed[0, prefix:].detach(), dim=-1)
    torch.testing.assert_close(viz.posembed_similarity(model).flatten(1), expected @ expected.T)


def test_model_without_position_embedding_is_a_one_line_error():
    with pytest.raises(FinetuneError, match="no learned position embedding") as error:
        viz.posembed_similarity(tiny_vit(pos_embed="none"))
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------- figures
@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    """A real run of the demo recipe (digits, 16px, patch 4): 2 epochs of 3 steps."""
    out = tmp_path_factory.mktemp("viz") / "run"
    return engine.train(load_recipe("demo", TINY_RUN), out_dir=str(out), progress=False)


@pytest.fixture(scope="module")
def tiny_run(tiny_result):
    return tiny_result.run_dir


@pytest.fixture()
def photos(tmp_path):
    rng = np.random.default_rng(0)
    paths = [tmp_path / "a" / "digit.png", tmp_path / "b" / "digit.jpg", tmp_path / "other.png"]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(path)
    return paths


def expected_pixels(figsize) -> tuple:
    return tuple(round(inches * viz.DPI) for inches in figsize)


def assert_picture(path, figsize) -> None:
    assert path.is_file() and path.suffix == ".png"
    with Image.open(path) as image:
        assert image.size == expected_pixels(figsize)
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, f"{path} looks blank"
    assert path.stat().st_size < 200_000


@pytest.mark.parametrize("method", viz.ATTENTION_METHODS)
@pytest.mark.parametrize("style", viz.ATTENTION_STYLES)
def test_attention_figures_one_per_image(tiny_run, photos, tmp_path, method, style):
    checkpoint = viz.resolve_checkpoint(tiny_run)
    written = viz.write_attention_figures(checkpoint, photos, tmp_path / "out", method=method, style=style)
    assert [p.name for p in written] == [f"digit.{method}-{style}.png", f"digit-2.{method}-{style}.png",
                                         f"other.{method}-{style}.png"]
    for path in written:
        assert_picture(path, viz.ATTENTION_FIGSIZE)


def test_posembed_confusion_tsne_and_curves_figures(tiny_run, tmp_path):
    checkpoint = viz.resolve_checkpoint(tiny_run)
    assert_picture(viz.write_posembed_figure(checkpoint, tmp_path / "pos.png"), viz.POSEMBED_FIGSIZE)
    assert_picture(viz.write_confusion_figure(tiny_run, tmp_path / "confusion.png", split="test"),
                   viz.CONFUSION_FIGSIZE)
    assert_picture(viz.write_tsne_figure(checkpoint, tmp_path / "tsne.png"), viz.TSNE_FIGSIZE)
    other = tmp_path / "other-run"
    other.mkdir()
    shutil.copy(tiny_run / "recipe.yaml", other)
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    (other / "metrics.jsonl").write_text("".join(json.dumps({**r, "val_top1": r["val_top1"] / 2}) + "\n"
                                                 for r in rows))
    assert_picture(viz.write_curves_figure([tiny_run, other], tmp_path / "curves.png"), viz.CURVES_FIGSIZE)


def test_run_pictures_land_in_the_run_directory(tiny_run):
    written = viz.write_run_pictures(tiny_run)
    assert written == [tiny_run / "curves.png", tiny_run / "confusion.png"]
    assert_picture(written[0], viz.CURVES_FIGSIZE)
    assert_picture(written[1], viz.CONFUSION_FIGSIZE)


def test_the_confusion_picture_after_training_reuses_the_runs_own_scores(tiny_result, tmp_path, monkeypatch):
    # The training run's val scores of its best checkpoint are what scoring it again gives...
    best_val = tiny_result.best_val
    again = evaluation.evaluate_on_split(viz.resolve_checkpoint(tiny_result.run_dir), split="val", store=False)
    assert best_val["confusion"] == again["confusion"] and best_val["class_names"] == again["class_names"]
    assert best_val["loss"] == pytest.approx(again["loss"], rel=1e-5)
    # ...so the picture takes them instead of scoring it again; another split's picture still scores.
    monkeypatch.setattr(viz, "evaluate_on_split", _must_not_score)
    out = tmp_path / "confusion.png"
    assert_picture(viz.write_confusion_figure(tiny_result.run_dir, out, report=best_val), viz.CONFUSION_FIGSIZE)
    with pytest.raises(AssertionError, match="scored again"):
        viz.write_confusion_figure(tiny_result.run_dir, out, split="test", report=best_val)


def _must_not_score(*args, **kwargs):
    raise AssertionError("scored again")


def test_posembed_figure_of_a_large_grid_shows_every_kth_patch(tmp_path):
    model = finetune.load_model("scratch:patch_size=8,embed_dim=16,depth=1,num_heads=2,img_size=192,num_classes=2")
    checkpoint = save_checkpoint(tmp_path / "grid24.safetensors", model)
    assert_picture(viz.write_posembed_figure(checkpoint, tmp_path / "pos.png"), viz.POSEMBED_FIGSIZE)
    assert viz._similarity_mosaic(viz.posembed_similarity(model).numpy(), 2).shape == (12 * 25 - 1, 12 * 25 - 1)


# ---------------------------------------------------------------------------------- bad input
def one_line_error_naming(path, call) -> None:
    with pytest.raises(FinetuneError) as error:
        call()
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message


def test_unreadable_images_are_one_line_errors_naming_the_file(tiny_run, photos, tmp_path):
    checkpoint = viz.resolve_checkpoint(tiny_run)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    for bad in (notes, broken):
        one_line_error_naming(bad, lambda: viz.write_attention_figures(checkpoint, [photos[0], bad], tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # every file is checked before anything is written


def test_checkpoint_without_position_embedding_is_a_one_line_error(tmp_path):
    model = finetune.load_model("scratch:patch_size=4,embed_dim=16,depth=1,num_heads=2,img_size=16,"
                                "num_classes=2,pos_embed=none")
    checkpoint = save_checkpoint(tmp_path / "no-pos.safetensors", model)
    one_line_error_naming(checkpoint, lambda: viz.write_posembed_figure(checkpoint, tmp_path / "pos.png"))
    assert not (tmp_path / "pos.png").exists()


def test_bad_arguments_are_one_line_errors(tiny_run, tmp_path):
    checkpoint = viz.resolve_checkpoint(tiny_run)
    with pytest.raises(FinetuneError, match="method"):
        viz.write_attention_figures(checkpoint, [], tmp_path, method="grad-cam")
    with pytest.raises(FinetuneError, match="head_fusion"):
        viz.rollout_matrix(torch.rand(1, 1, 1, 5, 5), head_fusion="median")
    one_line_error_naming(tmp_path / "nowhere", lambda: viz.write_tsne_figure(tmp_path / "nowhere", tmp_path / "t.png"))
    one_line_error_naming(tmp_path, lambda: viz.write_curves_figure([tmp_path], tmp_path / "c.png"))


def test_importing_viz_leaves_matplotlib_unloaded():
    code = "import sys, finetune.viz; assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
