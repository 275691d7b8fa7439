"""`DataSplits`, the stratified cut of splits a source does not provide, and labels read without decoding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset

from ..errors import FinetuneError


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Optional[Dataset]
    class_names: List[str]



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



def seeded_split(count: int, val_split: float, test_split: float, seed: int):
    """Indices (train, val, test) of `count` multi-label samples, cut at random by `seed`.

    Stratifying by a label *set* is not defined (scikit-learn's `stratify` needs one label per
    sample), so a multi-label source is cut by a seeded permutation, with the same test-then-val
    rule and fractions as `_stratified_split`; the split is the same on every run with that seed.
    """
    _check_split_fractions(val_split, test_split)
    order = np.random.default_rng(seed).permutation(count)
    n_test, n_val = int(round(count * test_split)), max(1, int(round(count * val_split)))
    if count - n_test - n_val < 1:
        raise FinetuneError(f"cannot split {count} samples with val_split={val_split}, test_split={test_split}: "
                            "nothing would be left to train on; add samples or lower the fractions")
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist())
