"""`imagefolder`: one folder per class, optionally under train/ val/ test/."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torchvision.datasets as tvd
from torch.utils.data import Subset

from ..errors import FinetuneError
from .images import IMAGE_EXTENSIONS, load_transformed
from .splits import DataSplits, _stratified_split

IMAGEFOLDER_LAYOUT = "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg, or <root>/<class>/*.jpg"


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
        image = load_transformed(path, self.transform)
        return None if image is None else (image, target)


def _visible_image_under(root: str) -> Callable[[str], bool]:
    def is_visible_image(path: str) -> bool:
        relative = Path(path).relative_to(root)
        hidden = any(part.startswith(".") for part in relative.parts)
        return not hidden and relative.suffix.lower() in IMAGE_EXTENSIONS

    return is_visible_image


def build(request) -> DataSplits:
    return _build_imagefolder(request.root, request.transforms, request.val_split, request.test_split, request.seed)


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

