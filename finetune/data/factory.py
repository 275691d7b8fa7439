"""One factory over every source: `build_datasets(name, root, ...)` -> `DataSplits`.

Each source is one module of this package with a `build(request) -> DataSplits` function (timm's
`reader_factory` pattern); `SOURCES` maps the recipe's `data.dataset` name to it. A source that
needs an optional library imports it inside its module, so a plain run never pays for it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from ..errors import FinetuneError
from ..recipes import DATASETS
from .splits import DataSplits
from .transforms import build_transforms

# data.dataset -> the module (of this package) whose `build(request)` reads it
SOURCES = {
    "imagefolder": "imagefolder",
    "digits": "digits",
    "oxford_pets": "torchvision_sets",
    "cifar10": "torchvision_sets",
    "cifar100": "torchvision_sets",
    "flowers102": "torchvision_sets",
    "csv": "manifest",
    "hf": "hfds",
    "webdataset": "wds",
}


@dataclass(frozen=True)
class SourceOptions:
    """The recipe's per-source keys (`data.image_key` ...); None = the source's own default."""
    image_key: Optional[str] = None
    label_key: Optional[str] = None
    split_key: Optional[str] = None
    label_separator: str = " "
    class_names: Optional[Tuple[str, ...]] = None
    multilabel: bool = False  # task: multilabel: a sample's target is a float multi-hot vector


@dataclass(frozen=True)
class SourceRequest:
    """Everything a source's `build` needs; `transforms` is (train, eval)."""
    dataset: str
    root: Optional[str]
    transforms: Tuple[Callable, Callable]
    val_split: float
    test_split: float
    seed: int
    download: Optional[bool]
    options: SourceOptions


def build_datasets(
    dataset: str,
    root: Optional[str],
    *,
    img_size: int,
    data_config: dict,
    augment: str = "none",
    val_split: float = 0.1,
    test_split: float = 0.0,
    seed: int = 0,
    download: Optional[bool] = None,
    random_erasing: float = 0.0,
    options: Optional[SourceOptions] = None,
) -> DataSplits:
    """Train (augmented), val and test (eval transform) splits plus class names for `dataset`.

    `download=None` fetches torchvision datasets only when missing and online; `True` behaves the
    same (files already there are never fetched again); `False` never fetches. The offline
    environment (FINETUNE_OFFLINE=1 or HF_HUB_OFFLINE=1) always wins, so nothing can hang.
    """
    if dataset not in DATASETS:
        raise FinetuneError(f"dataset: unknown value {dataset!r}; expected one of {', '.join(DATASETS)}")
    transforms = (
        build_transforms(data_config, img_size, augment, train=True, random_erasing=random_erasing),
        build_transforms(data_config, img_size, augment, train=False),
    )
    request = SourceRequest(dataset, root, transforms, val_split, test_split, seed, download,
                            options or SourceOptions())
    if request.options.multilabel and dataset not in ("csv", "hf", "webdataset"):
        raise FinetuneError(f"task: multilabel needs a source with several labels per image (csv, hf or "
                            f"webdataset); data.dataset {dataset} has one label per image")
    return source_module(dataset).build(request)


def source_module(dataset: str):
    return importlib.import_module(f"{__package__}.{SOURCES[dataset]}")


def class_index(names: List[str]) -> dict:
    return {name: i for i, name in enumerate(names)}
