"""Issue 18: every soup beside the best single fine-tune and the logit ensemble, on real photos.

    python -m benchmarks.soups [--out runs/bench-soups] [--stage all|sweep|soups|table]

A 3-trial sweep of `recipes/hymenoptera-deit-tiny.yaml` (DeiT-Tiny, the real ImageNet weights of
../shared/weights) over the learning rate (0.0005, 0.001, 0.002; one seed, so the three trials share
one data split), each trial keeping its best checkpoint (`keep_best=1`). The hymenoptera photos come
pre-split into train/ and val/ only, and `data.test_split` does not apply to a pre-split folder, so
the script first pools all 398 photos into `OUT/hymenoptera-pooled/{ants,bees}/` (symlinks) and
the sweep cuts them by `--set data.val_split=0.2 --set data.test_split=0.25` (stratified, recipe
seed 0): 219 train, 80 val (selection), 99 test (report).

Then, on the three trials' best checkpoints (ranked by val, as `finetune soup SWEEP_DIR` does),
one `finetune soup` command per method, each scored on val (selection) and test (report):
uniform, greedy, learned, learned --by-layer, Model Stock of the top 2 and of all 3, WiSE-FT of
the best trial; and `finetune compare` of the soups, whose `ensemble` row is the logit ensemble of
the ingredients. The table (markdown) is printed and written to OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
PHOTOS = SHARED / "data" / "hymenoptera_data"
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.fb_in1k.safetensors"
RECIPE = REPO / "recipes" / "hymenoptera-deit-tiny.yaml"
LRS = "0.0005,0.001,0.002"
SPLITS = ("data.val_split=0.2", "data.test_split=0.25")


def pooled_photos(out: Path) -> Path:
    """OUT/hymenoptera-pooled/{ants,bees}/: symlinks to every train and val photo, no split folders."""
    pooled = out / "hymenoptera-pooled"
    for split in ("train", "val"):
        for class_dir in sorted((PHOTOS / split).iterdir()):
            target = pooled / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for photo in sorted(class_dir.iterdir()):
                link = target / f"{split}-{photo.name}"
                if not link.exists():
                    link.symlink_to(photo.resolve())
    return pooled


def finetune_cli(*args: str) -> str:
    command = [sys.executable, "-m", "finetune", *map(str, args)]
    print("$ finetune " + " ".join(map(str, args)), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, text=True, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    print(done.stdout + done.stderr, flush=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): finetune {' '.join(map(str, args))}")
    return done.stdout


def sweep(out: Path) -> Path:
    pooled = pooled_photos(out)
    sweep_dir = out / "sweep"
    finetune_cli("sweep", RECIPE, "--grid", f"optimizer.lr={LRS}", "--set", f"data.root={pooled}",
                 *[x for s in SPLITS for x in ("--set", s)], "--set", "keep_best=1", "--out", sweep_dir,
                 "--no-progress")
    return sweep_dir


def ranked_best(sweep_dir: Path):
    """The trials' best checkpoints, best val first (the order `finetune soup SWEEP_DIR` uses)."""
    from finetune.soup import resolve_ingredients
    return resolve_ingredients([sweep_dir])


def soups(out: Path) -> None:
    sweep_dir = out / "sweep"
    best = ranked_best(sweep_dir)
    soups_dir = out / "soups"
    soups_dir.mkdir(exist_ok=True)
    commands = {
        "uniform": ["--method", "uniform", *best],
        "greedy": ["--method", "greedy", *best],
        "learned": ["--method", "learned", *best],
        "learned-bylayer": ["--method", "learned", "--by-layer", *best],
        "stock2": ["--method", "stock", WEIGHTS, *best[:2]],
        "stock3": ["--method", "stock", WEIGHTS, *best],
        "wise": ["--method", "wise", WEIGHTS, best[0]],
    }
    for name, args in commands.items():
        target = soups_dir / f"soup-{name}.safetensors"
        if target.exists():
            print(f"{target} exists, kept", flush=True)
            continue
        finetune_cli("soup", *args, "-o", target)


def table(out: Path) -> str:
    from finetune.checkpoints import read_meta
    from finetune.compare import collect_rows
    from finetune.evaluation import fraction
    sweep_dir, soups_dir = out / "sweep", out / "soups"
    best = ranked_best(sweep_dir)
    names = {"uniform": "uniform soup (3)", "greedy": "greedy soup", "learned": "learned soup (3)",
             "learned-bylayer": "learned soup by layer (3)", "stock2": "Model Stock (top 2)",
             "stock3": "Model Stock (3)", "wise": "WiSE-FT of the best (best alpha on val)"}
    lines = ["| model | val top-1 (selection) | test top-1 (report) | forward passes at inference | notes |",
             "| --- | --- | --- | --- | --- |"]
    for rank, path in enumerate(best):
        meta = read_meta(path)
        results = path.parent / "results.json"
        test = (json.loads(results.read_text()).get("test") or {}).get("top1") if results.is_file() else None
        label = "best single fine-tune" if rank == 0 else f"fine-tune #{rank + 1}"
        lines.append(f"| {label} ({path.parent.name}) | {fraction(meta['metrics'].get('val_top1'))} | "
                     f"{fraction(test)} | 1 | epoch {meta.get('epoch')} |")
    for key, label in names.items():
        path = soups_dir / f"soup-{key}.safetensors"
        if not path.exists():
            lines.append(f"| {label} | not run | | 1 | |")
            continue
        meta = read_meta(path)
        record, metrics = meta["soup"], meta.get("metrics") or {}
        lines.append(f"| {label} | {fraction(metrics.get('val_top1'))} | {fraction(metrics.get('test_top1'))} | 1 | "
                     f"{_note(record)} |")
    for key, label in (("uniform", "logit ensemble of the 3"), ("stock2", "logit ensemble of the top 2")):
        path = soups_dir / f"soup-{key}.safetensors"
        for row in collect_rows([path]) if path.exists() else []:  # compare's ensemble row beside the soup
            if row["kind"] == "ensemble":
                lines.append(f"| {label} | {fraction(row['best_val_top1'])} | {fraction(row['test_top1'])} | "
                             f"{len(row['ingredients'])} | mean of logits |")
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    return text


def _note(record) -> str:
    method = record["method"]
    if method == "greedy":
        return f"kept {len(record['kept'])} of {len(record['ingredients'])}"
    if method == "wise":
        return f"alpha {record['alpha']}"
    if method == "stock":
        values = [b["t"] for b in record["t_by_block"].values() if b.get("t") is not None]
        return f"t per block {min(values):.2f}-{max(values):.2f}" if values else ""
    if method == "learned":
        weights = ", ".join(f"{w:.2f}" for w in record["weights"])
        chosen = "the uniform start kept" if record["epoch"] == 0 else f"epoch {record['epoch']} of {record['epochs']}"
        return f"weights {weights} ({chosen}), temperature {record['temperature']:.2f}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-soups"))
    parser.add_argument("--stage", choices=("all", "sweep", "soups", "table"), default="all")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "sweep"):
        sweep(out)
    if args.stage in ("all", "soups"):
        soups(out)
    if args.stage in ("all", "table"):
        print(table(out))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
