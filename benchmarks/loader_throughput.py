"""Training-loader throughput per data source, image folder = 1.0 (issue 16).

The hymenoptera train split (../shared) written out through every door (tests/data_doors.py,
tests/wds_shards.py: the same JPEG bytes), then each source's training loader (`crop_flip` at
224 px, batch 32) timed over whole epochs, the sources in alternating order round after round;
the best epoch of each is reported as images/s per worker and as a ratio to the image folder
measured in the same run.

    python -m benchmarks.loader_throughput [--workers 1] [--rounds 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from data_doors import write_csv, write_hf_save_to_disk, write_jsonl, write_parquet  # noqa: E402
from wds_shards import serve_folder, write_image_folder_as_shards  # noqa: E402

from finetune.data import build_datasets, build_loader, set_epoch  # noqa: E402

HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic", "crop_pct": 0.875}


def doors(tmp: Path, url: str) -> dict:
    return {"imagefolder": ("imagefolder", str(HYMENOPTERA)),
            "csv": ("csv", str(write_csv(HYMENOPTERA, tmp / "csv" / "photos.csv"))),
            "jsonl": ("csv", str(write_jsonl(HYMENOPTERA, tmp / "jsonl" / "photos.jsonl"))),
            "hf save_to_disk": ("hf", str(write_hf_save_to_disk(HYMENOPTERA, tmp / "hf"))),
            "hf parquet": ("hf", str(write_parquet(HYMENOPTERA, tmp / "parquet"))),
            "webdataset local": ("webdataset", str(tmp / "wds")),
            "webdataset http": ("webdataset", url)}


def epoch_rate(dataset: str, root: str, workers: int, epoch: int) -> float:
    splits = build_datasets(dataset, root, img_size=224, data_config=IMAGENET, augment="crop_flip")
    loader = build_loader(splits.train, batch_size=32, train=True, workers=workers, seed=0)
    set_epoch(loader, epoch)
    start, images = time.perf_counter(), 0
    for batch, labels in loader:
        images += len(labels)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not HYMENOPTERA.is_dir():
        sys.exit(f"{HYMENOPTERA} is absent: this benchmark reads the real photos of ../shared")
    with tempfile.TemporaryDirectory() as tmp:
        write_image_folder_as_shards(HYMENOPTERA, Path(tmp) / "wds")
        with serve_folder(Path(tmp) / "wds") as url:
            sources = doors(Path(tmp), url)
            best = {name: 0.0 for name in sources}
            for round_ in range(args.rounds):
                order = list(sources) if round_ % 2 == 0 else list(reversed(sources))
                for name in order:
                    best[name] = max(best[name], epoch_rate(*sources[name], args.workers, round_ + 1))
    per_worker = max(args.workers, 1)
    print(f"| source | img/s ({args.workers} workers) | per worker | vs image folder |")
    print("| --- | --- | --- | --- |")
    for name, rate in best.items():
        print(f"| {name} | {rate:.1f} | {rate / per_worker:.1f} | {rate / best['imagefolder']:.2f} |")


if __name__ == "__main__":
    main()
