"""`make demo`: the offline demo trains, soups its best 3, and compares (issues 3 and 4)."""
from __future__ import annotations

import json

from finetune.cli import main
from finetune.checkpoints import read_meta


def test_demo_reaches_95_percent_test_and_prints_soups_beside_epochs(tmp_path, capsys):
    run = tmp_path / "demo"
    try:
        main(["demo", "--out", str(run), "--no-progress"])
    except SystemExit as exit_info:
        assert exit_info.code == 0
    out = capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["top1"] >= 0.95, results
    best = json.loads((run / "best.json").read_text())["checkpoints"]
    assert len(best) == 3
    table = out[out.index("| run |"):]
    for entry in best:
        assert entry["path"].removesuffix(".safetensors") in table
    assert "soup.safetensors" in table and "soup-greedy.safetensors" in table
    assert out.rstrip().splitlines()[-2] == f"run: {run}  (finished)"
    assert f"test top-1 {results['test']['top1']:.4f}" in out.rstrip().splitlines()[-1]
    greedy = read_meta(run / "soup-greedy.safetensors")
    assert greedy["soup"]["method"] == "greedy"
    assert greedy["metrics"]["val_top1"] >= max(entry["val_top1"] for entry in best)
