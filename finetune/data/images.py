"""Decoding one image file, with the one-line error and the warn-once skip of an unreadable file."""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torchvision.datasets as tvd
from PIL import Image

from ..errors import FinetuneError

# torchvision's list plus .gif: real folders (hymenoptera_data) hold the odd GIF, and PIL reads it.
IMAGE_EXTENSIONS = tuple(tvd.folder.IMG_EXTENSIONS) + (".gif",)


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



def load_transformed(path, transform: Optional[Callable]):
    """`transform(load_image(path))`, or None (and one warning naming the file) when it cannot be decoded:
    the unreadable-image rule every file-reading source shares."""
    try:
        image = load_image(path)
    except FinetuneError as e:
        _warn_unreadable_once(e, str(path))
        return None
    return transform(image) if transform is not None else image
