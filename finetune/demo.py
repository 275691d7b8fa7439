"""`finetune demo` / `make demo`: the whole product offline, in a few minutes on a CPU.

Train the `demo` recipe (a small ViT from scratch on scikit-learn's bundled digits), soup its best
three checkpoints (uniform and greedy, greedy judged on the val split), score everything on the
test split, and print the comparison table of the three epochs and the two soups.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from . import compare, engine, rundir, soup


@dataclass
class DemoResult:
    run: engine.RunResult
    soups: List[Path]
    table: str


def run_demo(out_dir: Optional[str] = None, overrides: Sequence[str] = (), progress: bool = True) -> DemoResult:
    run = engine.train_recipe("demo", overrides, out_dir=out_dir, progress=progress)
    ingredients = rundir.best_checkpoints(run.run_dir)
    soups = [soup.make_soup([run.run_dir], method="uniform", split="val"),
             soup.make_soup([run.run_dir], method="greedy", split="val")]
    compare.evaluate_missing(compare.collect_rows([*ingredients, *soups]), split="test")
    rows = compare.collect_rows([*ingredients, *soups])
    return DemoResult(run, soups, compare.format_table(rows, sort="test"))
