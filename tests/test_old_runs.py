"""Run directories written by finetune 0.1 still load, score, compare, soup and resume (issue 7).

`fixtures/run-0.1-demo` was written by commit e439e86 (before the restructure: resume point
without a format tag, weights or sampler position; results.json written by the old compare):

    git worktree add /tmp/old e439e86 && cd /tmp/old
    finetune train demo --out run --set epochs=3 --set max_steps_per_epoch=10 --set data.augment=none \
        --set optimizer.lr=0.003 --set batch_size=32 --set schedule.warmup_epochs=0 \
        --set model=scratch:patch_size=4,embed_dim=32,depth=2,num_heads=2,mlp_ratio=2
    (tb/ left out)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune import engine
from finetune.checkpoints import read_checkpoint
from finetune.evaluation import evaluate_on_split

from conftest import finetune_out as cli

OLD_RUN = Path(__file__).parent / "fixtures" / "run-0.1-demo"


@pytest.fixture
def old_run(tmp_path) -> Path:
    run = tmp_path / "run-0.1-demo"
    shutil.copytree(OLD_RUN, run)
    return run




def test_an_old_checkpoint_scores_as_the_old_code_scored_it(old_run):
    stored = json.loads((old_run / "results.json").read_text())["test"]
    report = evaluate_on_split(old_run / stored["checkpoint"], split="test", store=False)
    assert report["n"] == stored["n"] and report["top1"] == pytest.approx(stored["top1"], abs=1e-9)
    assert report["loss"] == pytest.approx(stored["loss"], abs=1e-5)


def test_compare_reads_an_old_run(old_run, capsys):
    rows = json.loads(cli(["compare", str(old_run), "--format", "json"], capsys))
    row = next(r for r in rows if r["kind"] == "run")
    assert row["best_epoch"] == 2 and row["best_val_top1"] == pytest.approx(0.1389, abs=1e-4)
    assert row["test_top1"] == pytest.approx(0.1167, abs=1e-4)


def test_an_old_runs_best_checkpoints_soup_to_their_mean(old_run, capsys):
    cli(["soup", str(old_run), "--out", str(old_run / "soup.safetensors")], capsys)
    soup = read_checkpoint(old_run / "soup.safetensors")[0]
    ingredients = [read_checkpoint(old_run / f"epoch-00{e}.safetensors")[0] for e in (1, 2, 3)]
    for key, value in soup.items():
        mean = sum(i[key].double() for i in ingredients) / 3
        assert (value.double() - mean).abs().max() < 1e-6, key


def test_an_old_run_resumes_for_one_more_epoch(old_run):
    before = (old_run / "metrics.jsonl").read_text().splitlines()
    result = engine.resume_run(str(old_run), ["epochs=4"], progress=False)
    after = (old_run / "metrics.jsonl").read_text().splitlines()
    assert result.status == "finished" and after[:3] == before and json.loads(after[3])["epoch"] == 4
