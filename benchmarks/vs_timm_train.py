"""Wall time of a real fine-tune, side by side with timm's own `train.py` (issue 10).

    git clone https://github.com/huggingface/pytorch-image-models /tmp/timm-src   # train.py is not in the wheel
    python -m benchmarks.vs_timm_train --timm-train /tmp/timm-src/train.py [--repeats 2]

Both fine-tune the real DeiT-Tiny weights of `../shared/weights` on hymenoptera (`../shared/data`)
with the hyper-parameters of `recipes/hymenoptera-deit-tiny.yaml`, mapped flag by flag below:
224 px, batch 32, 5 epochs, plain momentum SGD (timm's `momentum`; its `sgd` is Nesterov) lr 0.001,
momentum 0.9, no weight decay, cosine per epoch without warm-up, RandomResizedCrop(scale 0.6-1) +
flip with bicubic resampling and no colour jitter, no label smoothing, 2 loader workers, eval every
epoch, best 3 checkpoints kept. Each side runs as its own process on the same machine, the order
alternating between repeats; reported: wall time of the whole command (start-up, training,
evaluation, checkpoints; `finetune train` also writes its pictures, timed apart with
`--no-pictures` when `--pictures-apart`), and the best val top-1 each printed.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.fb_in1k.safetensors"
DATA = SHARED / "data" / "hymenoptera_data"


def finetune_command(out: Path, pictures: bool) -> list:
    return [sys.executable, "-m", "finetune", "train", "hymenoptera-deit-tiny", "--out", str(out),
            "--no-progress"] + ([] if pictures else ["--no-pictures"])


def timm_command(train_py: Path, out: Path) -> list:
    return [sys.executable, str(train_py), "--data-dir", str(DATA), "--train-split", "train", "--val-split", "val",
            "--model", "deit_tiny_patch16_224", "--pretrained", "--pretrained-path", str(WEIGHTS),
            "--num-classes", "2", "--img-size", "224", "-b", "32", "--epochs", "5",
            "--opt", "momentum", "--lr", "0.001", "--momentum", "0.9", "--weight-decay", "0",
            "--sched", "cosine", "--warmup-epochs", "0", "--cooldown-epochs", "0",
            "--scale", "0.6", "1.0", "--train-interpolation", "bicubic", "--color-jitter", "0", "--smoothing", "0",
            "--workers", "2", "--device", "cpu", "--no-prefetcher", "--checkpoint-hist", "3",
            "--seed", "0", "--output", str(out), "--experiment", "run"]


def run(command: list, cwd: Path) -> tuple:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def finetune_best(out: Path) -> float:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return max(line["val_top1"] for line in lines)


def timm_best(log: str) -> float:
    # train.py prints "*** Best metric: 94.77... (epoch N)" at the end.
    found = re.findall(r"Best metric: ([0-9.]+)", log)
    return float(found[-1]) / 100 if found else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", required=True, type=Path, help="timm's train.py (from a clone of timm)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--pictures-apart", action="store_true", help="also time finetune with --no-pictures")
    args = parser.parse_args(argv)
    if not WEIGHTS.is_file() or not DATA.is_dir():
        raise SystemExit(f"needs {WEIGHTS} and {DATA} (../shared beside the checkout)")
    contenders = {"finetune train": lambda out: finetune_command(out, True),
                  "timm train.py": lambda out: timm_command(args.timm_train.resolve(), out)}
    if args.pictures_apart:
        contenders["finetune train --no-pictures"] = lambda out: finetune_command(out, False)
    times = {name: [] for name in contenders}
    best = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(contenders) if repeat % 2 == 0 else list(contenders)[::-1]
            for name in order:
                out = Path(tmp) / f"run-{repeat}-{list(contenders).index(name)}"
                seconds, log = run(contenders[name](out), REPO)
                times[name].append(seconds)
                best[name].append(finetune_best(out) if name.startswith("finetune") else timm_best(log))
                print(f"{name}: {seconds:.0f} s, best val top-1 {best[name][-1]:.1%}", flush=True)
    print(f"\n{'command':32} {'wall s (median)':>16} {'vs timm':>8} {'best val top-1':>15}")
    timm_s = statistics.median(times["timm train.py"])
    for name in contenders:
        median = statistics.median(times[name])
        print(f"{name:32} {median:16.0f} {timm_s / median:7.2f}x {statistics.median(best[name]):15.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
