"""Train and eval transforms built from the model's own timm data config."""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torchvision.transforms as T

from ..errors import FinetuneError
from ..recipes import AUGMENTS

# timm's defaults for a data config that leaves these out.
DEFAULT_INTERPOLATION = "bicubic"
DEFAULT_CROP_PCT = 0.875


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

