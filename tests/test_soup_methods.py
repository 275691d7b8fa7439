"""Soups beyond the paper (issue 18): Model Stock, the learned soup, the logit ensemble as the reference."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch

import finetune
from finetune import compare, merging, soup
from finetune.checkpoints import read_checkpoint
from finetune.cli import compare_main, soup_main
from finetune.errors import FinetuneError
from finetune.recipes import DEMO_RECIPE
from finetune.soup import make_soup

from conftest import DEIT_WEIGHTS, HYMENOPTERA, require_shared, run_entry

SCRATCH = "scratch:patch_size=8,embed_dim=64,depth={depth},num_heads=4"


# ------------------------------------------------------------------------------------ fixtures
def pretrained_checkpoint(folder: Path, depth: int = 2) -> Path:
    """A "pretrained" model: 10 classes at 16 px (its fine-tunes: 3 classes at 24 px, a new head)."""
    model = finetune.load_model(SCRATCH.format(depth=depth), num_classes=10, img_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return finetune.save_checkpoint(folder / "pretrained.safetensors", model)


def at_finetune_shape(pre_path: Path):
    """The pretrained weights as the fine-tunes started from them (new zero head, pos_embed resampled)."""
    return finetune.load_model(str(pre_path), num_classes=3, img_size=24, class_names=["a", "b", "c"])


def finetunes(folder: Path, pre_path: Path, count: int, shared: float = 0.05, own: float = 0.05, edit=None):
    """`count` fine-tunes of `pre_path`: one shared delta plus one of each's own (cosines ~ 0.5)."""
    start = at_finetune_shape(pre_path)
    common = {k: torch.randn_like(v) * shared for k, v in start.state_dict().items()}
    paths = []
    for i in range(count):
        model = at_finetune_shape(pre_path)
        with torch.no_grad():
            for key, p in model.state_dict().items():
                p.add_(common[key] + torch.randn_like(p) * own)
            if edit:
                edit(i, model)
        paths.append(finetune.save_checkpoint(folder / f"ft{i}.safetensors", model, epoch=i + 1,
                                              metrics={"val_top1": 0.5 + i / 10}))
    return paths


def stock_by_hand(w0: torch.Tensor, tuned):
    """Model Stock for one tensor, written out with plain torch in float64."""
    k = len(tuned)
    deltas = [(w.double() - w0.double()).flatten() for w in tuned]
    cosines = [torch.dot(deltas[i], deltas[j]) / (deltas[i].norm() * deltas[j].norm())
               for i in range(k) for j in range(i + 1, k)]
    cos = float(sum(cosines) / len(cosines))
    t = k * cos / (1 + (k - 1) * cos)
    mean = torch.stack([w.double() for w in tuned]).mean(0)
    return t * mean + (1 - t) * w0.double(), t, cos


# --------------------------------------------------------------------------------- Model Stock
@pytest.mark.parametrize("k", [2, 3])
def test_model_stock_is_the_formula_per_tensor_and_the_head_is_the_mean(tmp_path, k):
    pre_path = pretrained_checkpoint(tmp_path)
    paths = finetunes(tmp_path, pre_path, k)
    out = make_soup([pre_path, *paths], method="stock", out=tmp_path / "stock.safetensors")
    merged, meta = read_checkpoint(out)
    w0 = at_finetune_shape(pre_path).state_dict()
    tuned = [read_checkpoint(p)[0] for p in paths]
    record = meta["soup"]
    assert record["method"] == "stock" and record["pretrained"] == "pretrained.safetensors"
    assert [i["path"] for i in record["ingredients"]] == [p.name for p in paths]
    assert sorted(record["mean_of_finetunes"]) == ["head.bias", "head.weight"]  # 10 classes there, 3 here
    for key, value in merged.items():
        if key.startswith("head."):
            mean = torch.stack([t[key].double() for t in tuned]).mean(0)
            torch.testing.assert_close(value.double(), mean, rtol=0, atol=1e-7)
            assert key not in record["t"]
            continue
        expected, t, cos = stock_by_hand(w0[key], [s[key] for s in tuned])
        assert 0.2 < cos < 0.8 and 0 < t < 1, (key, cos, t)
        assert record["t"][key] == pytest.approx(t, abs=1e-9) and record["cos"][key] == pytest.approx(cos, abs=1e-9)
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=2e-7)
    assert merged["pos_embed"].shape == tuned[0]["pos_embed"].shape  # merged with the resampled pretrained one
    assert "pos_embed" in record["t"]
    blocks = record["t_by_block"]
    assert set(blocks) == {"cls_token", "pos_embed", "patch_embed", "blocks.0", "blocks.1", "norm", "head"}
    assert blocks["head"]["t"] is None
    sizes = {key: value.numel() for key, value in merged.items()}
    block0 = [key for key in record["t"] if key.startswith("blocks.0.")]
    weighted = sum(record["t"][key] * sizes[key] for key in block0) / sum(sizes[key] for key in block0)
    assert blocks["blocks.0"]["t"] == pytest.approx(weighted)
    assert blocks["blocks.0"]["min"] == min(record["t"][key] for key in block0)
    model = finetune.load_model(str(out))
    assert model.num_classes == 3 and model.finetune_info["img_size"] == 24


def test_identical_finetunes_give_t_1_and_the_finetune_itself(tmp_path):
    pre_path = pretrained_checkpoint(tmp_path)
    [one] = finetunes(tmp_path, pre_path, 1)
    twin = tmp_path / "twin.safetensors"
    twin.write_bytes(one.read_bytes())
    out = make_soup([pre_path, one, twin], method="stock", out=tmp_path / "stock.safetensors")
    merged, meta = read_checkpoint(out)
    assert set(meta["soup"]["t"].values()) == {1.0} and meta["soup"]["t_mean"] == 1.0
    for key, value in read_checkpoint(one)[0].items():
        assert torch.equal(merged[key], value), key


def test_stock_edge_cases_zero_delta_unmoved_tensor_and_opposite_deltas(tmp_path):
    pre_path = pretrained_checkpoint(tmp_path)
    w0 = at_finetune_shape(pre_path).state_dict()
    first_delta = {}

    def edit(i, model):
        state = model.state_dict()
        state["blocks.0.norm1.bias"].copy_(w0["blocks.0.norm1.bias"])           # no fine-tune moved it
        if i == 0:
            state["blocks.1.norm2.weight"].copy_(w0["blocks.1.norm2.weight"])   # one fine-tune left it alone
            first_delta["fc2"] = state["blocks.1.mlp.fc2.bias"] - w0["blocks.1.mlp.fc2.bias"]
        else:                                                                   # exactly opposite moves: cos -1
            state["blocks.1.mlp.fc2.bias"].copy_(w0["blocks.1.mlp.fc2.bias"] - first_delta["fc2"])

    paths = finetunes(tmp_path, pre_path, 2, edit=edit)
    out = make_soup([pre_path, *paths], method="stock", out=tmp_path / "stock.safetensors")
    merged, meta = read_checkpoint(out)
    record = meta["soup"]
    assert record["t"]["blocks.0.norm1.bias"] is None and record["cos"]["blocks.0.norm1.bias"] is None
    assert torch.equal(merged["blocks.0.norm1.bias"], w0["blocks.0.norm1.bias"])
    # A zero delta counts as cosine 0: t = 0, the pretrained tensor.
    assert record["cos"]["blocks.1.norm2.weight"] == 0 and record["t"]["blocks.1.norm2.weight"] == 0
    assert torch.equal(merged["blocks.1.norm2.weight"], w0["blocks.1.norm2.weight"])
    # cos = -1: the formula gives k cos / (1 + (k-1) cos) = -2 / 0; clamped to t = 0.
    assert record["cos"]["blocks.1.mlp.fc2.bias"] == pytest.approx(-1.0)
    assert record["t"]["blocks.1.mlp.fc2.bias"] == 0
    torch.testing.assert_close(merged["blocks.1.mlp.fc2.bias"], w0["blocks.1.mlp.fc2.bias"], rtol=0, atol=1e-7)
    lines = soup.describe_soup(out)
    assert lines[0] == f"wrote {out} (Model Stock of 2 fine-tunes of pretrained.safetensors)"
    assert any(line.split()[:1] == ["blocks.1"] for line in lines)
    assert any(line.split()[:1] == ["head"] and "mean of the fine-tunes" in line for line in lines)


def test_stock_ratio_and_cosine_rules():
    assert merging.stock_ratio(1.0, 3) == 1.0 and merging.stock_ratio(0.0, 2) == 0.0
    assert merging.stock_ratio(0.5, 2) == pytest.approx(2 / 3)
    assert merging.stock_ratio(-0.3, 3) == 0.0 and merging.stock_ratio(-0.5, 3) == 0.0  # 1 + 2cos = 0 there
    x = torch.randn(50)
    assert merging.mean_pairwise_cosine([x, x.clone(), x.clone()]) == 1.0
    assert merging.mean_pairwise_cosine([torch.zeros(5), torch.zeros(5)]) is None
    assert merging.mean_pairwise_cosine([x, torch.zeros(50), x]) == pytest.approx(1 / 3)  # pairs: 0, 1, 0


def test_stock_refuses_one_finetune_and_the_wrong_pretrained_in_one_line(tmp_path, capsys):
    pre_path = pretrained_checkpoint(tmp_path)
    paths = finetunes(tmp_path, pre_path, 2)
    with pytest.raises(FinetuneError, match="only fine-tune; Model Stock needs at least two") as error:
        make_soup([pre_path, paths[0]], method="stock")
    assert "\n" not in str(error.value) and str(paths[0]) in str(error.value)
    code, out, err = run_entry(soup_main, ["--method", "stock", pre_path, paths[0], "-o", tmp_path / "x.safetensors"],
                               capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: stock: ")
    (tmp_path / "deeper").mkdir()
    other = pretrained_checkpoint(tmp_path / "deeper", depth=3)
    with pytest.raises(FinetuneError, match="stock: .*arch.kwargs.depth differs"):
        make_soup([other, *paths], method="stock", out=tmp_path / "y.safetensors")
    with pytest.raises(FinetuneError, match="--by-layer: only the learned method"):
        make_soup([pre_path, *paths], method="stock", by_layer=True)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_cli_stock_writes_OUT_and_prints_t_per_block(tmp_path, capsys):
    pre_path = pretrained_checkpoint(tmp_path)
    paths = finetunes(tmp_path, pre_path, 3)
    target = tmp_path / "out" / "stock.safetensors"
    target.parent.mkdir()
    code, out, err = run_entry(soup_main, ["--method", "stock", pre_path, *paths, "-o", target], capsys)
    assert code == 0, err
    assert out.startswith(f"wrote {target} (Model Stock of 3 fine-tunes of ")
    assert "blocks.0" in out and "t overall (parameter-weighted)" in out and "soup not scored" in out
    assert finetune.read_meta(target)["soup"]["pretrained_sha256"]


# ------------------------------------------------------------------------------- learned soup
def teacher_task():
    """A teacher model, synthetic images it labels (3 batches of 32, classes balanced by centring its
    logits) and a top-1 scorer against those labels."""
    teacher = finetune.load_model(SCRATCH.format(depth=2), num_classes=3, img_size=32, class_names=["a", "b", "c"])
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.3)
    images = torch.randn(96, 3, 32, 32)
    with torch.no_grad():
        teacher.head.bias.sub_(teacher.eval()(images).mean(0))
        labels = teacher(images).argmax(1)
    batches = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]
    judge = finetune.load_model(SCRATCH.format(depth=2), num_classes=3, img_size=32)

    def score(state):
        judge.load_state_dict(state)
        with torch.no_grad():
            return float((judge.eval()(images).argmax(1) == labels).double().mean())
    return teacher, batches, score


def noisy_copies(folder, teacher, sizes, flipped=(), **save_kwargs):
    """Checkpoints at teacher + noise of each size; those in `flipped` with the head negated (wrong)."""
    paths = []
    for i, size in enumerate(sizes):
        model = finetune.load_model(SCRATCH.format(depth=2), num_classes=3, img_size=32, class_names=["a", "b", "c"])
        state = {k: v + size * torch.randn_like(v) for k, v in teacher.state_dict().items()}
        if i in flipped:
            state["head.weight"], state["head.bias"] = -state["head.weight"], -state["head.bias"]
        model.load_state_dict(state)
        paths.append(finetune.save_checkpoint(Path(folder) / f"ing{i}.safetensors", model, epoch=i + 1, **save_kwargs))
    return paths


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: on 2 shared cores a second thread mostly spins (measured 60 s vs 7 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("by_layer", [False, True])
def test_learned_soup_moves_weight_to_the_good_ingredient_and_never_ends_below_uniform(tmp_path, by_layer):
    teacher, batches, score = teacher_task()
    paths = noisy_copies(tmp_path, teacher, [0.02, 0.02, 0.02], flipped=(1, 2))
    vessel = finetune.load_model(str(paths[0]))
    state, info = soup.learned_soup(paths, vessel, batches, score, by_layer=by_layer, epochs=6, lr=0.1)
    uniform, _ = soup.uniform_soup(paths)
    assert info["uniform_score"] == score(uniform) < 0.5  # the mean head is the teacher's, negated, a third
    assert info["score"] > info["uniform_score"] and score(state) == info["score"] and info["epoch"] > 0
    assert info["history"][0] == {"epoch": 0, "loss": None, "score": info["uniform_score"], "kept": True}
    assert len(info["history"]) == 7 and all(h["loss"] > 0 for h in info["history"][1:])
    assert sum(info["weights"]) == pytest.approx(1) and info["temperature"] > 0
    if by_layer:
        assert list(info["weights_by_layer"]) == ["cls_token", "pos_embed", "patch_embed", "blocks.0", "blocks.1",
                                                  "norm", "head"]
        assert all(sum(w) == pytest.approx(1) for w in info["weights_by_layer"].values())
        head = info["weights_by_layer"]["head"]
        assert head[0] > 0.5 > max(head[1:]), head  # gradient descent found the unflipped head
    else:
        assert "weights_by_layer" not in info
        assert info["weights"][0] > 0.5 > max(info["weights"][1:]), info["weights"]


def test_learned_soup_keeps_the_uniform_soup_when_nothing_beats_it(tmp_path):
    teacher, batches, _ = teacher_task()
    paths = noisy_copies(tmp_path, teacher, [0.1, 0.1, 0.1])
    state, info = soup.learned_soup(paths, finetune.load_model(str(paths[0])), batches, lambda s: 0.5, epochs=2)
    uniform, _ = soup.uniform_soup(paths)
    assert info["epoch"] == 0 and info["weights"] == [1 / 3] * 3 and info["temperature"] == 1.0
    assert all(torch.equal(state[k], uniform[k]) for k in uniform)


def demo_recipe_checkpoints(folder, count=2, std=0.5):
    """Tiny models of the demo recipe's digits (10 classes), the recipe stored in each checkpoint."""
    digits = [str(i) for i in range(10)]
    paths = []
    for i in range(count):
        model = finetune.load_model(SCRATCH.format(depth=2), num_classes=10, img_size=32, class_names=digits)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, std)
        paths.append(finetune.save_checkpoint(Path(folder) / f"e{i}.safetensors", model, epoch=i + 1,
                                              recipe=dict(DEMO_RECIPE, precision="fp32"),  # no bf16 timing
                                              metrics={"val_top1": 0.1 * (i + 1)}))
    return paths


def test_cli_learned_soup_on_the_recipes_val_is_reported_on_test_with_the_ensemble(tmp_path, capsys):
    paths = demo_recipe_checkpoints(tmp_path, 2)
    target = tmp_path / "learned.safetensors"
    code, out, err = run_entry(soup_main, ["--method", "learned", *paths, "-o", target, "--epochs", "1"], capsys)
    assert code == 0, err
    meta = finetune.read_meta(target)
    record = meta["soup"]
    assert record["method"] == "learned" and record["split"] == "val" and record["report_split"] == "test"
    assert meta["metrics"]["val_top1"] >= record["uniform_score"] and "test_top1" in meta["metrics"]
    params = sum(v.numel() for v in read_checkpoint(paths[0])[0].values())
    assert record["memory_estimate"]["ingredients"] == 2 * params * 4
    assert record["ensemble"]["forward_passes"] == 2
    assert record["ensemble"]["members"] == ["e0.safetensors", "e1.safetensors"]
    assert {"val_top1", "test_top1"} <= set(record["ensemble"])
    assert f"wrote {target} (learned soup of 2 checkpoints)" in out and "epoch 0: uniform soup (start)" in out
    assert "ensemble of the 2 ingredients (mean of logits, 2 forward passes an image): val top-1" in out

    rows = compare.collect_rows([target])
    assert [r["kind"] for r in rows] == ["soup", "ensemble"]
    assert rows[1]["best_val_top1"] == record["ensemble"]["val_top1"]
    assert rows[1]["test_top1"] == record["ensemble"]["test_top1"]


def test_learned_refuses_what_will_not_fit_and_bad_options_in_one_line(tmp_path, capsys, monkeypatch):
    paths = demo_recipe_checkpoints(tmp_path, 2)
    monkeypatch.setattr(merging, "available_bytes", lambda device: 1024 ** 2)
    with pytest.raises(FinetuneError, match=r"--method learned: needs about .* GiB \(2 ingredients x .*M params x 4 "
                                            r"bytes .* but cpu has 0.0 GiB free; use fewer ingredients") as error:
        make_soup(paths, method="learned", out=tmp_path / "l.safetensors")
    assert "\n" not in str(error.value)
    code, _, err = run_entry(soup_main, ["--method", "learned", *paths, "-o", tmp_path / "l.safetensors"], capsys)
    assert code == 2 and err.count("\n") == 1 and "needs about" in err
    for args, complaint in ((["--epochs", "0"], "--epochs: 0 is not a positive integer"),
                            (["--lr", "-1"], "--lr: -1.0 is not a positive number"),
                            (["--split", "test"], "--split test: learned selects on the split")):
        code, _, err = run_entry(soup_main, ["--method", "learned", *paths, "-o", tmp_path / "l.safetensors", *args],
                                 capsys)
        assert code == 2 and err.count("\n") == 1 and complaint in err, err
    with pytest.raises(FinetuneError, match="learned: 1 ingredient given"):
        soup.learned_soup(paths[:1], finetune.load_model(str(paths[0])), [], lambda s: 0.5)
    assert not (tmp_path / "l.safetensors").exists()


def test_learned_memory_estimate_counts_k_copies_and_activations():
    estimate = merging.learned_memory(k=3, params=1000, batch_size=2, depth=4, tokens=10, width=8, heads=2)
    assert estimate["ingredients"] == 3 * 1000 * 4 and estimate["working"] == 3 * 1000 * 4
    assert estimate["activations"] == int(4 * 4 * 2 * 10 * (17 * 8 + 2.5 * 2 * 10))
    assert estimate["total"] == sum(v for k, v in estimate.items() if k != "total")


# ------------------------------------------------------------------------------------ ensemble
def test_ensemble_is_the_mean_of_the_logits(tmp_path):
    from finetune.ensemble import ensemble_on_split
    from finetune.evaluation import recipe_for, split_loader
    paths = demo_recipe_checkpoints(tmp_path, 3)
    result = ensemble_on_split(paths, split="val")
    recipe = recipe_for(paths[0])
    models = [finetune.load_model(str(p)).eval() for p in paths]
    with torch.no_grad():
        batches = list(split_loader(recipe, models[0], "val"))
        labels = torch.cat([y for _, y in batches])
        logits = [torch.cat([m(x) for x, _ in batches]) for m in models]
    mean = torch.stack(logits).mean(0)
    correct = (mean.argmax(1) == labels).double().mean().item()
    assert result["top1"] == pytest.approx(correct, abs=1e-9) and result["n"] == len(labels)
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(mean, labels).item(), rel=1e-4)
    assert result["forward_passes"] == 3
    assert len({(lg.argmax(1) == labels).double().mean().item() for lg in logits}) > 1  # members differ


def test_compare_shows_the_ensemble_of_soup_ingredients_and_of_given_checkpoints(tmp_path, capsys, monkeypatch):
    paths = demo_recipe_checkpoints(tmp_path, 2)
    unscored = make_soup(paths, out=tmp_path / "soup.safetensors", evaluate=False)
    again = make_soup(paths, out=tmp_path / "soup-again.safetensors", evaluate=False)
    rows = compare.collect_rows([unscored, again, *paths])
    assert [r["kind"] for r in rows] == ["soup", "ensemble", "soup", "checkpoint", "checkpoint"]  # one per set
    ensemble = rows[1]
    assert ensemble["name"] == f"{tmp_path.name}/ensemble of 2" and ensemble["best_val_top1"] is None
    assert ensemble["members"] == [str(p) for p in paths]
    calls = []

    def fake(members, split):
        calls.append(([Path(m).name for m in members], split))
        return {"top1": 0.625, "loss": 1.0, "n": 8, "forward_passes": 2}

    done = compare.evaluate_missing(rows, "val", evaluator=lambda c, s: {"top1": 0.5}, ensemble_evaluator=fake)
    assert calls == [(["e0.safetensors", "e1.safetensors"], "val")]
    assert {"name": ensemble["name"], "members": ensemble["members"], "split": "val", "top1": 0.625} in done
    stored = json.loads((tmp_path / "results.json").read_text())["ensembles"]
    assert stored == {"e0.safetensors + e1.safetensors": {"val": {"top1": 0.625, "top5": None, "loss": 1.0, "n": 8,
                                                                  "forward_passes": 2}}}
    assert compare.collect_rows([unscored])[1]["best_val_top1"] == 0.625

    with pytest.raises(FinetuneError, match="--ensemble: 1 checkpoint among the inputs"):
        compare.collect_rows([paths[0]], ensemble=True)
    monkeypatch.setattr(compare, "ensemble_on_split", lambda members, **kwargs: {"top1": 0.75})
    monkeypatch.setattr(compare, "evaluate_on_split", lambda checkpoint, **kwargs: {"top1": 0.5})
    code, out, err = run_entry(compare_main, [*paths, "--ensemble", "--format", "csv", "--eval"], capsys)
    assert code == 0, err
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert [r["kind"] for r in parsed] == ["checkpoint", "checkpoint", "ensemble"]
    assert parsed[2]["test_top1"] == "0.75" and parsed[2]["ingredients"] == "e0;e1"
    code, out, err = run_entry(compare_main, [unscored], capsys)
    assert code == 0 and "| ensemble |" in out and "logit ensemble (mean of logits) of e0, e1: 2 forward passes" in out


# ------------------------------------------------------------------------ real photos (shared)
IMG = 112  # DeiT-Tiny's position embeddings resampled to 7x7: a quarter of the tokens, so seconds per pass


@pytest.fixture(scope="module")
def real_finetunes(tmp_path_factory):
    """Three neighbouring real fine-tunes of DeiT-Tiny on hymenoptera (last block, norm and head,
    two SGD steps each), as tests/test_soup.py builds them, at 112 px, and 64 val photos decoded once."""
    require_shared(DEIT_WEIGHTS, HYMENOPTERA)
    from finetune.data import build_datasets, build_loader
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("real")
    model = finetune.load_model(str(DEIT_WEIGHTS), num_classes=2, img_size=IMG, class_names=["ants", "bees"])
    splits = build_datasets("imagefolder", str(HYMENOPTERA), img_size=IMG, data_config=finetune.data_config_of(model),
                            augment="none")
    train_batches = iter(build_loader(splits.train, batch_size=16, train=True, seed=0))
    picked = torch.utils.data.Subset(splits.val, list(range(0, len(splits.val), 2))[:64])  # both classes
    val_batches = list(build_loader(picked, batch_size=32, train=False))
    tuned = [p for name, p in model.named_parameters() if name.startswith(("blocks.11.", "norm.", "head."))]
    for p in model.parameters():
        p.requires_grad_(p in set(tuned))
    optimizer = torch.optim.SGD(tuned, lr=0.01)
    paths = []
    for index in range(3):
        model.train()
        for _ in range(2):
            images, labels = next(train_batches)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        paths.append(finetune.save_checkpoint(folder / f"epoch-{index + 1:03d}.safetensors", model, epoch=index + 1))

    def val_accuracy(state):
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in val_batches)
        return correct / sum(len(y) for _, y in val_batches)
    return paths, model, val_batches, val_accuracy


@pytest.mark.slow
@pytest.mark.parametrize("by_layer", [False, True])
def test_learned_soup_of_real_finetunes_is_not_below_the_uniform_soup_on_selection(real_finetunes, by_layer):
    paths, model, val_batches, val_accuracy = real_finetunes
    uniform_path = make_soup(paths, out=paths[0].parent / f"uniform-{by_layer}.safetensors", score_fn=val_accuracy)
    uniform_score = finetune.read_meta(uniform_path)["metrics"]["val_top1"]
    state, info = soup.learned_soup(paths, model, val_batches, val_accuracy, by_layer=by_layer, epochs=3)
    assert info["uniform_score"] == uniform_score
    assert info["score"] >= uniform_score and val_accuracy(state) == info["score"]
    assert info["mixed_tensors"] == 16  # blocks.11 (12 tensors), norm (2), head (2): the rest never moved
    assert all(h["loss"] < 1.0 for h in info["history"][1:])


@pytest.mark.slow
def test_model_stock_of_real_finetunes_keeps_the_frozen_blocks_pretrained(real_finetunes):
    paths, _, _, val_accuracy = real_finetunes
    out = make_soup([DEIT_WEIGHTS, *paths], method="stock", out=paths[0].parent / "stock.safetensors",
                    score_fn=val_accuracy)
    merged, meta = read_checkpoint(out)
    pretrained = finetune.load_model(str(DEIT_WEIGHTS), num_classes=2, img_size=IMG).state_dict()
    blocks = meta["soup"]["t_by_block"]
    assert all(blocks[f"blocks.{i}"]["t"] is None for i in range(11))  # frozen: nothing to merge
    assert torch.equal(merged["blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])
    assert 0 < blocks["blocks.11"]["t"] <= 1 and blocks["head"]["t"] is None
    assert 0 <= meta["metrics"]["val_top1"] <= 1 and math.isfinite(meta["soup"]["t_mean"])
