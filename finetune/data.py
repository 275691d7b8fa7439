"""Datasets, transforms and loaders for fine-tuning.

`build_datasets` turns a dataset name (`imagefolder`, `oxford_pets`, `cifar10`, `cifar100`,
`flowers102`, `digits`) into `DataSplits(train, val, test, class_names)`; `build_loader` wraps one
split in a `DataLoader`. Images are normalised only with the model's own timm data config.

Splits that a source does not provide are cut with scikit-learn's stratified `train_test_split`
(`random_state=seed`), so the same files land in the same split on every run with the same seed:
test is cut first (`test_split` of everything), then val (`val_split` of everything) from the rest.
Splits a source does provide (folders `train/ val/ test/`, torchvision's official splits) are used
as they are, and `val_split`/`test_split` do not apply to them.

Unreadable images: an image-folder image that cannot be decoded is skipped, not fatal. The
dataset's `__getitem__` returns None for it and warns once naming the file; the collate function
used by `build_loader` drops None samples. A batch in which every sample was unreadable comes out
as `(torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long))`: skip batches with no labels.
The torchvision datasets are curated archives and are read without this safety net.
"""
from __future__ import annotations

import contextlib
import os
import random
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.datasets as tvd
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torch.utils.data import Sampler
from torch.utils.data.dataloader import default_collate

from .errors import FinetuneError
from .hubs import offline
from .recipes import AUGMENTS, DATASETS

# torchvision's list plus .gif: real folders (hymenoptera_data) hold the odd GIF, and PIL reads it.
IMAGE_EXTENSIONS = tuple(tvd.folder.IMG_EXTENSIONS) + (".gif",)
DEFAULT_ROOT = "data"
# timm's defaults for a data config that leaves these out.
DEFAULT_INTERPOLATION = "bicubic"
DEFAULT_CROP_PCT = 0.875
IMAGEFOLDER_LAYOUT = "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg, or <root>/<class>/*.jpg"


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Optional[Dataset]
    class_names: List[str]


# -------------------------------------------------------------------------------------- images
def load_image(path) -> Image.Image:
    """Decode `path` as an RGB image, or raise a one-line FinetuneError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FinetuneError(
            f"{path}: cannot read image ({type(e).__name__}: {e}); "
            f"expected a readable image file ({', '.join(IMAGE_EXTENSIONS)})"
        ) from None


_warned_unreadable: set = set()


def _warn_unreadable_once(error: FinetuneError, path: str) -> None:
    if path not in _warned_unreadable:
        _warned_unreadable.add(path)
        warnings.warn(f"skipping unreadable image: {error}", stacklevel=3)


# ---------------------------------------------------------------------------------- transforms
def build_transforms(data_config: dict, img_size: int, augment: str = "none", train: bool = False,
                     random_erasing: float = 0.0) -> Callable:
    """PIL image -> normalised float tensor (3, img_size, img_size), per the model's data config.
    For training, `random_erasing` adds timm's RandomErasing (per-pixel noise) with that probability."""
    transform = _transforms(data_config, img_size, augment, train)
    if train and random_erasing > 0:
        from timm.data.random_erasing import RandomErasing
        transform = T.Compose([transform, RandomErasing(probability=random_erasing, mode="pixel", device="cpu")])
    return transform


def _transforms(data_config: dict, img_size: int, augment: str, train: bool) -> Callable:
    if augment not in AUGMENTS:
        raise FinetuneError(f"augment: unknown value {augment!r}; expected one of {', '.join(AUGMENTS)}")
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size <= 0:
        raise FinetuneError(f"img_size: {img_size!r} is not a positive integer")
    mean, std, interpolation, crop_pct = _read_data_config(data_config)
    to_tensor = [T.ToTensor(), T.Normalize(mean, std)]
    eval_geometry = _eval_geometry(img_size, interpolation, crop_pct)
    if not train or augment == "none":
        return T.Compose(eval_geometry + to_tensor)
    if augment == "flip":
        return T.Compose(eval_geometry + [T.RandomHorizontalFlip()] + to_tensor)
    if augment == "affine":  # small shifts/rotations, no flip: for digits and text, where a mirror changes the class
        return T.Compose(eval_geometry + [T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1),
                                                         interpolation=T.InterpolationMode.BILINEAR)] + to_tensor)
    crop_flip = [T.RandomResizedCrop(img_size, scale=(0.6, 1.0), interpolation=interpolation), T.RandomHorizontalFlip()]
    if augment == "crop_flip":
        return T.Compose(crop_flip + to_tensor)
    return T.Compose(crop_flip + [T.RandAugment()] + to_tensor)


def _eval_geometry(img_size: int, interpolation: T.InterpolationMode, crop_pct: float) -> list:
    if crop_pct == 1.0:
        return [T.Resize((img_size, img_size), interpolation=interpolation)]
    return [T.Resize(int(img_size / crop_pct), interpolation=interpolation), T.CenterCrop(img_size)]


def _read_data_config(data_config: dict) -> Tuple[Sequence[float], Sequence[float], T.InterpolationMode, float]:
    if not isinstance(data_config, dict):
        raise FinetuneError(f"data_config: expected timm's data-config dict, got {type(data_config).__name__}")
    mean, std = (_three_floats(data_config, key) for key in ("mean", "std"))
    if any(s <= 0 for s in std):
        raise FinetuneError(f"data_config['std']: {std} has a value <= 0; every std must be positive")
    interpolation = _interpolation(data_config.get("interpolation", DEFAULT_INTERPOLATION))
    crop_pct = data_config.get("crop_pct", DEFAULT_CROP_PCT)
    if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise FinetuneError(f"data_config['crop_pct']: {crop_pct!r} must be a number in (0, 1], e.g. 0.875")
    return mean, std, interpolation, float(crop_pct)


def _three_floats(data_config: dict, key: str) -> Tuple[float, float, float]:
    if key not in data_config:
        raise FinetuneError(f"data_config: missing key {key!r}; expected 3 per-channel floats from the model's data config")
    value = data_config[key]
    try:
        floats = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        floats = ()
    if len(floats) != 3:
        raise FinetuneError(f"data_config[{key!r}]: {value!r} is not 3 per-channel numbers")
    return floats


def _interpolation(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name)
    except ValueError:
        valid = ", ".join(mode.value for mode in T.InterpolationMode)
        raise FinetuneError(f"data_config['interpolation']: unknown value {name!r}; expected one of {valid}") from None


# -------------------------------------------------------------------------------- image folders
class ImageFolderSkippingUnreadable(tvd.ImageFolder):
    """torchvision ImageFolder that ignores hidden files/dirs and yields None for undecodable images."""

    def __init__(self, root: str, transform: Optional[Callable] = None):
        try:
            super().__init__(root, transform=transform, is_valid_file=_visible_image_under(root))
        except FileNotFoundError as e:
            raise FinetuneError(f"{root}: {e}; expected {IMAGEFOLDER_LAYOUT}") from None

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FinetuneError(f"{directory}: no class folders found; expected {IMAGEFOLDER_LAYOUT}")
        return classes, {name: i for i, name in enumerate(classes)}

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = load_image(path)
        except FinetuneError as e:
            _warn_unreadable_once(e, path)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def _visible_image_under(root: str) -> Callable[[str], bool]:
    def is_visible_image(path: str) -> bool:
        relative = Path(path).relative_to(root)
        hidden = any(part.startswith(".") for part in relative.parts)
        return not hidden and relative.suffix.lower() in IMAGE_EXTENSIONS

    return is_visible_image


def _build_imagefolder(root, transforms: Tuple[Callable, Callable], val_split, test_split, seed) -> DataSplits:
    if root is None:
        raise FinetuneError(f"imagefolder: no root given; expected a folder laid out as {IMAGEFOLDER_LAYOUT}")
    root = Path(root)
    if not root.is_dir():
        raise FinetuneError(f"{root}: image folder not found; expected {IMAGEFOLDER_LAYOUT}")
    train_tf, eval_tf = transforms
    if (root / "train").is_dir() or (root / "val").is_dir():
        return _presplit_imagefolder(root, train_tf, eval_tf)
    train_all, eval_all = (ImageFolderSkippingUnreadable(str(root), tf) for tf in (train_tf, eval_tf))
    train_idx, val_idx, test_idx = _stratified_split(train_all.targets, val_split, test_split, seed, str(root))
    return DataSplits(
        train=Subset(train_all, train_idx),
        val=Subset(eval_all, val_idx),
        test=Subset(eval_all, test_idx) if test_idx else None,
        class_names=list(train_all.classes),
    )


def _presplit_imagefolder(root: Path, train_tf: Callable, eval_tf: Callable) -> DataSplits:
    for required in ("train", "val"):
        if not (root / required).is_dir():
            raise FinetuneError(f"{root / required}: folder missing; expected {IMAGEFOLDER_LAYOUT}")
    train = ImageFolderSkippingUnreadable(str(root / "train"), train_tf)
    val = ImageFolderSkippingUnreadable(str(root / "val"), eval_tf)
    test = ImageFolderSkippingUnreadable(str(root / "test"), eval_tf) if (root / "test").is_dir() else None
    for other in (val, test):
        if other is not None and other.classes != train.classes:
            raise FinetuneError(
                f"{other.root}: class folders {other.classes} differ from {train.root}: {train.classes}; "
                "every split needs the same class folders"
            )
    return DataSplits(train=train, val=val, test=test, class_names=list(train.classes))


# ------------------------------------------------------------------------------------ splitting
def _stratified_split(targets: Sequence[int], val_split: float, test_split: float, seed: int, source: str):
    """Indices (train, val, test) cut per class; test is empty when test_split is 0."""
    _check_split_fractions(val_split, test_split)
    indices = np.arange(len(targets))
    labels = np.asarray(targets)
    try:
        rest, test = _cut(indices, labels, test_split, seed)
        train, val = _cut(rest, labels[rest], val_split / (1.0 - test_split), seed)
    except ValueError as e:
        raise FinetuneError(
            f"{source}: cannot split {len(targets)} images stratified by class with val_split={val_split}, "
            f"test_split={test_split} ({e}); add images to the small classes or pre-split into train/ val/ folders"
        ) from None
    return train.tolist(), val.tolist(), test.tolist()


def _cut(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    if fraction == 0:
        return indices, indices[:0]
    from sklearn.model_selection import train_test_split  # scipy behind it: a second of start-up, so on use
    return train_test_split(indices, test_size=fraction, random_state=seed, stratify=labels)


def _check_split_fractions(val_split: float, test_split: float) -> None:
    for key, value in (("val_split", val_split), ("test_split", test_split)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FinetuneError(f"{key}: {value!r} is not a number; expected a fraction such as 0.1")
    if not 0 < val_split < 1:
        raise FinetuneError(f"val_split: {val_split!r} must be a fraction in (0, 1), e.g. 0.1")
    if not 0 <= test_split < 1:
        raise FinetuneError(f"test_split: {test_split!r} must be a fraction in [0, 1), e.g. 0.1 or 0")
    if val_split + test_split >= 1:
        raise FinetuneError(f"val_split + test_split = {val_split + test_split:g} leaves nothing to train on; keep it below 1")


# ----------------------------------------------------------------------------------------- digits
class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as RGB PIL images run through an image transform."""

    def __init__(self, transform: Optional[Callable] = None):
        from sklearn.datasets import load_digits
        digits = load_digits()
        # Pixel values are 0..16; stretch to 0..255 so they look like any other 8-bit image.
        self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        self.targets = [int(t) for t in digits.target]
        self.classes = [str(name) for name in digits.target_names]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _build_digits(transforms: Tuple[Callable, Callable], val_split, test_split, seed) -> DataSplits:
    train_all, eval_all = (DigitsDataset(tf) for tf in transforms)
    train_idx, val_idx, test_idx = _stratified_split(train_all.targets, val_split, test_split, seed, "digits")
    return DataSplits(
        train=Subset(train_all, train_idx),
        val=Subset(eval_all, val_idx),
        test=Subset(eval_all, test_idx) if test_idx else None,
        class_names=list(train_all.classes),
    )


# ------------------------------------------------------------------------- torchvision datasets
@dataclass(frozen=True)
class _TorchvisionSource:
    cls: type
    train_kwargs: Dict[str, Any]  # the split cut into train/val when val_kwargs is None
    val_kwargs: Optional[Dict[str, Any]]
    test_kwargs: Dict[str, Any]
    expected_files: str  # relative to root
    origin: str


_TORCHVISION_SOURCES = {
    "oxford_pets": _TorchvisionSource(
        tvd.OxfordIIITPet, {"split": "trainval"}, None, {"split": "test"},
        "oxford-iiit-pet/images/ and oxford-iiit-pet/annotations/",
        "torchvision OxfordIIITPet: images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/, extracted",
    ),
    "cifar10": _TorchvisionSource(
        tvd.CIFAR10, {"train": True}, None, {"train": False},
        "cifar-10-batches-py/",
        "torchvision CIFAR10: cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted",
    ),
    "cifar100": _TorchvisionSource(
        tvd.CIFAR100, {"train": True}, None, {"train": False},
        "cifar-100-python/",
        "torchvision CIFAR100: cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted",
    ),
    "flowers102": _TorchvisionSource(
        tvd.Flowers102, {"split": "train"}, {"split": "val"}, {"split": "test"},
        "flowers-102/jpg/, flowers-102/imagelabels.mat and flowers-102/setid.mat",
        "torchvision Flowers102: 102flowers.tgz, imagelabels.mat, setid.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
    ),
}


def _build_torchvision(name, root, transforms, val_split, seed, download) -> DataSplits:
    source = _TORCHVISION_SOURCES[name]
    root = str(root if root is not None else DEFAULT_ROOT)
    train_tf, eval_tf = transforms

    def open_split(kwargs: Dict[str, Any], transform: Callable) -> Dataset:
        return _open_torchvision(name, source, root, kwargs, transform, download)

    test = open_split(source.test_kwargs, eval_tf)
    class_names = [str(c) for c in test.classes]
    if source.val_kwargs is not None:
        train, val = open_split(source.train_kwargs, train_tf), open_split(source.val_kwargs, eval_tf)
        return DataSplits(train=train, val=val, test=test, class_names=class_names)
    train_all, eval_all = open_split(source.train_kwargs, train_tf), open_split(source.train_kwargs, eval_tf)
    train_idx, val_idx, _ = _stratified_split(dataset_targets(train_all), val_split, 0.0, seed, f"{name} under {root}")
    return DataSplits(train=Subset(train_all, train_idx), val=Subset(eval_all, val_idx), test=test, class_names=class_names)


def _open_torchvision(name, source: _TorchvisionSource, root: str, kwargs, transform, download) -> Dataset:
    try:
        return source.cls(root, transform=transform, download=False, **kwargs)
    except RuntimeError:
        pass  # not there (torchvision says so with a RuntimeError); maybe fetch it below
    place_hint = f"place the files at {os.path.join(root, source.expected_files)} (see {source.origin})"
    if download is False:
        raise FinetuneError(f"{name}: not found under {root} and download is off: {place_hint}")
    if offline():
        raise FinetuneError(f"{name}: not found under {root} and cannot download (offline): {place_hint}")
    try:
        return source.cls(root, transform=transform, download=True, **kwargs)
    # URLError, timeouts and refused connections are OSErrors; a truncated download fails its
    # checksum with a RuntimeError.
    except (OSError, RuntimeError) as e:
        raise FinetuneError(_torchvision_download_error(name, source, root, e, place_hint)) from None


def _torchvision_urls(cls: type) -> List[str]:
    """The URLs torchvision's download code fetches for dataset class `cls` (best effort, for messages)."""
    if getattr(cls, "_RESOURCES", None):  # OxfordIIITPet: ((url, md5), ...)
        return [r[0] for r in cls._RESOURCES]
    if getattr(cls, "_file_dict", None) and getattr(cls, "_download_url_prefix", None):  # Flowers102
        return [cls._download_url_prefix + f[0] for f in cls._file_dict.values()]
    return [cls.url] if isinstance(getattr(cls, "url", None), str) else []  # CIFAR


def _torchvision_download_error(name: str, source: _TorchvisionSource, root: str, e: BaseException,
                                place_hint: str) -> str:
    """One line: the dataset, the URL that failed, why, and what to do."""
    import socket
    import urllib.error
    urls = _torchvision_urls(source.cls)
    url = getattr(e, "url", None) or getattr(e, "filename", None) if isinstance(e, urllib.error.HTTPError) else None
    url = url or (urls[0] if len(urls) == 1 else " / ".join(urls) or "its download URL")
    reason = getattr(e, "reason", None)
    if isinstance(e, urllib.error.HTTPError):
        what = f"HTTP {e.code} {e.reason}"
        todo = {403: "access denied: download it in a browser", 404: "the file moved: check the dataset's page"}.get(
            e.code, "try again later")
    elif isinstance(reason, socket.gaierror):
        what = f"cannot resolve host {urllib.parse.urlsplit(url).hostname} ({reason.strerror or reason})"
        todo = "check the network, DNS or the proxy (HTTPS_PROXY / HTTP_PROXY)"
    elif isinstance(e, RuntimeError):
        what = f"the downloaded file failed torchvision's checksum ({e})"
        todo = f"the download was cut or the file changed: delete the archives under {root} and try again"
    else:
        what = f"{type(e).__name__}: {reason if reason is not None else e}"
        todo = "check the network and try again"
    return f"{name}: not found under {root} and the download of {url} failed: {what}; {todo}, or {place_hint}"


# ------------------------------------------------------------------------------------ datasets
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
    if dataset == "imagefolder":
        return _build_imagefolder(root, transforms, val_split, test_split, seed)
    if dataset == "digits":
        return _build_digits(transforms, val_split, test_split, seed)
    return _build_torchvision(dataset, root, transforms, val_split, seed, download)


def dataset_targets(dataset) -> List[int]:
    """Every sample's class index, read from label attributes without decoding any image."""
    if isinstance(dataset, Subset):
        labels = dataset_targets(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        return [label for part in dataset.datasets for label in dataset_targets(part)]
    for attribute in ("targets", "_labels"):
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            return [int(label) for label in labels]
    raise FinetuneError(
        f"{type(dataset).__name__}: cannot read labels without decoding images; "
        "expected a `targets` list (as torchvision's ImageFolder has) or a Subset of such a dataset"
    )


# ------------------------------------------------------------------------------------- loaders
def collate_skipping_unreadable(batch: list):
    """default_collate over the readable samples (None marks an unreadable image)."""
    readable = [sample for sample in batch if sample is not None]
    if not readable:
        return torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long)
    return default_collate(readable)


def build_loader(
    dataset,
    *,
    batch_size: int,
    train: bool,
    balanced: bool = False,
    workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
) -> DataLoader:
    """A DataLoader over `dataset`: seeded shuffled batches for training, fixed order for evaluation.

    `batch_size` is the global batch: with `distributed` (torch.distributed initialised), each of
    the N processes loads `batch_size // N` samples of every global batch (see `EpochBatches`).
    `balanced` draws training samples with probability 1/(size of their class), with replacement,
    `len(dataset)` per epoch; it is ignored when `train` is False, because evaluation must see every
    sample exactly once. For training call `set_epoch(loader, epoch)` every epoch.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise FinetuneError(f"batch_size: {batch_size!r} is not a positive integer")
    if not isinstance(workers, int) or workers < 0:
        raise FinetuneError(f"workers: {workers!r} must be an integer >= 0")
    rank, world_size = _process_group() if distributed else (0, 1)
    if batch_size % world_size:
        raise FinetuneError(f"batch_size: {batch_size} is not divisible by the {world_size} processes")
    common = dict(num_workers=workers, collate_fn=collate_skipping_unreadable, pin_memory=torch.cuda.is_available(),
                  persistent_workers=workers > 0,
                  # Its own generator: creating worker iterators never draws from the global RNG,
                  # so a resumed run's dropout and drop-path draws match an uninterrupted run's.
                  generator=torch.Generator().manual_seed(seed))
    if not train:
        return DataLoader(dataset, batch_size=batch_size // world_size,
                          sampler=ShardSampler(len(dataset), rank, world_size), **common)
    batches = EpochBatches(dataset, balanced=balanced, seed=seed, global_batch=batch_size, rank=rank,
                           world_size=world_size)
    return DataLoader(SeededSamples(dataset), batch_sampler=batches, **common)


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Point a training loader at `epoch`'s batches, leaving out the first `skip_batches` (resume)."""
    loader.batch_sampler.set_epoch(epoch, skip_batches)


class EpochBatches(Sampler):
    """Training batches: the same global batches on 1 or N processes, fixed by (seed, epoch).

    The order is a permutation (or, `balanced`, a class-balanced draw with replacement) seeded by
    seed + epoch, cut into global batches; process r takes slice r of every batch. So N processes
    with batch B/N see exactly the samples one process with batch B sees (DDP then averages the
    same gradient), and a run resumed at epoch e, batch k sees what an uninterrupted run would have.

    Every process yields the same number of batches, so their collectives line up: the last,
    partial global batch is dealt out round-robin, and dropped when it holds fewer images than
    there are processes (as DistributedSampler's drop_last would; at most N-1 images an epoch).

    Each item is (index, sample seed): the seed is a function of (seed, epoch, position in the
    epoch), and `SeededSamples` augments with it, so augmentation does not depend on workers,
    processes or restarts.
    """

    def __init__(self, dataset, *, balanced: bool, seed: int, global_batch: int, rank: int = 0, world_size: int = 1):
        self.n = len(dataset)
        self.seed, self.epoch, self.skip = seed, 0, 0
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.weights = _balanced_weights(dataset) if balanced else None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def global_order(self) -> List[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=generator).tolist()
        return torch.randperm(self.n, generator=generator).tolist()

    def local_batches(self) -> List[List[Tuple[int, int]]]:
        order = self.global_order()
        per_process = self.global_batch // self.world_size
        batches = []
        for start in range(0, len(order), self.global_batch):
            batch = [(index, sample_seed(self.seed, self.epoch, start + i))
                     for i, index in enumerate(order[start:start + self.global_batch])]
            if len(batch) == self.global_batch:
                batches.append(batch[self.rank * per_process:(self.rank + 1) * per_process])
            elif len(batch) >= self.world_size:
                batches.append(batch[self.rank::self.world_size])
        return batches[self.skip:]

    def __iter__(self):
        return iter(self.local_batches())

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return max(0, full + (rest >= self.world_size if rest else 0) - self.skip)


class ShardSampler(Sampler):
    """Evaluation order 0..n-1, dealt round-robin across processes without padding."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class SeededSamples(Dataset):
    """`dataset[index]` with torch, numpy and python's RNGs seeded by the item's sample seed, so the
    random augmentation of a sample depends on that seed alone; the caller's RNG states are restored.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        with _rng_seeded(seed):
            return self.dataset[index]


@contextlib.contextmanager
def _rng_seeded(seed: int):
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _process_group() -> Tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _balanced_weights(dataset) -> torch.Tensor:
    targets = torch.as_tensor(dataset_targets(dataset), dtype=torch.long)
    if len(targets) == 0:
        raise FinetuneError("balanced: the training set is empty; there is nothing to sample")
    class_counts = torch.bincount(targets)
    return 1.0 / class_counts[targets].double()
