"""`digits`: scikit-learn's 8x8 digits, the offline smoke-test source."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from .splits import DataSplits, _stratified_split


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


def build(request) -> DataSplits:
    return _build_digits(request.transforms, request.val_split, request.test_split, request.seed)


def _build_digits(transforms: Tuple[Callable, Callable], val_split, test_split, seed) -> DataSplits:
    train_all, eval_all = (DigitsDataset(tf) for tf in transforms)
    train_idx, val_idx, test_idx = _stratified_split(train_all.targets, val_split, test_split, seed, "digits")
    return DataSplits(
        train=Subset(train_all, train_idx),
        val=Subset(eval_all, val_idx),
        test=Subset(eval_all, test_idx) if test_idx else None,
        class_names=list(train_all.classes),
    )


