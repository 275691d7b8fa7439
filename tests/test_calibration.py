"""Calibration (temperature scaling, ECE / NLL / Brier) and test-time augmentation (issue 17)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import finetune
from finetune import calibration, engine, evaluation
from finetune import data as data_lib
from finetune.calibration import (brier_score, calibration_scores, evaluate_calibrated, expected_calibration_error,
                                  fit_temperature, nll, tta_probabilities, tta_views)
from finetune.checkpoints import atomic_write, read_checkpoint, read_meta, write_checkpoint
from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.recipes import recipe_from_dict, recipe_to_dict
from finetune.soup import make_soup

from conftest import DEIT_WEIGHTS, HYMENOPTERA, require_shared, run_entry

SCRATCH = "scratch:patch_size=8,embed_dim=32,depth=1,num_heads=2"
CLASSES = ["ant", "bee", "wasp"]
FEW = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------ independent scores
def numpy_ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al.'s ECE, written out: bins (m-1)/M < confidence <= m/M, weighted by their share of images."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    total = 0.0
    for m in range(bins):
        low, high = m / bins, (m + 1) / bins
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def assert_scores_match_independent_ones(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    from sklearn.metrics import brier_score_loss, log_loss
    ours = calibration_scores(logits, labels, temperature)
    z, y = logits.double().numpy() / temperature, labels.numpy()
    p = softmax(z)
    assert ours["ece"] == pytest.approx(numpy_ece(p, y), abs=1e-12)
    assert ours["brier"] == pytest.approx(np.mean(np.sum((p - np.eye(p.shape[1])[y]) ** 2, 1)), abs=1e-12)
    classes = list(range(p.shape[1]))
    assert ours["brier"] == pytest.approx(brier_score_loss(y, p, labels=classes, scale_by_half=False), abs=1e-9)
    assert ours["nll"] == pytest.approx(log_loss(y, p, labels=classes), rel=1e-9, abs=1e-12)
    try:
        from torchmetrics.classification import MulticlassCalibrationError
    except ImportError:  # not installed here: the numpy ECE above is the check
        return
    metric = MulticlassCalibrationError(num_classes=p.shape[1], n_bins=15, norm="l1")
    assert ours["ece"] == pytest.approx(metric(torch.from_numpy(p), labels).item(), abs=1e-6)


# ----------------------------------------------------------------------------------- a tiny model
def write_images(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for index, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (40, 40, 3)) + np.array([150, 60, 20]) * (np.arange(3) == index)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")


def tiny_recipe(root: Path) -> dict:
    return recipe_to_dict(recipe_from_dict({
        "model": SCRATCH, "img_size": 32, "batch_size": 4, "precision": "fp32",
        "data": {"dataset": "imagefolder", "root": str(root), "workers": 0, "augment": "none"}}))


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = finetune.load_model(SCRATCH, num_classes=3, img_size=32, class_names=CLASSES)
    with torch.no_grad():  # large enough weights that the logits spread and the images disagree
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder with a 3-class image folder (train 2, val 7 per class) and a random checkpoint of it."""
    folder = tmp_path_factory.mktemp("calibration")
    write_images(folder / "data" / "train", 2, seed=1)
    write_images(folder / "data" / "val", 7, seed=2)
    recipe = tiny_recipe(folder / "data")
    paths = [finetune.save_checkpoint(folder / f"tiny{i}.safetensors", tiny_model(i), recipe=recipe) for i in (0, 1)]
    return folder, paths


def with_meta(source: Path, out: Path, **changes) -> Path:
    tensors, meta = read_checkpoint(source)
    return write_checkpoint(out, tensors, {**meta, **changes})


def cli(args, capsys):
    return run_entry(main, args, capsys)


# ------------------------------------------------------------------------------------ 1. the fit
@FEW
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), classes=st.integers(2, 6),
       scale=st.floats(0.05, 30.0))
def test_the_fitted_temperature_minimises_the_nll_and_never_raises_it(seed, n, classes, scale):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * scale
    labels = torch.randint(0, classes, (n,), generator=generator)
    temperature = fit_temperature(logits, labels)
    assert calibration.T_BOUNDS[0] <= temperature <= calibration.T_BOUNDS[1]
    fitted = nll(logits, labels, temperature)
    assert fitted <= nll(logits, labels)
    grid = np.exp(np.linspace(*np.log(calibration.T_BOUNDS), 400))  # the global minimum, by brute force
    scaled = logits.double().numpy()[None] / grid[:, None, None]
    top = scaled.max(2, keepdims=True)
    nll_grid = (np.log(np.exp(scaled - top).sum(2)) + top[..., 0] - scaled[:, np.arange(n), labels.numpy()]).mean(1)
    assert fitted <= nll_grid.min() + 1e-9 * max(1.0, fitted)


def test_a_split_without_mistakes_stops_at_the_bound_and_says_so():
    logits = torch.tensor([[4.0, 0.0], [0.0, 3.0], [5.0, 1.0]])
    record = calibration.fit(logits, torch.tensor([0, 1, 0]), "val")
    assert record["temperature"] == pytest.approx(calibration.T_BOUNDS[0]) and record["at_bound"]
    assert record["nll"] < record["nll_uncalibrated"]
    assert any("search bound" in line for line in calibration.describe_calibration({**record, "checkpoint": "x"}))
    with pytest.raises(FinetuneError, match="no images"):
        fit_temperature(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_ece_brier_and_nll_agree_with_independent_computations():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 4, generator=generator) * 3
    labels = torch.where(torch.rand(500, generator=generator) < 0.7, logits.argmax(1),
                         torch.randint(0, 4, (500,), generator=generator))
    for temperature in (1.0, 0.5, 2.5):
        assert_scores_match_independent_ones(logits, labels, temperature)
    bins = calibration.reliability_bins(logits.softmax(-1), labels)
    assert sum(bins["counts"]) == 500 and bins["ece"] == expected_calibration_error(logits.softmax(-1), labels)
    # A model that is right exactly as often as it is sure: ECE 0; Brier of a certain right answer: 0.
    sure = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(sure, torch.tensor([0, 1])) == 0 and brier_score(sure, torch.tensor([0, 1])) == 0
    assert brier_score(sure, torch.tensor([1, 0])) == 2.0


# ------------------------------------------------------------------------------ 1. T = 1 is today
def test_temperature_one_reproduces_todays_scores_and_probabilities_bitwise(tiny, tmp_path):
    folder, (plain, _) = tiny
    at_one = with_meta(plain, tmp_path / "t1.safetensors", temperature=1.0)
    model = evaluation.load_for_scoring(plain)
    recipe = evaluation.recipe_for(plain)
    today = evaluation.evaluate(model, evaluation.split_loader(recipe, model, "val"), precision="fp32")
    report = evaluate_calibrated(plain, store=False)
    assert {k: report[k] for k in today} == today  # the replay of cached logits is evaluate's arithmetic
    again = evaluate_calibrated(at_one, store=False)
    assert {k: v for k, v in again.items() if k != "checkpoint"} == {k: v for k, v in report.items() if k != "checkpoint"}
    assert report["temperature"] == 1.0 and report["nll"] == report["nll_uncalibrated"]
    assert report["nll"] == pytest.approx(report["loss"], rel=1e-6)

    images = sorted((folder / "data" / "val").glob("*/*.png"))[:5]
    assert calibration.predict(at_one, images) == calibration.predict(plain, images) == evaluation.predict(plain, images)
    batch = next(iter(evaluation.split_loader(recipe, model, "val")))[0]
    loaded = finetune.load_model(str(at_one)).eval()
    assert loaded.finetune_info["temperature"] == 1.0
    with torch.no_grad():
        assert torch.equal(calibration.calibrated_probabilities(loaded, batch), model(batch).float().softmax(-1))


# -------------------------------------------------------------------------------------- 2. TTA
def test_flip_tta_is_the_mean_of_the_two_passes_probabilities():
    model = tiny_model()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        plain, mirrored = model(x).softmax(-1), model(torch.flip(x, dims=[3])).softmax(-1)
        torch.testing.assert_close(tta_probabilities(model, x, views=tta_views("flip")), (plain + mirrored) / 2,
                                   rtol=0, atol=1e-7)
        at_two = (model(x).div(2).softmax(-1) + model(x.flip(-1)).div(2).softmax(-1)) / 2
        torch.testing.assert_close(tta_probabilities(model, x, 2.0, tta_views("flip")), at_two, rtol=0, atol=1e-7)
    crops = tta_views("crops")
    assert len(crops) == 6 and crops[0](x) is x and all(view(x).shape == x.shape for view in crops)
    corner = torch.nn.functional.interpolate(x[..., :28, :28], size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(crops[1](x), corner)  # top-left: 7/8 of the side, resized back up
    with pytest.raises(FinetuneError, match="--tta: unknown value 'rotate'"):
        tta_views("rotate")
    from finetune import cli as cli_module
    assert cli_module.TTA_CHOICES == tuple(calibration.TTA_MODES)  # the CLI's choices, kept without torch


def test_eval_reports_tta_beside_the_plain_scores(tiny):
    _, (plain, _) = tiny
    report = evaluate_calibrated(plain, tta="flip", store=False)
    model = evaluation.load_for_scoring(plain)
    probabilities, labels = [], []
    with torch.no_grad():
        for images, targets in evaluation.split_loader(evaluation.recipe_for(plain), model, "val"):
            probabilities.append((model(images).softmax(-1) + model(images.flip(-1)).softmax(-1)) / 2)
            labels.append(targets)
    probabilities, labels = torch.cat(probabilities).double(), torch.cat(labels)
    assert report["tta"] == "flip" and report["tta_passes"] == 2
    assert report["top1_tta"] == pytest.approx((probabilities.argmax(1) == labels).double().mean().item())
    assert report["nll_tta"] == pytest.approx(-probabilities.gather(1, labels[:, None]).log().mean().item(), rel=1e-5)
    assert report["ece_tta"] == pytest.approx(numpy_ece(probabilities.numpy(), labels.numpy()), abs=1e-6)
    assert report["top5_tta"] is None and report["top1"] == evaluate_calibrated(plain, store=False)["top1"]
    crops = evaluate_calibrated(plain, tta="crops", store=False)
    assert crops["tta_passes"] == 6 and 0 <= crops["top1_tta"] <= 1


# ------------------------------------------------------------------------------ CLI end to end
def test_calibrate_writes_the_temperature_that_eval_and_predict_then_use(tiny, tmp_path, capsys):
    folder, (plain, _) = tiny
    out = tmp_path / "calibrated.safetensors"
    code, text, err = cli(["calibrate", plain, "-o", out, "--json"], capsys)
    assert code == 0, err
    record = json.loads(text)
    meta = read_meta(out)
    assert meta["temperature"] == record["temperature"] != 1.0
    assert meta["calibration"]["split"] == "val" and meta["calibration"]["n"] == 21
    assert record["nll"] < record["nll_uncalibrated"]
    source, written = read_checkpoint(plain), read_checkpoint(out)
    assert all(torch.equal(source[0][k], written[0][k]) for k in source[0])  # the weights, untouched
    assert {k: v for k, v in written[1].items() if k not in ("temperature", "calibration")} == source[1]

    code, text, err = cli(["eval", out, "--json", "--tta", "flip"], capsys)
    assert code == 0, err
    report = json.loads(text)
    assert report["temperature"] == record["temperature"] and report["nll"] == pytest.approx(record["nll"], abs=1e-12)
    assert report["nll"] <= report["nll_uncalibrated"] and report["ece_uncalibrated"] == pytest.approx(
        record["ece_uncalibrated"], abs=1e-12)
    assert {"brier", "brier_uncalibrated", "top1_tta", "ece_tta"} <= set(report)
    code, text, _ = cli(["eval", out], capsys)
    assert "ECE" in text and "uncalibrated (T=1)" in text and f"temperature {record['temperature']:.4g}" in text

    image = sorted((folder / "data" / "val" / "bee").glob("*.png"))[0]
    code, text, _ = cli(["predict", out, image, "--json", "--top-k", "3"], capsys)
    got = {p["class"]: p["probability"] for p in json.loads(text)[0]["top"]}
    model = finetune.load_model(str(plain)).eval()
    transform = data_lib.build_transforms(finetune.data_config_of(model), 32)
    with torch.no_grad():
        expected = (model(transform(data_lib.load_image(str(image)))[None]) / record["temperature"]).softmax(-1)[0]
    assert got == pytest.approx({name: round(p, 6) for name, p in zip(CLASSES, expected.tolist())}, abs=1e-6)
    code, text, _ = cli(["predict", out, image, "--json", "--tta", "flip"], capsys)
    assert code == 0 and json.loads(text)[0]["tta"] == "flip"

    # In place: only with --force, and then atomically.
    code, _, err = cli(["calibrate", out, "-o", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "--force" in err
    code, _, err = cli(["calibrate", out, "-o", out, "--force"], capsys)
    assert code == 0, err
    assert read_meta(out)["temperature"] == record["temperature"]  # fitted on the raw logits again: the same
    assert [p.name for p in tmp_path.iterdir()] == ["calibrated.safetensors"]


def test_bad_input_is_one_line_exit_2(tiny, tmp_path, capsys):
    _, (plain, _) = tiny
    text_file = tmp_path / "notes.safetensors"
    text_file.write_text("not a checkpoint")
    cases = [
        (["calibrate", plain, "-o", tmp_path / "x.safetensors", "--split", "test"], "split: 'test' is not available"),
        (["eval", plain, "--split", "test"], "split: 'test' is not available"),
        (["calibrate", text_file, "-o", tmp_path / "y.safetensors"], "not a readable safetensors file"),
        (["calibrate", plain, "-o", tmp_path / "y.pth"], "must be a .safetensors file"),
        (["eval", plain, "--tta", "rotate"], "--tta"),
        (["predict", plain, text_file, "--tta", "rotate"], "--tta"),
        (["compare", plain, "--tta", "flip"], "add --eval"),
        (["viz", "reliability", text_file, "-o", tmp_path / "r.png"], "not a readable safetensors file"),
    ]
    for args, message in cases:
        code, _, err = cli(args, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (args, err)
    bad = with_meta(plain, tmp_path / "bad.safetensors", temperature=-1)
    with pytest.raises(FinetuneError, match="'temperature' is -1; expected absent or a finite number > 0"):
        read_meta(bad)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_the_temperature_stays_with_its_weights_head_and_resolution(tiny, tmp_path):
    _, (plain, _) = tiny
    hot = with_meta(plain, tmp_path / "hot.safetensors", temperature=2.5)
    model = finetune.load_model(str(hot))
    assert model.finetune_info["temperature"] == 2.5 and calibration.temperature_of(model) == 2.5
    assert "temperature" not in finetune.load_model(str(hot), num_classes=5).finetune_info  # a new head
    assert "temperature" not in finetune.load_model(str(hot), img_size=48).finetune_info    # other logits
    saved = finetune.save_checkpoint(tmp_path / "resaved.safetensors", model)  # weights that may have changed
    assert "temperature" not in read_meta(saved)


# ------------------------------------------------------------------------- soups, compare, viz
def test_a_soup_scored_on_val_gets_its_own_temperature(tiny, tmp_path):
    _, paths = tiny
    soup = make_soup(paths, out=tmp_path / "soup.safetensors")
    meta = read_meta(soup)
    assert meta["metrics"].get("val_top1") is not None and meta["calibration"]["split"] == "val"
    assert meta["temperature"] == pytest.approx(
        fit_temperature(*_val_logits(soup)), rel=1e-12)  # fitted on the soup's own logits
    unscored = make_soup(paths, out=tmp_path / "unscored.safetensors", evaluate=False)
    assert "temperature" not in read_meta(unscored)
    chosen = make_soup(paths, out=tmp_path / "judged.safetensors", score_fn=lambda state: 0.5)
    assert "temperature" not in read_meta(chosen)  # a caller's judge: we do not know its data


def _val_logits(checkpoint):
    model = evaluation.load_for_scoring(checkpoint)
    cached = calibration.split_logits(model, evaluation.split_loader(evaluation.recipe_for(checkpoint), model, "val"))
    return cached.all_logits(), cached.all_labels()


def test_compare_eval_tta_adds_a_tta_column(tiny, tmp_path, capsys):
    _, (plain, _) = tiny
    copy = with_meta(plain, tmp_path / "model.safetensors")
    code, out, err = cli(["compare", copy, "--eval", "--split", "val", "--tta", "flip", "--format", "json"], capsys)
    assert code == 0, err
    row = json.loads(out)[0]
    assert row["tta"] == "flip" and row["tta_split"] == "val" and 0 <= row["tta_top1"] <= 1
    assert "flip TTA top-1" in err
    stored = json.loads((tmp_path / "results.json").read_text())["checkpoints"]["model.safetensors"]["val"]
    assert stored["top1_tta"] == row["tta_top1"] and stored["tta"] == "flip"
    code, out, err = cli(["compare", copy, "--eval", "--split", "val", "--tta", "flip"], capsys)
    assert code == 0 and err == "" and "| TTA top-1 |" in out and "(flip, val)" in out  # nothing left to score


def test_reliability_diagram_is_drawn_before_and_after_the_temperature(tiny, tmp_path, capsys):
    _, (plain, _) = tiny
    out = tmp_path / "calibrated.safetensors"
    calibration.calibrate_checkpoint(plain, out)
    panels, images = calibration.reliability_panels(out)
    assert images == 21 and [label.split(" ")[0] for label, _ in panels] == ["uncalibrated", "calibrated"]
    assert panels[1][1]["ece"] == pytest.approx(read_meta(out)["calibration"]["ece"], abs=1e-12)
    code, text, err = cli(["viz", "reliability", out, "-o", tmp_path / "reliability.png"], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "reliability.png") as picture:
        assert picture.size == (920, 500)


# ---------------------------------------------------------------------------- calibrate: true
FAST_DEMO = ["epochs=2", "schedule.warmup_epochs=0", "max_steps_per_epoch=1", "batch_size=32", "precision=fp32",
             "data.test_split=0", "data.val_split=0.05",
             "model=scratch:patch_size=4,embed_dim=32,depth=2,num_heads=2,mlp_ratio=2", "attention=fused",
             "keep_best=2", "calibrate=true", "tracking=none"]


def test_calibrate_true_calibrates_the_kept_checkpoints_and_a_crash_mid_write_loses_nothing(tmp_path, monkeypatch):
    run = tmp_path / "run"

    def killed_mid_write(path, tensors, meta):
        def half(tmp):
            Path(tmp).write_bytes(b"half a checkpoint")
            raise RuntimeError("killed while writing the calibrated checkpoint")
        atomic_write(path, half)

    monkeypatch.setattr(calibration, "write_checkpoint", killed_mid_write)
    with pytest.raises(RuntimeError, match="killed while writing"):
        engine.train_recipe("demo", FAST_DEMO, out_dir=str(run), progress=False)
    kept = [run / b["path"] for b in json.loads((run / "best.json").read_text())["checkpoints"]]
    assert len(kept) == 2 and all("temperature" not in read_meta(p) for p in kept)  # whole, uncalibrated
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "killed while writing" in status["reason"] and "--resume" in status["resume"]
    monkeypatch.undo()
    result = engine.resume_run(str(run), progress=False)  # every epoch done: calibrate again
    assert result.status == "finished"
    for path in kept:
        meta = read_meta(path)
        assert meta["calibration"]["split"] == "val" and meta["calibration"]["nll"] <= meta["calibration"][
            "nll_uncalibrated"]
        assert meta["temperature"] == pytest.approx(fit_temperature(*_val_logits(path)), rel=1e-12)
    assert "temperature" not in read_meta(run / "last.safetensors")
    assert "temperature" not in json.loads(torch.load(run / "last.state.pt", weights_only=False)["model_meta"])


# ------------------------------------------------------------------------ real DeiT-Tiny photos
def deit_ant_bee_checkpoint(folder: Path, data_root: Path) -> Path:
    """DeiT-Tiny with its ImageNet head cut to 'ant' (310) and 'bee' (309): a real, accurate
    2-class checkpoint of the hymenoptera photos without a training step."""
    model = finetune.load_model(str(DEIT_WEIGHTS), num_classes=2, class_names=["ants", "bees"])
    imagenet, _ = read_checkpoint(DEIT_WEIGHTS)
    with torch.no_grad():
        model.head.weight.copy_(imagenet["head.weight"][[310, 309]])
        model.head.bias.copy_(imagenet["head.bias"][[310, 309]])
    recipe = recipe_to_dict(recipe_from_dict({
        "model": str(DEIT_WEIGHTS), "img_size": 224, "batch_size": 8, "precision": "fp32",
        "data": {"dataset": "imagefolder", "root": str(data_root), "workers": 0, "augment": "none"}}))
    return finetune.save_checkpoint(folder / "deit-ant-bee.safetensors", model, recipe=recipe)


def photo_subset(root: Path, per_class: int) -> Path:
    """train/ and val/ of hymenoptera with the first `per_class` val photos of each class (links)."""
    for split, count in (("train", 1), ("val", per_class)):
        for name in ("ants", "bees"):
            (root / split / name).mkdir(parents=True)
            for photo in sorted((HYMENOPTERA / split / name).glob("*.jpg"))[:count]:
                os.symlink(photo, root / split / name / photo.name)
    return root


@pytest.fixture(scope="module")
def real_logits(tmp_path_factory):
    require_shared(DEIT_WEIGHTS, HYMENOPTERA)
    folder = tmp_path_factory.mktemp("deit")
    checkpoint = deit_ant_bee_checkpoint(folder, photo_subset(folder / "photos", per_class=8))
    return _val_logits(checkpoint)


def test_on_real_deit_logits_the_calibrated_nll_is_never_above_and_the_scores_check_out(real_logits):
    logits, labels = real_logits
    assert len(labels) == 16 and logits.shape == (16, 2)
    temperature = fit_temperature(logits, labels)
    assert nll(logits, labels, temperature) <= nll(logits, labels)
    for t in (1.0, temperature):
        assert_scores_match_independent_ones(logits, labels, t)


@pytest.mark.slow
def test_calibrate_and_tta_on_the_full_hymenoptera_val_split(tmp_path, capsys):
    """The whole path on the 153 real val photos: calibrate, eval --tta flip, viz reliability."""
    require_shared(DEIT_WEIGHTS, HYMENOPTERA)
    checkpoint = deit_ant_bee_checkpoint(tmp_path, HYMENOPTERA)
    out = tmp_path / "calibrated.safetensors"
    code, text, err = cli(["calibrate", checkpoint, "-o", out, "--json"], capsys)
    assert code == 0, err
    record = json.loads(text)
    code, text, err = cli(["eval", out, "--json", "--tta", "flip"], capsys)
    assert code == 0, err
    report = json.loads(text)
    with capsys.disabled():  # the numbers README quotes
        print(json.dumps({k: report[k] for k in report if k not in ("per_class", "confusion", "class_names")}))
    assert report["n"] == 153 and report["top1"] > 0.93
    assert report["nll"] <= report["nll_uncalibrated"] and report["nll"] == pytest.approx(record["nll"], abs=1e-12)
    code, _, err = cli(["viz", "reliability", out, "-o", tmp_path / "reliability.png"], capsys)
    assert code == 0, err
