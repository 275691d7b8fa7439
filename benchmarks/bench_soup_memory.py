"""Peak memory of a uniform soup of three B_16 checkpoints, relative to one checkpoint's size.

    python -m benchmarks.bench_soup_memory [--dir DIR]

Writes three random checkpoints of ViT-B/16 at 384 px (37 classes, ~350 MB each) into a temporary
directory, then runs each contender in a fresh subprocess and reads that child's peak RSS:

    baseline    imports finetune and nothing else
    streaming   finetune.soup.make_soup (validate, stream the mean, hash ingredients, write)
    naive       read all three checkpoints, stack and average, write

The extra memory (child peak minus baseline peak) divided by one checkpoint's file size is the
ratio reported. This parent process never imports torch, so it stays small (see write_ingredients). Streaming should hold about one model (the means) plus one tensor: it fails (exit
status 1) above 1.6. The naive way holds every ingredient at once, so it lands near 4.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIMIT = 1.6
REPO = Path(__file__).resolve().parent.parent
PEAK = "import resource, sys; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; " \
       "print(peak if sys.platform == 'darwin' else peak * 1024)"  # ru_maxrss: KiB on Linux, bytes on macOS
CHILDREN = {
    "baseline": "import finetune, finetune.soup\n",
    "streaming": "import sys, finetune, finetune.soup\n"
                 "finetune.soup.make_soup(sys.argv[1:4], out=sys.argv[4], evaluate=False)\n",
    "naive": "import sys, torch, finetune, finetune.soup\n"
             "from finetune.checkpoints import read_checkpoint, write_checkpoint\n"
             "loaded = [read_checkpoint(p) for p in sys.argv[1:4]]\n"
             "mean = {k: torch.stack([s[k] for s, _ in loaded]).mean(0) for k in loaded[0][0]}\n"
             "write_checkpoint(sys.argv[4], mean, loaded[0][1])\n",
}


WRITE_INGREDIENTS = """
import sys, torch, finetune
from finetune.checkpoints import write_checkpoint
arch = {"timm_name": "vit_base_patch16_384"}
model = finetune.build_model(arch, 37, 384)
meta = {"arch": arch, "num_classes": 37, "class_names": None, "img_size": 384, "data_config": None,
        "source": "benchmark", "epoch": None, "metrics": {}, "recipe": None}
for path in sys.argv[1:]:
    write_checkpoint(path, {k: torch.randn_like(v) * 0.02 for k, v in model.state_dict().items()}, meta)
"""


def write_ingredients(folder: Path, count: int = 3) -> list:
    # In a child too: Linux carries a process's peak RSS across fork+exec, so a parent holding a
    # model would lift every child's ru_maxrss to its own size.
    paths = [folder / f"ingredient-{i}.safetensors" for i in range(count)]
    subprocess.run([sys.executable, "-c", WRITE_INGREDIENTS, *map(str, paths)], cwd=REPO, check=True)
    return paths


def peak_rss(name: str, args: list) -> tuple:
    """(peak RSS in bytes, seconds) of a fresh interpreter running CHILDREN[name]."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILDREN[name] + PEAK, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} child failed:\n{done.stderr}")
    return int(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="Where to write the ~1.4 GB of checkpoints (default: temp)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        paths = write_ingredients(folder)
        size = paths[0].stat().st_size
        baseline, _ = peak_rss("baseline", [])
        results = {name: peak_rss(name, [*paths, folder / f"{name}.safetensors"]) for name in ("streaming", "naive")}
    mb = 1 / 2 ** 20
    print(f"one checkpoint: {size * mb:.0f} MiB; baseline peak (import finetune): {baseline * mb:.0f} MiB")
    print(f"{'method':10} {'peak MiB':>9} {'extra MiB':>10} {'extra / checkpoint':>19} {'time s':>7}")
    ratios = {}
    for name, (peak, seconds) in results.items():
        ratios[name] = (peak - baseline) / size
        print(f"{name:10} {peak * mb:9.0f} {(peak - baseline) * mb:10.0f} {ratios[name]:19.2f} {seconds:7.1f}")
    verdict = "ok" if ratios["streaming"] <= LIMIT else "FAIL"
    print(f"streaming ratio {ratios['streaming']:.2f} (limit {LIMIT}): {verdict}")
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
