"""compare: runs, soups and checkpoints side by side; damaged runs marked; csv/json/sort; --eval."""
from __future__ import annotations

import csv
import io
import json

import pytest
import torch

import finetune
from finetune import compare
from finetune.compare import collect_rows, evaluate_missing, format_table
from finetune.errors import FinetuneError

from conftest import run_entry
from finetune.cli import compare_main
from finetune.soup import make_soup

RECIPE_YAML = """\
name: tiny
model: scratch:patch_size=8,embed_dim=64,depth=2,num_heads=4
img_size: 32
epochs: 3
data:
  dataset: imagefolder
  root: data/tiny
"""


def small_model():
    model = finetune.load_model("scratch:patch_size=8,embed_dim=64,depth=2,num_heads=4", num_classes=3,
                                img_size=32, class_names=["a", "b", "c"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def metrics_line(epoch, val_top1, images_per_s):
    return json.dumps({"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 0.5, "val_top1": val_top1,
                       "val_top5": None, "lr": 0.01, "images_per_s": images_per_s, "time_s": 2.0}) + "\n"


def finished_run(runs):
    """A run of 3 epochs whose best epoch is 2, with a test score and a uniform soup."""
    run = runs / "tiny-20240101-120000"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(RECIPE_YAML)
    val = {1: 0.5, 2: 0.9441, 3: 0.8}
    (run / "metrics.jsonl").write_text("".join(metrics_line(e, v, 100.0 * e) for e, v in val.items()))
    for epoch in (2, 3):
        finetune.save_checkpoint(run / f"epoch-{epoch:03d}.safetensors", small_model(), epoch=epoch,
                                 metrics={"val_top1": val[epoch]})
    finetune.save_checkpoint(run / "last.safetensors", small_model(), epoch=3)
    (run / "best.json").write_text(json.dumps({"metric": "val_top1", "keep": 2, "checkpoints": [
        {"epoch": 2, "path": "epoch-002.safetensors", "val_top1": 0.9441},
        {"epoch": 3, "path": "epoch-003.safetensors", "val_top1": 0.8}]}))
    (run / "results.json").write_text(json.dumps({"test": {"top1": 0.91, "top5": None, "loss": 0.3,
                                                           "checkpoint": "epoch-002.safetensors"}}))
    (run / "status.json").write_text(json.dumps({"state": "finished"}))
    make_soup([run], score_fn=lambda state: 0.95)
    return run


def crashed_run(runs):
    """Killed mid-write in epoch 3: the last metrics line is cut short; no best.json, no status.json."""
    run = runs / "tiny-20240102-090000"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(RECIPE_YAML)
    (run / "metrics.jsonl").write_text(metrics_line(1, 0.4, 50.0) + metrics_line(2, 0.6, 70.0)
                                       + metrics_line(3, 0.7, 60.0)[:25])
    return run


@pytest.fixture
def runs(tmp_path):
    runs = tmp_path / "runs"
    finished_run(runs)
    crashed_run(runs)
    return runs


def run_cli(args, capsys):
    return run_entry(compare_main, args, capsys)


# -------------------------------------------------------------------------------------------- rows
def test_rows_show_runs_and_soups_side_by_side(runs):
    rows = collect_rows(runs_dir=runs)
    assert [(r["name"], r["kind"]) for r in rows] == [
        ("tiny-20240101-120000", "run"), ("tiny-20240101-120000/soup.safetensors", "soup"),
        ("tiny-20240101-120000/ensemble of 2", "ensemble"), ("tiny-20240102-090000", "run")]
    run, soup, ensemble, crashed = rows
    assert run["model"].startswith("scratch:") and run["recipe"] == "tiny" and run["dataset"] == "imagefolder"
    assert run["img_size"] == 32 and run["epochs"] == 3 and run["status"] == "finished"
    assert (run["best_val_top1"], run["best_epoch"]) == (0.9441, 2) and run["test_top1"] == 0.91
    assert run["images_per_s"] == pytest.approx(200.0)
    assert run["params"] == sum(p.numel() for p in small_model().parameters())
    assert soup["ingredients"] == ["epoch-002", "epoch-003"] and soup["best_val_top1"] == 0.95
    assert soup["recipe"] == "tiny" and soup["params"] == run["params"] and soup["img_size"] == 32
    assert ensemble["ingredients"] == ["epoch-002", "epoch-003"] and ensemble["params"] == 2 * run["params"]
    assert ensemble["best_val_top1"] is None and ensemble["test_top1"] is None  # scored by a caller's function
    assert crashed["status"] == "partial" and crashed["epochs"] == 2 and crashed["best_val_top1"] == 0.6
    assert "metrics.jsonl line 3 unreadable (truncated?)" in crashed["notes"] and "no best.json" in crashed["notes"]
    assert crashed["params"] is None and crashed["checkpoint"] is None


def test_runs_without_any_files_and_unreadable_soups_still_get_rows(tmp_path):
    empty = tmp_path / "runs" / "empty-run"
    empty.mkdir(parents=True)
    (empty / "soup.safetensors").write_bytes(b"\x00" * 10)
    rows = collect_rows(runs_dir=tmp_path / "runs")
    assert rows[0]["status"] == "no metrics" and "no metrics.jsonl" in rows[0]["notes"]
    assert rows[1]["status"] == "unreadable" and "truncated or corrupt" in rows[1]["notes"][0]
    assert "| empty-run | run |" in format_table(rows)


def test_checkpoint_files_given_directly(runs):
    ckpt = runs / "tiny-20240101-120000" / "epoch-003.safetensors"
    [row] = collect_rows([ckpt])
    assert row["kind"] == "checkpoint" and row["best_val_top1"] == 0.8 and row["best_epoch"] == 3
    with pytest.raises(FinetuneError, match="nope: no such run directory or checkpoint file"):
        collect_rows([runs / "nope"])
    with pytest.raises(FinetuneError, match="no such runs directory"):
        collect_rows(runs_dir=runs / "missing")


# ------------------------------------------------------------------------------------------ formats
def test_markdown_table(runs):
    table = format_table(collect_rows(runs_dir=runs))
    lines = table.splitlines()
    assert lines[0] == ("| run | kind | model | recipe | dataset | img | epochs | best val top-1 (epoch) | test top-1 "
                        "| params (M) | img/s | ingredients/notes |")
    assert len(lines) == 6 and all(line.count("|") == 13 for line in lines)
    run, soup, ensemble, crashed = lines[2:]
    assert "| 0.9441 (2) | 0.9100 |" in run and "| 200.0 |" in run and "| finished |" in run
    assert "| soup |" in soup and "uniform soup of epoch-002, epoch-003" in soup and "| 0.9500 | - |" in soup
    assert "| ensemble |" in ensemble and "logit ensemble (mean of logits) of epoch-002, epoch-003" in ensemble
    assert "partial; metrics.jsonl line 3 unreadable (truncated?); no best.json" in crashed
    assert "| 0.6000 (2) | - | - |" in crashed


def test_csv_and_json(runs):
    rows = collect_rows(runs_dir=runs)
    parsed = list(csv.DictReader(io.StringIO(format_table(rows, "csv"))))
    assert [r["kind"] for r in parsed] == ["run", "soup", "ensemble", "run"]
    assert parsed[1]["ingredients"] == "epoch-002;epoch-003" and parsed[0]["best_val_top1"] == "0.9441"
    assert json.loads(format_table(rows, "json")) == json.loads(json.dumps(rows))


def test_sort(runs):
    rows = collect_rows(runs_dir=runs)
    by_val = [r["kind"] for r in compare.sort_rows(rows, "best_val_top1")]
    assert by_val == ["soup", "run", "run", "ensemble"]  # accuracies best first, unscored last
    by_test = [r["name"] for r in compare.sort_rows(rows, "test")]
    assert by_test[0] == "tiny-20240101-120000" and by_test[-1] != by_test[0]  # missing values last
    assert [r["kind"] for r in compare.sort_rows(rows, "kind")] == ["ensemble", "run", "run", "soup"]
    assert format_table(rows, "markdown", sort="val").splitlines()[2].startswith("| tiny-20240101-120000/soup")


def test_unknown_sort_column_is_one_line_listing_columns(runs, capsys):
    with pytest.raises(FinetuneError, match="unknown column 'acc'; expected one of name, kind"):
        format_table(collect_rows(runs_dir=runs), sort="acc")
    code, out, err = run_cli(["--runs-dir", runs, "--sort", "acc"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "best_val_top1" in err


def test_cli_formats(runs, capsys):
    code, out, err = run_cli(["--runs-dir", runs, "--format", "json", "--sort", "best_val_top1"], capsys)
    assert code == 0, err
    assert [r["kind"] for r in json.loads(out)] == ["soup", "run", "run", "ensemble"]
    code, out, _ = run_cli([runs / "tiny-20240102-090000"], capsys)
    assert code == 0 and out.count("\n") == 3 and "partial" in out


# --------------------------------------------------------------------------------------------- eval
def test_eval_scores_only_what_has_no_score_and_stores_it(runs):
    calls = []

    def evaluator(checkpoint, split):
        calls.append((checkpoint.name, split))
        return {"top1": 0.875, "top5": None, "loss": 0.4, "n": 8}

    done = evaluate_missing(collect_rows(runs_dir=runs), "test", evaluator)
    assert calls == [("soup.safetensors", "test")]  # the run has a test score; the crashed run has no checkpoint
    assert {"name": "tiny-20240102-090000", "skipped": "no checkpoint to evaluate"} in done
    results = json.loads((runs / "tiny-20240101-120000" / "results.json").read_text())
    assert results["test"]["top1"] == 0.91  # the run's own score is kept
    assert results["checkpoints"]["soup.safetensors"]["test"] == {"top1": 0.875, "top5": None, "loss": 0.4, "n": 8}
    assert collect_rows(runs_dir=runs)[1]["test_top1"] == 0.875
    assert evaluate_missing(collect_rows(runs_dir=runs), "test", evaluator) == [
        {"name": "tiny-20240102-090000", "skipped": "no checkpoint to evaluate"}]
    assert len(calls) == 1


def test_eval_of_a_run_without_test_score_writes_its_results(runs):
    run = runs / "tiny-20240101-120000"
    (run / "results.json").unlink()
    evaluate_missing(collect_rows([run]), "test", lambda checkpoint, split: {"top1": 0.5, "loss": 1.0})
    results = json.loads((run / "results.json").read_text())
    assert results["test"] == {"top1": 0.5, "top5": None, "loss": 1.0, "checkpoint": "epoch-002.safetensors"}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_eval_refuses_to_overwrite_unreadable_results(runs):
    run = runs / "tiny-20240101-120000"
    (run / "results.json").write_text('{"test": {"top1": 0.9')
    with pytest.raises(FinetuneError, match="results.json: not a readable JSON object"):
        evaluate_missing(collect_rows([run]), "test", lambda checkpoint, split: {"top1": 0.5})
    assert (run / "results.json").read_text() == '{"test": {"top1": 0.9'


def test_cli_eval_reports_on_stderr_and_shows_the_new_score(runs, capsys, monkeypatch):
    monkeypatch.setattr(compare, "evaluate_on_split", lambda checkpoint, **kwargs: {"top1": 0.8125})
    monkeypatch.setattr(compare, "ensemble_on_split", lambda members, **kwargs: {"top1": 0.875, "forward_passes": 2})
    code, out, err = run_cli(["--runs-dir", runs, "--eval", "--format", "csv"], capsys)
    assert code == 0, err
    assert "tiny-20240101-120000/soup.safetensors: test top-1 0.8125" in err
    assert "tiny-20240101-120000/ensemble of 2: test top-1 0.8750" in err
    assert [r["test_top1"] for r in csv.DictReader(io.StringIO(out))] == ["0.91", "0.8125", "0.875", ""]


def test_a_soup_score_recorded_under_the_split_belongs_to_the_soup_row(runs):
    run = runs / "tiny-20240101-120000"
    (run / "results.json").write_text(json.dumps({"test": {"top1": 0.97, "checkpoint": "soup.safetensors"}}))
    run_row, soup_row, _ = collect_rows([run])
    assert run_row["test_top1"] is None and soup_row["test_top1"] == 0.97
