"""Datasets, transforms and loaders for fine-tuning: one module per source behind one factory.

`build_datasets` (factory.py) turns a `data.dataset` name into `DataSplits(train, val, test,
class_names)`: `imagefolder`, `csv` (CSV/TSV/JSONL manifests), `hf` (Hugging Face datasets),
`webdataset` (tar shards, streamed), `oxford_pets`, `cifar10`, `cifar100`, `flowers102`, `digits`.
`build_loader` (loaders.py) wraps one split in a `DataLoader`. Images are normalised only with the
model's own timm data config (transforms.py).

Splits that a source does not provide are cut with scikit-learn's stratified `train_test_split`
(`random_state=seed`), so the same files land in the same split on every run with the same seed:
test is cut first (`test_split` of everything), then val (`val_split` of everything) from the rest.
Splits a source does provide (folders `train/ val/ test/`, a split column, torchvision's official
splits) are used as they are, and `val_split`/`test_split` do not apply to them.

Unreadable images: an image that cannot be decoded is skipped, not fatal. The dataset's
`__getitem__` returns None for it and warns once naming the file; the collate function used by
`build_loader` drops None samples. A batch in which every sample was unreadable comes out as
`(torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long))`: skip batches with no labels.
The torchvision datasets are curated archives and are read without this safety net.
"""
from .digits import DigitsDataset
from .factory import SOURCES, SourceOptions, SourceRequest, build_datasets
from .imagefolder import IMAGEFOLDER_LAYOUT, ImageFolderSkippingUnreadable
from .images import IMAGE_EXTENSIONS, load_image
from .loaders import (EpochBatches, SeededSamples, ShardSampler, build_loader, collate_skipping_unreadable,
                      sample_seed, set_epoch)
from .splits import DataSplits, dataset_targets
from .transforms import DEFAULT_CROP_PCT, DEFAULT_INTERPOLATION, build_transforms

__all__ = [
    "DataSplits", "DigitsDataset", "EpochBatches", "IMAGEFOLDER_LAYOUT", "IMAGE_EXTENSIONS",
    "ImageFolderSkippingUnreadable", "SOURCES", "SeededSamples", "ShardSampler", "SourceOptions",
    "SourceRequest", "DEFAULT_CROP_PCT", "DEFAULT_INTERPOLATION", "build_datasets", "build_loader",
    "build_transforms", "collate_skipping_unreadable", "dataset_targets", "load_image", "sample_seed",
    "set_epoch",
]
