"""`oxford_pets`, `cifar10`, `cifar100`, `flowers102`: torchvision's datasets, fetched when missing and online."""
from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torchvision.datasets as tvd
from torch.utils.data import Dataset, Subset

from ..errors import FinetuneError
from ..hubs import offline
from .splits import DataSplits, _stratified_split, dataset_targets

DEFAULT_ROOT = "data"


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


def build(request) -> DataSplits:
    return _build_torchvision(request.dataset, request.root, request.transforms, request.val_split, request.seed,
                              request.download)


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

