"""One folder of photos written out as each door (data source) finetune reads, for tests and benchmarks.

`source` is an image folder (`<folder>/train/<class>/*.jpg` and `<folder>/val/...`, or
`<folder>/<class>/*.jpg` with no split) or a list of `Photo`s (several labels each, for
multi-label sets); the HF writers also take the `hf_dataset(...)` of one, to convert it once. Every writer keeps the image folder's order (train, val, test, then the
samples as torchvision's ImageFolder lists them: sorted classes, sorted files), so a source that
cuts splits itself cuts the same rows. `Photo.name` is the image's path relative to the folder
(`train/ants/0013035.jpg`); an HF image cell stores the file's base name as its `path`, as the
library's own `save_to_disk` keeps it (`Image.embed_storage`), so tests match samples across
doors by file name.

    write_csv(source, out) / write_tsv     a manifest, image paths relative to its folder
    write_jsonl(source, out)               a JSON Lines manifest, absolute image paths
    write_hf_save_to_disk(source, out)     DatasetDict.save_to_disk (a Dataset when there are no splits)
    write_parquet(source, out)             out/data/<split>-00000-of-00001.parquet, the hub's layout
    write_hf_hub_cache(source, hf_home, repo_id)     what `load_dataset(repo_id)` online leaves in HF_HOME
    write_hf_hub_snapshot(source, hf_home, repo_id)  what `hf download --repo-type dataset` leaves

The HF writers store the image file's own bytes (no re-encoding) in an `Image` feature, with a
`ClassLabel` (multi-label: a `Sequence(ClassLabel)`) of the sorted class names.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

SPLITS = ("train", "val", "test")
HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}  # the library's own names
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


@dataclass(frozen=True)
class Photo:
    path: Path  # the file
    name: str  # its identity across doors: the path relative to the folder, e.g. train/ants/1.jpg
    labels: Tuple[str, ...]
    split: Optional[str]  # train, val, test; None when the folder has no split


Source = Union[str, os.PathLike, Sequence[Photo]]


def photos_of(source: Source) -> List[Photo]:
    """The images of an image folder in finetune's own (torchvision ImageFolder) order, or `source` as given."""
    if not isinstance(source, (str, os.PathLike)):
        return list(source)
    from finetune.data import ImageFolderSkippingUnreadable
    folder = Path(source)
    splits = [split for split in SPLITS if (folder / split).is_dir()] or [None]
    photos = []
    for split in splits:
        listing = ImageFolderSkippingUnreadable(str(folder / split) if split else str(folder))
        for path, target in listing.samples:
            name = Path(path).relative_to(folder).as_posix()
            photos.append(Photo(Path(path), name, (listing.classes[target],), split))
    return photos


def class_names_of(photos: Sequence[Photo]) -> List[str]:
    return sorted({label for photo in photos for label in photo.labels})


def has_splits(photos: Sequence[Photo]) -> bool:
    return any(photo.split for photo in photos)


# ----------------------------------------------------------------------------------- manifests
def write_csv(source: Source, out, *, delimiter: str = ",", separator: str = " ", label_key: str = "label") -> Path:
    """A manifest with image (relative to the manifest's folder), label (several: joined by `separator`), split."""
    photos, out = photos_of(source), _ready(out)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["image", label_key] + (["split"] if has_splits(photos) else []))
        for photo in photos:
            image = os.path.relpath(photo.path, out.parent)
            writer.writerow([image, separator.join(photo.labels)] + ([photo.split] if photo.split else []))
    return out


def write_tsv(source: Source, out, **kwargs) -> Path:
    return write_csv(source, out, delimiter="\t", **kwargs)


def write_jsonl(source: Source, out, *, label_key: str = "label", multilabel: bool = False) -> Path:
    """A JSON Lines manifest: absolute image paths; a label name, or (multilabel) a list of names."""
    photos, out = photos_of(source), _ready(out)
    with open(out, "w", encoding="utf-8") as f:
        for photo in photos:
            record = {"image": str(Path(photo.path).resolve()),
                      label_key: list(photo.labels) if multilabel else photo.labels[0]}
            if photo.split:
                record["split"] = photo.split
            f.write(json.dumps(record) + "\n")
    return out


# ------------------------------------------------------------------------------ Hugging Face
def hf_dataset(source: Source, *, multilabel: bool = False, label_key: Optional[str] = None):
    """A DatasetDict (train, validation, test as present), or one Dataset when the photos have no split.
    A Dataset or DatasetDict given as `source` is returned as it is, so one conversion serves every HF writer."""
    import datasets
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return source
    photos = photos_of(source)
    names = class_names_of(photos)
    label_key = label_key or ("labels" if multilabel else "label")
    label = datasets.ClassLabel(names=names)
    features = datasets.Features({"image": datasets.Image(),
                                  label_key: datasets.Sequence(label) if multilabel else label})

    def table(members: List[Photo]):
        return datasets.Dataset.from_dict({
            "image": [{"bytes": photo.path.read_bytes(), "path": photo.path.name} for photo in members],
            label_key: [[names.index(l) for l in photo.labels] if multilabel else names.index(photo.labels[0])
                        for photo in members],
        }, features=features)

    if not has_splits(photos):
        return table(photos)
    return datasets.DatasetDict({HF_SPLIT_NAMES[split]: table([p for p in photos if p.split == split])
                                 for split in SPLITS if any(p.split == split for p in photos)})


def write_hf_save_to_disk(source: Source, out, **kwargs) -> Path:
    out = Path(out)
    hf_dataset(source, **kwargs).save_to_disk(str(out))
    return out


def write_parquet(source: Source, out, **kwargs) -> Path:
    """out/data/<split>-00000-of-00001.parquet, as the hub stores a dataset (one train file without splits)."""
    import datasets
    out = Path(out)
    dataset = hf_dataset(source, **kwargs)
    parts = dataset if isinstance(dataset, datasets.DatasetDict) else {"train": dataset}
    for split, part in parts.items():
        _ready(out / "data" / f"{split}-00000-of-00001.parquet")
        part.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    return out


def write_hf_hub_snapshot(source: Source, hf_home, repo_id: str, **kwargs) -> Path:
    """The repo's files as huggingface_hub caches them: hub/datasets--org--name/{refs/main, snapshots/<rev>/}."""
    repo_dir = Path(hf_home) / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    snapshot = write_parquet(source, repo_dir / "snapshots" / HUB_REVISION, **kwargs)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(HUB_REVISION)
    return snapshot


def write_hf_hub_cache(source: Source, hf_home, repo_id: str, **kwargs) -> str:
    """What an online `load_dataset(repo_id)` of a parquet repo leaves in HF_HOME, so that offline
    (HF_HUB_OFFLINE=1) `load_dataset(repo_id)` finds it: the hub snapshot of the repo's files, and the
    arrow copy the library prepared from them in datasets/org___name/default/0.0.0/<commit>/.

    Offline, datasets never opens the hub snapshot: it reads the prepared copy (its
    `CachedDatasetModuleFactory`). That copy is written here by the library's own parquet builder,
    configured as `HubDatasetModuleFactory` configures it for the repo (repo_id, dataset name,
    config `default`, the commit as hash); only its data files are the snapshot's local files
    instead of the hf:// URLs that resolve to them.
    """
    from datasets.data_files import DataFilesDict, DataFilesList
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet
    snapshot = write_hf_hub_snapshot(source, hf_home, repo_id, **kwargs)
    files = sorted((snapshot / "data").glob("*.parquet"))
    builder = Parquet(cache_dir=str(Path(hf_home) / "datasets"), repo_id=repo_id,
                      dataset_name=camelcase_to_snakecase(repo_id.split("/")[-1]),
                      config_name="default", config_id="default", hash=HUB_REVISION)
    builder.config.data_files = DataFilesDict({
        file.name.split("-")[0]: DataFilesList([str(file)], [()]) for file in files})
    builder.download_and_prepare()
    return repo_id


def _ready(out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
