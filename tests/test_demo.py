"""`make demo`: pretrain, fine-tune through the normal loading path, soup, and show what the
pretrained weights bought against the same recipe from scratch (issues 3, 4 and 11)."""
from __future__ import annotations

import json
import re

import pytest

from finetune import rundir
from finetune.checkpoints import read_checkpoint, read_meta
from finetune.cli import main
from finetune.demo import export_digits
from finetune.errors import FinetuneError


# The whole `finetune demo` (pretrain, fine-tune, from scratch, soups): ~3.5 min of 2 cores, so `make test-slow`.
@pytest.mark.slow
def test_demo_finetunes_pretrained_weights_and_beats_the_same_recipe_from_scratch(tmp_path, capsys):
    out = tmp_path / "demo"
    try:
        main(["demo", "--out", str(out), "--no-progress"])
    except SystemExit as exit_info:
        assert exit_info.code == 0
    text = capsys.readouterr().out

    # Stage 1 wrote the "pretrained" weights: a checkpoint without a head, at 16 px (a 4x4 grid).
    pretrained, meta = read_checkpoint(out / "pretrained.safetensors")
    assert meta["num_classes"] == 0 and not any(k.startswith("head.") for k in pretrained)
    assert meta["img_size"] == 16 and pretrained["pos_embed"].shape[1] == 1 + 4 * 4

    # Stage 2 loaded them through the recipe's `model:`: new head for 5 new classes, 6x6 grid.
    run = out / "2-finetune"
    best = json.loads((run / "best.json").read_text())["checkpoints"]
    assert len(best) == 3
    tuned, tuned_meta = read_checkpoint(run / best[0]["path"])
    assert tuned_meta["source"] == str((out / "pretrained.safetensors").resolve())
    assert tuned_meta["class_names"] == ["5", "6", "7", "8", "9"] and tuned_meta["img_size"] == 24
    assert tuned["pos_embed"].shape[1] == 1 + 6 * 6 and tuned["head.weight"].shape[0] == 5

    # The soups: greedy selected on val, both scored on test.
    greedy = read_meta(run / "soup-greedy.safetensors")
    assert greedy["soup"]["split"] == "val" and greedy["soup"]["report_split"] == "test"
    assert greedy["metrics"]["val_top1"] >= max(entry["val_top1"] for entry in best)
    assert set(read_meta(run / "soup.safetensors")["metrics"]) == {"val_top1", "test_top1"}

    # The printout: the table of the fine-tune's epochs, its soups and the from-scratch run, then
    # fine-tuned vs from scratch on stage 2's test split, fine-tuned clearly ahead.
    table = text[text.index("| run |"):]
    for entry in best:
        assert f"2-finetune/{entry['path']}" in table
    assert "2-finetune/soup.safetensors" in table and "2-finetune/soup-greedy.safetensors" in table
    assert "2-scratch/" in table
    finetuned = float(re.search(r"fine-tuned from stage 1: +([0-9.]+)", text).group(1))
    scratch = float(re.search(r"trained from scratch: +([0-9.]+)", text).group(1))
    results = json.loads((run / "results.json").read_text())
    assert finetuned == pytest.approx(results["test"]["top1"], abs=1e-4)
    assert scratch == pytest.approx(json.loads((out / "2-scratch" / "results.json").read_text())["test"]["top1"],
                                    abs=1e-4)
    assert finetuned >= 0.85 and finetuned - scratch >= 0.2, (finetuned, scratch)
    assert "the pretrained weights bought +" in text
    lines = text.rstrip().splitlines()
    at = lines.index(f"run: {run}  (finished)")  # the CLI's usual result lines, for the fine-tune
    assert f"test top-1 {results['test']['top1']:.4f}" in lines[at + 1]
    assert rundir.read_status(out / "2-scratch")["state"] == "finished"


def test_the_digits_folders_hold_the_digits_pixels(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits
    folder = export_digits(tmp_path / "digits-5-9", (5, 6, 7, 8, 9))
    digits = load_digits()
    files = sorted(folder.rglob("*.png"))
    assert sorted(p.name for p in folder.iterdir()) == ["5", "6", "7", "8", "9"]
    assert len(files) == sum(int(t) >= 5 for t in digits.target)
    sample = files[0]
    index = int(sample.stem)
    assert int(sample.parent.name) == digits.target[index]
    import numpy as np
    pixels = np.asarray(Image.open(sample))
    assert pixels.tolist() == np.round(digits.images[index] * (255 / 16)).astype(int).tolist()
    assert export_digits(folder, (5, 6, 7, 8, 9)) == folder  # written once
    assert not list(tmp_path.glob(".*partial*"))


def test_the_demo_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    from finetune.demo import run_demo
    with pytest.raises(FinetuneError, match="not empty"):
        run_demo(str(tmp_path / "taken"), progress=False)
    with pytest.raises(FinetuneError, match="unknown key 'epoch'"):
        run_demo(str(tmp_path / "new"), ["epoch=3"], progress=False)
