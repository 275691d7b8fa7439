"""Model soups: uniform (streamed, weighted, bf16), greedy, ingredient checks, run dirs, CLI."""
from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import finetune
from finetune import soup
from finetune.checkpoints import model_meta, read_checkpoint, write_checkpoint
from finetune.errors import FinetuneError
from finetune.soup import greedy_soup, make_soup, resolve_ingredients, uniform_soup, validate_ingredients

from finetune.cli import soup_main
from conftest import DEIT_WEIGHTS, HYMENOPTERA, require_shared, run_entry

SCRATCH = "scratch:patch_size=8,embed_dim=64,depth={depth},num_heads=4"


def small_model(num_classes=3, depth=2, class_names=None):
    model = finetune.load_model(SCRATCH.format(depth=depth), num_classes=num_classes, img_size=32,
                                class_names=class_names or [f"c{i}" for i in range(num_classes)])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def save(path, model=None, dtype=None, extra_tensors=None, **kwargs):
    """A checkpoint of `model` (a fresh random one by default), optionally cast to `dtype`."""
    model = model or small_model()
    if dtype is None and extra_tensors is None:
        return finetune.save_checkpoint(path, model, **kwargs)
    state = {k: v.to(dtype) if dtype else v for k, v in model.state_dict().items()}
    state.update(extra_tensors or {})
    meta = dict(model_meta(model), epoch=kwargs.get("epoch"), metrics=kwargs.get("metrics") or {}, recipe=None)
    return write_checkpoint(path, state, meta)


def ingredients(folder, count=3, **kwargs):
    return [save(Path(folder) / f"epoch-{i:03d}.safetensors", epoch=i, metrics={"val_top1": 0.5 + i / 10}, **kwargs)
            for i in range(1, count + 1)]


def states(paths):
    return [read_checkpoint(p)[0] for p in paths]


def make_run(folder, order=(3, 1, 2)):
    """A fake run directory with three kept checkpoints, best.json listing them best first."""
    folder.mkdir(parents=True)
    paths = ingredients(folder)
    entries = [{"epoch": e, "path": f"epoch-{e:03d}.safetensors", "val_top1": 0.5 + e / 10} for e in order]
    (folder / "best.json").write_text(json.dumps({"metric": "val_top1", "keep": 3, "checkpoints": entries}))
    return folder, paths


def run_cli(args, capsys):
    return run_entry(soup_main, args, capsys)


# ------------------------------------------------------------------------------------------ uniform
def test_uniform_soup_is_the_mean(tmp_path):
    paths = ingredients(tmp_path)
    out = make_soup(paths, out=tmp_path / "soup.safetensors")
    soup_state, meta = read_checkpoint(out)
    parts = states(paths)
    assert list(soup_state) == list(parts[0])
    for key, value in soup_state.items():
        torch.testing.assert_close(value, torch.stack([p[key] for p in parts]).mean(0), rtol=0, atol=1e-7)
    assert meta["source"] == "soup" and meta["epoch"] is None and meta["metrics"] == {}
    assert meta["soup"]["method"] == "uniform" and meta["soup"]["weights"] == pytest.approx([1 / 3] * 3)


def test_uniform_soup_with_weights_is_the_weighted_mean(tmp_path):
    paths = ingredients(tmp_path)
    tensors, info = uniform_soup(paths, weights=[1, 2, 1])
    a, b, c = states(paths)
    for key, value in tensors.items():
        torch.testing.assert_close(value, (a[key] + 2 * b[key] + c[key]) / 4, rtol=0, atol=1e-7)
    assert info["weights"] == [0.25, 0.5, 0.25]


@pytest.mark.parametrize("weights, complaint", [([1, -1, 1], "negative"), ([0, 0, 0], "all zero"),
                                                ([1, 2], "2 given for 3 ingredients")])
def test_bad_weights_are_one_line_errors(tmp_path, weights, complaint):
    paths = ingredients(tmp_path)
    with pytest.raises(FinetuneError, match=complaint) as error:
        make_soup(paths, weights=weights)
    assert "\n" not in str(error.value) and str(error.value).startswith("weights:")
    assert not (tmp_path / "soup.safetensors").exists()


def test_bf16_ingredients_are_accumulated_in_fp32_and_written_as_bf16(tmp_path):
    paths = ingredients(tmp_path, dtype=torch.bfloat16)
    out = make_soup(paths, out=tmp_path / "soup.safetensors", weights=[1, 1, 2])
    soup_state, _ = read_checkpoint(out)
    a, b, c = states(paths)
    for key, value in soup_state.items():
        assert value.dtype == torch.bfloat16
        exact = (a[key].double() + b[key].double() + 2 * c[key].double()) / 4
        # fp32 accumulation leaves only the final rounding to bf16: at most one bf16 step (2^-7 relative).
        torch.testing.assert_close(value.double(), exact, rtol=2 ** -7, atol=1e-30)
    accumulated_in_bf16 = (a["blocks.0.mlp.fc1.weight"] * 0.25 + b["blocks.0.mlp.fc1.weight"] * 0.25
                           + c["blocks.0.mlp.fc1.weight"] * 0.5)
    exact = (a["blocks.0.mlp.fc1.weight"].double() + b["blocks.0.mlp.fc1.weight"].double()
             + 2 * c["blocks.0.mlp.fc1.weight"].double()) / 4
    ours = soup_state["blocks.0.mlp.fc1.weight"].double()
    assert (ours - exact).abs().sum() < (accumulated_in_bf16.double() - exact).abs().sum()


def test_integer_buffers_are_copied_when_equal_and_refused_when_not(tmp_path):
    same = [save(tmp_path / f"s{i}.safetensors", extra_tensors={"steps": torch.tensor([7, 8])}) for i in range(2)]
    tensors, _ = uniform_soup(same)
    assert torch.equal(tensors["steps"], torch.tensor([7, 8])) and tensors["steps"].dtype == torch.int64
    differ = save(tmp_path / "d.safetensors", extra_tensors={"steps": torch.tensor([7, 9])})
    with pytest.raises(FinetuneError, match="non-float tensor 'steps'") as error:
        make_soup([same[0], differ], out=tmp_path / "bad.safetensors")
    assert str(differ) in str(error.value)
    assert not (tmp_path / "bad.safetensors").exists()


# ------------------------------------------------------------------------------------------- greedy
def distance_scorer(target):
    """Accuracy stand-in: 1 at `target`, falling with the distance from it."""
    def score(state):
        distance = sum(((state[k].double() - target[k].double()) ** 2).sum() for k in target) ** 0.5
        return float(1 / (1 + distance))
    return score


def offset_ingredients(folder, target_model, offsets):
    """Checkpoints at target + independent noise of the given sizes."""
    paths = []
    for i, size in enumerate(offsets):
        model = small_model()
        model.load_state_dict({k: v + size * torch.randn_like(v) for k, v in target_model.state_dict().items()})
        paths.append(save(Path(folder) / f"ing{i}.safetensors", model))
    return paths


def test_greedy_keeps_ingredients_that_help_and_rejects_the_rest(tmp_path):
    target = small_model()
    # Two near fine-tunes with independent noise (their mean is nearer still) and one far one.
    paths = offset_ingredients(tmp_path, target, [0.01, 0.5, 0.012])
    score = distance_scorer(target.state_dict())
    tensors, info = greedy_soup(paths, score)
    assert info["scores"][0] > info["scores"][2] > info["scores"][1]
    assert info["ranking"] == [str(paths[0]), str(paths[2]), str(paths[1])]
    assert info["kept"] == [str(paths[0]), str(paths[2])] and info["rejected"] == [str(paths[1])]
    assert [s["kept"] for s in info["steps"]] == [True, False]
    assert info["score"] > max(info["scores"])
    assert score(tensors) == info["score"]  # the soup returned is the soup that was scored
    a, c = states([paths[0], paths[2]])
    for key, value in tensors.items():
        torch.testing.assert_close(value, (a[key] + c[key]) / 2, rtol=0, atol=1e-7)


def test_greedy_is_never_below_its_best_ingredient(tmp_path):
    target = small_model()
    for trial in range(4):
        folder = tmp_path / f"trial{trial}"
        paths = offset_ingredients(folder, target, [0.02 * (1 + trial), 0.3, 0.05, 1.0])
        score = distance_scorer(target.state_dict())
        tensors, info = greedy_soup(paths, score)
        assert score(tensors) >= max(info["scores"]) == info["best_ingredient_score"]


def test_greedy_needs_a_strict_improvement(tmp_path):
    paths = ingredients(tmp_path)
    tensors, info = greedy_soup(paths, lambda state: 0.5)  # every soup scores the same
    assert info["kept"] == [str(paths[0])] and len(info["rejected"]) == 2
    assert all(torch.equal(v, states(paths[:1])[0][k]) for k, v in tensors.items())


def test_make_soup_greedy_records_scores_and_kept(tmp_path):
    target = small_model()
    paths = offset_ingredients(tmp_path, target, [0.01, 0.5, 0.012])
    out = make_soup(paths, method="greedy", score_fn=distance_scorer(target.state_dict()))
    assert out == tmp_path / "soup-greedy.safetensors"
    meta = finetune.read_meta(out)
    record = meta["soup"]
    assert record["method"] == "greedy" and record["split"] == "val"
    assert record["kept"] == ["ing0.safetensors", "ing2.safetensors"]
    assert [i["path"] for i in record["ingredients"]] == ["ing0.safetensors", "ing1.safetensors", "ing2.safetensors"]
    assert all("score" in i for i in record["ingredients"])
    assert meta["metrics"]["val_top1"] >= max(i["score"] for i in record["ingredients"])
    assert record["weights"] == [0.5, 0.0, 0.5]


def test_greedy_without_scorer_or_recipe_says_pass_recipe(tmp_path):
    paths = ingredients(tmp_path)
    with pytest.raises(FinetuneError, match="--recipe"):
        make_soup(paths, method="greedy")
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]


def test_default_scorer_scores_on_the_stored_recipes_split(tmp_path):
    from finetune.data import build_datasets
    from finetune.recipes import DEMO_RECIPE
    from finetune.recipes import recipe_from_dict
    digits = [str(i) for i in range(10)]
    recipe = recipe_from_dict(DEMO_RECIPE)
    models = [small_model(num_classes=10, class_names=digits) for _ in range(2)]
    with torch.no_grad():  # weights large enough that predictions differ between images
        for model in models:
            for p in model.parameters():
                p.normal_(0, 0.5)
    paths = [save(tmp_path / f"e{i}.safetensors", model, recipe=dict(DEMO_RECIPE)) for i, model in enumerate(models)]
    out = make_soup(paths, split="test")
    meta = finetune.read_meta(out)
    assert meta["soup"]["split"] == "test" and set(meta["metrics"]) == {"test_top1"}
    # The same soup scored by hand on the demo recipe's test split (digits, its seed and fractions).
    model = finetune.load_model(str(out))
    config = finetune.data_config_of(model)
    test = build_datasets("digits", None, img_size=32, data_config=config, augment="none",
                          val_split=recipe.data.val_split, test_split=recipe.data.test_split, seed=recipe.seed).test
    with torch.no_grad():
        images, labels = zip(*(test[i] for i in range(len(test))))
        predictions = model.eval()(torch.stack(images)).argmax(1)
    correct = int((predictions == torch.tensor(labels)).sum())
    assert len(set(predictions.tolist())) > 1
    assert meta["metrics"]["test_top1"] == pytest.approx(correct / len(test), abs=1e-9)
    assert make_soup(paths, out=tmp_path / "unscored.safetensors", evaluate=False)
    assert finetune.read_meta(tmp_path / "unscored.safetensors")["metrics"] == {}


# --------------------------------------------------------------------------------- bad ingredients
def _mismatched(tmp_path, kind):
    if kind == "num_classes":
        return save(tmp_path / "other.safetensors", small_model(num_classes=4)), "num_classes"
    if kind == "depth":
        return save(tmp_path / "other.safetensors", small_model(depth=3)), "arch.kwargs.depth differs (2 vs 3)"
    if kind == "class_names":
        return save(tmp_path / "other.safetensors", small_model(class_names=["c0", "wasp", "c2"])), \
            "class_names[1] differs ('c1' vs 'wasp')"
    good = save(tmp_path / "whole.safetensors")
    truncated = tmp_path / "other.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    return truncated, "truncated or corrupt"


@pytest.mark.parametrize("kind", ["num_classes", "depth", "class_names", "truncated"])
def test_mismatched_ingredients_are_one_line_errors_and_leave_no_file(tmp_path, capsys, kind):
    first = save(tmp_path / "first.safetensors")
    other, expected = _mismatched(tmp_path, kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FinetuneError) as error:
        make_soup([first, other])
    message = str(error.value)
    assert "\n" not in message and expected in message and str(other) in message
    if kind != "truncated":
        assert str(first) in message
    code, out, err = run_cli([first, other, "--no-eval"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_tensor_names_the_key_and_both_files(tmp_path):
    first = save(tmp_path / "first.safetensors")
    model = small_model()
    state = {k: v for k, v in model.state_dict().items() if k != "norm.bias"}
    other = write_checkpoint(tmp_path / "other.safetensors", state, dict(model_meta(model)))
    with pytest.raises(FinetuneError, match=r"tensor 'norm.bias' is in .*first.* but not in .*other"):
        validate_ingredients([first, other])


def test_output_may_not_overwrite_an_ingredient(tmp_path):
    paths = ingredients(tmp_path)
    with pytest.raises(FinetuneError, match="is one of the ingredients"):
        make_soup(paths, out=paths[1])


# --------------------------------------------------------------------------------------- run dirs
def test_run_dirs_resolve_to_best_checkpoints_in_order(tmp_path):
    run, _ = make_run(tmp_path / "run-a")
    assert [p.name for p in resolve_ingredients([run])] == ["epoch-003.safetensors", "epoch-001.safetensors",
                                                            "epoch-002.safetensors"]
    with pytest.raises(FinetuneError, match="no such checkpoint file or run directory"):
        resolve_ingredients([tmp_path / "nope"])
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(FinetuneError, match="no best.json"):
        resolve_ingredients([tmp_path / "empty-run"])
    (run / "best.json").write_text('{"checkpoints": [{"path": "epoch-009.safetensors"}]}')
    with pytest.raises(FinetuneError, match="epoch-009.safetensors.*missing"):
        resolve_ingredients([run])


def test_soup_of_a_run_dir_lands_in_it_and_loads(tmp_path, capsys):
    run, paths = make_run(tmp_path / "run-a")
    code, out, err = run_cli([run, "--weights", "1,1,2"], capsys)
    assert code == 0, err
    path = run / "soup.safetensors"
    assert f"wrote {path}" in out and "uniform" in out and "epoch-003.safetensors" in out
    model = finetune.load_model(str(path)).eval()
    assert model.finetune_info["class_names"] == ["c0", "c1", "c2"]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    meta = finetune.read_meta(path)
    record = meta["soup"]
    assert meta["source"] == "soup" and record["method"] == "uniform" and record["weights"] == [0.25, 0.25, 0.5]
    by_name = {i["path"]: i for i in record["ingredients"]}
    assert list(by_name) == ["epoch-003.safetensors", "epoch-001.safetensors", "epoch-002.safetensors"]
    for p in paths:
        assert by_name[p.name]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert by_name[p.name]["val_top1"] == pytest.approx(0.5 + int(p.stem[-3:]) / 10)


def test_cli_bad_weights_text_is_one_line(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run-a")
    code, _, err = run_cli([run, "--weights", "1,x,2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--weights: '1,x,2'" in err
    assert not (run / "soup.safetensors").exists()


def test_cli_greedy_prints_kept_and_score(tmp_path, capsys, monkeypatch):
    target = small_model()
    paths = offset_ingredients(tmp_path, target, [0.01, 0.5, 0.012])
    scorer = distance_scorer(target.state_dict())
    monkeypatch.setattr(soup, "state_scorer", lambda *args: scorer)
    monkeypatch.setattr(soup, "test_top1", lambda *args: None)  # fake ingredients: no data to report on
    code, out, err = run_cli([*paths, "--method", "greedy"], capsys)
    assert code == 0, err
    assert "kept: ing0.safetensors, ing2.safetensors" in out and "soup val top-1:" in out


# --------------------------------------------------------------------------- real fine-tunes (shared)
def test_greedy_soup_of_real_finetunes_is_never_below_its_best_ingredient(tmp_path):
    require_shared(DEIT_WEIGHTS, HYMENOPTERA)
    from finetune.compare import collect_rows, format_table
    from finetune.data import build_datasets, build_loader
    model = finetune.load_model(str(DEIT_WEIGHTS), num_classes=2)
    splits = build_datasets("imagefolder", str(HYMENOPTERA), img_size=224, data_config=finetune.data_config_of(model),
                            augment="none")
    train_batches = iter(build_loader(splits.train, batch_size=16, train=True, seed=0))
    val_batches = list(build_loader(splits.val, batch_size=64, train=False))  # decoded once, scored 5 times
    # Fine-tune the last block, final norm and head only: the backbone's backward pass would triple
    # the test's time on 2 cores, and the ingredients still differ in transformer weights.
    tuned = [p for name, p in model.named_parameters() if name.startswith((f"blocks.{len(model.blocks) - 1}.",
                                                                           "norm.", "head."))]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in tuned:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(tuned, lr=0.01)
    run = tmp_path / "hymenoptera-deit-tiny-20240101-000000"
    paths = []
    for epoch in (1, 2, 3):  # three "epochs" of two SGD steps each: neighbouring fine-tunes
        model.train()
        for _ in range(2):
            images, labels = next(train_batches)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        paths.append(finetune.save_checkpoint(run / f"epoch-{epoch:03d}.safetensors", model, epoch=epoch))

    def val_accuracy(state):
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in val_batches)
        return correct / sum(len(y) for _, y in val_batches)

    out = make_soup(paths, out=run / "soup-greedy.safetensors", method="greedy", score_fn=val_accuracy)
    record = finetune.read_meta(out)["soup"]
    scores = {i["path"]: i["score"] for i in record["ingredients"]}
    soup_score = finetune.read_meta(out)["metrics"]["val_top1"]
    assert soup_score >= max(scores.values())

    ranked = sorted(scores, key=lambda p: -scores[p])
    (run / "best.json").write_text(json.dumps({"metric": "val_top1", "keep": 3, "checkpoints": [
        {"epoch": int(p[6:9]), "path": p, "val_top1": scores[p]} for p in ranked]}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": int(p[6:9]), "val_top1": scores[p]}) + "\n"
                                               for p in sorted(scores)))
    rows = collect_rows([run, *paths])
    assert [r["kind"] for r in rows] == ["run", "soup", "ensemble", "checkpoint", "checkpoint", "checkpoint"]
    assert rows[0]["best_val_top1"] == max(scores.values()) and rows[0]["epochs"] == 3
    assert rows[1]["best_val_top1"] == soup_score
    assert rows[1]["ingredients"] == ["epoch-001", "epoch-002", "epoch-003"]
    table = format_table(rows)
    assert "soup-greedy.safetensors" in table and "epoch-002.safetensors" in table


# --------------------------------------------------------------------------- folders of runs (sweeps)
def finished_run(folder, vals, state="finished"):
    """A run directory (recipe.yaml, status.json, best.json) keeping checkpoints of the given val top-1s."""
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text("model: scratch:patch_size=8\n")
    (folder / "status.json").write_text(json.dumps({"state": state}))
    entries = []
    for epoch, val in enumerate(vals, start=1):
        save(folder / f"epoch-{epoch:03d}.safetensors", epoch=epoch, metrics={"val_top1": val})
        entries.append({"epoch": epoch, "path": f"epoch-{epoch:03d}.safetensors", "val_top1": val})
    entries.sort(key=lambda e: -e["val_top1"])
    (folder / "best.json").write_text(json.dumps({"metric": "val_top1", "keep": len(vals), "checkpoints": entries}))
    return folder


def test_a_folder_of_runs_expands_to_every_finished_runs_best_checkpoints_ranked_by_val(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    finished_run(sweep_dir / "trial-000-lr0.001", [0.7, 0.9])
    finished_run(sweep_dir / "trial-001-lr0.003", [0.95, 0.8])
    finished_run(sweep_dir / "trial-002-lr0.01", [0.85], state="stopped_early")
    finished_run(sweep_dir / "trial-003-lr0.1", [0.99], state="failed")  # diverged later: left out
    (sweep_dir / "trial-004-lr1").mkdir()  # never started
    (sweep_dir / "sweep.json").write_text("{}")
    skipped = []
    paths = resolve_ingredients([sweep_dir], skipped)
    assert [str(p.relative_to(sweep_dir)) for p in paths] == [
        "trial-001-lr0.003/epoch-001.safetensors", "trial-000-lr0.001/epoch-002.safetensors",
        "trial-002-lr0.01/epoch-001.safetensors", "trial-001-lr0.003/epoch-002.safetensors",
        "trial-000-lr0.001/epoch-001.safetensors"]
    assert skipped == [{"run": str(sweep_dir / "trial-003-lr0.1"), "reason": "failed, not finished"}]
    code, out, err = run_cli([sweep_dir, "--no-eval"], capsys)
    assert code == 0, err
    assert f"wrote {sweep_dir / 'soup.safetensors'} (uniform soup of 5 checkpoints)" in out
    assert "skipped: trial-003-lr0.1 (failed, not finished)" in out
    record = finetune.read_meta(sweep_dir / "soup.safetensors")["soup"]
    assert record["ingredients"][0]["path"] == "trial-001-lr0.003/epoch-001.safetensors"
    assert record["skipped"] == [{"run": "trial-003-lr0.1", "reason": "failed, not finished"}]


def test_a_folder_whose_runs_are_unfinished_or_running_is_refused(tmp_path):
    sweep_dir = tmp_path / "sweep"
    finished_run(sweep_dir / "trial-000", [0.7], state="interrupted")
    with pytest.raises(FinetuneError, match="none of its 1 run directories has finished"):
        resolve_ingredients([sweep_dir])
    from finetune.rundir import RunLock
    running = finished_run(sweep_dir / "trial-001", [0.8], state="running")
    lock = RunLock(running).acquire()
    try:
        with pytest.raises(FinetuneError, match="trial-001: still training"):
            resolve_ingredients([sweep_dir])
    finally:
        lock.release()


# ------------------------------------------------------------------------------------- split rules
@pytest.mark.parametrize("method", ["greedy", "wise"])
def test_selecting_on_test_is_refused_without_the_flag(tmp_path, method):
    paths = ingredients(tmp_path)
    inputs = [SCRATCH.format(depth=2), paths[0]] if method == "wise" else paths
    with pytest.raises(FinetuneError, match="--split test: .*--allow-test-selection") as error:
        make_soup(inputs, method=method, split="test", score_fn=lambda state: 0.5)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]
    out = make_soup(inputs, method=method, split="test", score_fn=lambda state: 0.5, allow_test_selection=True)
    meta = finetune.read_meta(out)
    assert meta["soup"]["split"] == "test" and meta["metrics"] == {"test_top1": 0.5}


def test_selection_on_val_is_reported_on_test_beside_it(tmp_path):
    target = small_model()
    paths = offset_ingredients(tmp_path, target, [0.01, 0.5, 0.012])
    out = make_soup(paths, method="greedy", score_fn=distance_scorer(target.state_dict()), report_fn=lambda s: 0.625)
    meta = finetune.read_meta(out)
    assert meta["soup"]["split"] == "val" and meta["soup"]["report_split"] == "test"
    assert meta["metrics"]["test_top1"] == 0.625
    assert meta["metrics"]["val_top1"] >= max(i["score"] for i in meta["soup"]["ingredients"])
    assert meta["soup"]["rejected"] == ["ing1.safetensors"]
    from finetune.compare import checkpoint_row
    row = checkpoint_row(out)
    assert row["best_val_top1"] == meta["metrics"]["val_top1"] and row["test_top1"] == 0.625


# -------------------------------------------------------------------------------------------- wise
def wise_pair(tmp_path):
    """A "pretrained" checkpoint (10 classes, 16 px) and a fine-tune of it (3 classes, 24 px)."""
    pretrained = finetune.load_model(SCRATCH.format(depth=2), num_classes=10, img_size=16)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.normal_(0, 0.05)
    pre_path = finetune.save_checkpoint(tmp_path / "pretrained.safetensors", pretrained)
    tuned = finetune.load_model(str(pre_path), num_classes=3, img_size=24, class_names=["a", "b", "c"])
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ft_path = finetune.save_checkpoint(tmp_path / "run" / "epoch-004.safetensors", tuned, epoch=4,
                                       metrics={"val_top1": 0.8})
    (tmp_path / "run" / "best.json").write_text(json.dumps({"checkpoints": [{"epoch": 4, "path": ft_path.name}]}))
    return pre_path, ft_path


def test_wise_alpha_1_is_the_finetune_and_alpha_0_the_pretrained_backbone_with_its_head(tmp_path):
    pre_path, ft_path = wise_pair(tmp_path)
    tuned = read_checkpoint(ft_path)[0]
    at_start = finetune.load_model(str(pre_path), num_classes=3, img_size=24).state_dict()  # pos_embed resampled
    assert at_start["pos_embed"].shape == tuned["pos_embed"].shape != read_checkpoint(pre_path)[0]["pos_embed"].shape
    one = make_soup([pre_path, ft_path], method="wise", alphas=[1], score_fn=lambda s: 0.5,
                    out=tmp_path / "one.safetensors")
    zero = make_soup([pre_path, ft_path], method="wise", alphas=[0], score_fn=lambda s: 0.5,
                     out=tmp_path / "zero.safetensors")
    one_state, zero_state = read_checkpoint(one)[0], read_checkpoint(zero)[0]
    assert one_state.keys() == tuned.keys() == zero_state.keys()
    for key, value in tuned.items():
        assert torch.equal(one_state[key], value), key
        expected = value if key.startswith("head.") else at_start[key]
        assert torch.equal(zero_state[key], expected), key
    half = soup.interpolate(at_start, tuned, 0.5)
    torch.testing.assert_close(half["blocks.0.attn.qkv.weight"],
                               (at_start["blocks.0.attn.qkv.weight"] + tuned["blocks.0.attn.qkv.weight"]) / 2)
    assert torch.equal(half["head.weight"], tuned["head.weight"])


def test_wise_writes_the_best_alpha_and_records_every_score(tmp_path):
    pre_path, ft_path = wise_pair(tmp_path)
    tuned = read_checkpoint(ft_path)[0]
    at_start = finetune.load_model(str(pre_path), num_classes=3, img_size=24).state_dict()
    target = soup.interpolate(at_start, tuned, 0.6)  # the best weights lie between the two
    out = make_soup([pre_path, ft_path.parent], method="wise", alphas=[0, 0.25, 0.5, 0.75, 1],
                    score_fn=distance_scorer(target), report_fn=lambda state: 0.75)
    assert out == ft_path.parent / "soup-wise.safetensors"
    meta = finetune.read_meta(out)
    record = meta["soup"]
    assert record["method"] == "wise" and record["alphas"] == [0, 0.25, 0.5, 0.75, 1] and record["alpha"] == 0.5
    assert record["scores"][2] == max(record["scores"]) and meta["metrics"]["val_top1"] == record["scores"][2]
    assert meta["metrics"]["test_top1"] == 0.75 and record["weights"] == [0.5, 0.5]
    assert [i["role"] for i in record["ingredients"]] == ["pretrained", "finetuned"]
    assert record["ingredients"][1]["path"] == "epoch-004.safetensors"
    assert meta["class_names"] == ["a", "b", "c"] and meta["img_size"] == 24
    model = finetune.load_model(str(out))
    assert model.num_classes == 3
    lines = soup.describe_soup(out)
    assert lines[0].startswith(f"wrote {out} (WiSE-FT of ") and any("<- written" in line and "0.500" in line
                                                                      for line in lines)
    assert any(line.startswith("soup test top-1: 0.7500 (reported)") for line in lines)


@pytest.mark.parametrize("text, complaint", [("0,1.5", "not a number in \\[0, 1\\]"), ("0,x", "'x', not a number"),
                                             ("0.5,0.5", "repeats")])
def test_bad_alphas_are_one_line_errors(text, complaint):
    with pytest.raises(FinetuneError, match=complaint) as error:
        soup.parse_alphas(text)
    assert "\n" not in str(error.value) and str(error.value).startswith("--alpha")


def test_wise_refuses_weights_of_another_model_and_wrong_inputs(tmp_path):
    pre_path, ft_path = wise_pair(tmp_path)
    with pytest.raises(FinetuneError, match="arch.kwargs.depth differs"):
        make_soup([SCRATCH.format(depth=3), ft_path], method="wise", alphas=[0.5], score_fn=lambda s: 0.5)
    with pytest.raises(FinetuneError, match="give two ingredients"):
        make_soup([ft_path], method="wise", score_fn=lambda s: 0.5)
    with pytest.raises(FinetuneError, match="only the wise method takes alphas"):
        make_soup([ft_path], method="uniform", alphas=[0.5])
    assert not (ft_path.parent / "soup-wise.safetensors").exists()
