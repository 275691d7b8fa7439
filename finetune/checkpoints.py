"""Checkpoint files: safetensors weights plus JSON metadata, written atomically.

A checkpoint is one `.safetensors` file. Its header metadata holds a single key, `finetune`,
whose value is JSON with everything needed to rebuild and use the model without the recipe:

    format        "finetune.checkpoint/1"
    arch          how to build the network (see `finetune.loading.build_model`)
    num_classes   size of the classification head
    class_names   list of names, index = class id (or null)
    img_size      training resolution
    data_config   mean, std, interpolation, crop_pct, input_size
    source        the ref the weights came from ("ppv:B_16_imagenet1k", a path, ...)
    epoch, metrics, recipe   training provenance (null outside training)
    temperature, calibration   optional: the fitted softmax temperature (`finetune calibrate`)
    thresholds                 optional, multi-label: per-class thresholds fitted with the temperature

Files from elsewhere (`.pth`, `.bin`) are read as data only, with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import FinetuneError

FORMAT = "finetune.checkpoint/1"
META_KEY = "finetune"

StateDict = Dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------- writing
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` and move the result to `path` only once it is complete on disk.

    The temporary file lives in the destination directory (so the final rename is atomic on one
    filesystem) and is fsync'ed before the rename; a crash or an exception at any point leaves any
    previous file at `path` untouched and no stray temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def refuse_to_overwrite(path: str | os.PathLike, force: bool) -> Path:
    """`path`, unless a file is already there and `force` is off (outputs are never clobbered)."""
    path = Path(path)
    if path.is_dir():
        raise FinetuneError(f"{path}: is a folder; give a file name for the output")
    if path.exists() and not force:
        raise FinetuneError(f"{path}: already exists; pass --force to replace it, or choose another output")
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(path: str | os.PathLike, tensors: StateDict, meta: Dict[str, Any]) -> Path:
    """Write `tensors` with `meta` to a safetensors file, atomically."""
    meta = {"format": FORMAT, **meta}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {META_KEY: json.dumps(meta, default=_json_default)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint metadata")


def model_meta(model: torch.nn.Module) -> Dict[str, Any]:
    """The metadata a model built by `finetune.load_model` carries (arch, classes, data config...),
    less its calibration (`temperature`, multi-label `thresholds`): that was fitted to the weights it
    came with, which a save may change."""
    info = getattr(model, "finetune_info", None)
    if info is None:
        raise FinetuneError(
            f"{type(model).__name__} has no finetune metadata; build models with finetune.load_model "
            "so checkpoints know their architecture")
    return {k: v for k, v in info.items() if k not in ("temperature", "thresholds")}


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, epoch: Optional[int] = None,
                    metrics: Optional[Dict[str, Any]] = None, recipe: Optional[Dict[str, Any]] = None,
                    state: Optional[StateDict] = None, **extra: Any) -> Path:
    """Save `model` (built by `finetune.load_model`) with its metadata and training provenance;
    `state` replaces its own state dict (e.g. LoRA-merged weights)."""
    meta = model_meta(model)
    meta.update(epoch=epoch, metrics=metrics or {}, recipe=recipe, **extra)
    if state is None:
        state = getattr(model, "module", model).state_dict()
    return write_checkpoint(path, state, meta)


# ---------------------------------------------------------------------------------------- reading
def read_meta(path: str | os.PathLike) -> Dict[str, Any]:
    """The finetune metadata of a checkpoint ({} for a safetensors file written elsewhere)."""
    with _open_safetensors(path) as f:
        return _parse_meta(path, f.metadata())


def read_checkpoint(path: str | os.PathLike) -> Tuple[StateDict, Dict[str, Any]]:
    """All tensors and the finetune metadata ({} if absent) of a safetensors file."""
    with _open_safetensors(path) as f:
        meta = _parse_meta(path, f.metadata())
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise FinetuneError(f"{path}: cannot read tensors ({_first_line(e)}); the file is truncated "
                                "or corrupt, re-save or re-download it") from e
    return tensors, meta


def tensor_shapes(path: str | os.PathLike) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{name: (shape, dtype)} read from the header only."""
    with _open_safetensors(path) as f:
        out = {}
        for k in f.keys():
            sl = f.get_slice(k)
            out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        return out


def refuse_onnx(path: str | os.PathLike) -> None:
    """A one-line error for an .onnx export given where a checkpoint (or recipe) is needed."""
    if Path(path).suffix.lower() == ".onnx":
        raise FinetuneError(f"{path}: is an ONNX export (finetune export --to onnx), not a checkpoint; only finetune "
                            "eval and predict read it: give the .safetensors checkpoint it was exported from")


@contextlib.contextmanager
def _open_safetensors(path: str | os.PathLike):
    path = Path(path)
    refuse_onnx(path)
    if not path.is_file():
        raise FinetuneError(f"{path}: no such checkpoint file")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FinetuneError(f"{path}: not a readable safetensors file ({_first_line(e)}); it is truncated or "
                            "corrupt, re-save or re-download it") from e
    with handle as f:
        yield f


def _parse_meta(path, header: Optional[Dict[str, str]]) -> Dict[str, Any]:
    if not header or META_KEY not in header:
        return {}
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{path}: checkpoint metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise FinetuneError(f"{path}: checkpoint metadata is a JSON {type(meta).__name__}; expected an object "
                            "with arch, num_classes, img_size, ...")
    if meta.get("arch") is not None:
        _check_model_fields(path, meta)
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number_triple(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) in (1, 3)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


# The fields a model is rebuilt from, and what each must be; a stranger's file is data, so every
# one is checked before it reaches timm.
_MODEL_FIELDS = {
    "arch": ('an object {"timm_name": NAME} and/or {"kwargs": {...}}',
             lambda v: isinstance(v, dict) and (isinstance(v.get("timm_name"), str) or isinstance(v.get("kwargs"), dict))
             and isinstance(v.get("kwargs", {}), dict) and isinstance(v.get("timm_name", ""), str)),
    "num_classes": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "img_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "class_names": ("null or a list of strings", lambda v: v is None or (isinstance(v, list)
                                                                        and all(isinstance(n, str) for n in v))),
    "data_config": ("an object with mean and std (3 numbers each)",
                    lambda v: isinstance(v, dict) and _is_number_triple(v.get("mean")) and _is_number_triple(v.get("std"))
                    and isinstance(v.get("interpolation", "bicubic"), str)
                    and isinstance(v.get("crop_pct", 1.0), (int, float)) and not isinstance(v.get("crop_pct"), bool)),
    "temperature": ("absent or a finite number > 0 (finetune calibrate writes it)",
                    lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v) and v > 0)),
    "thresholds": ("absent or a list of numbers in [0, 1], one per class (finetune calibrate writes it)",
                   lambda v: v is None or (isinstance(v, list) and all(
                       isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in v))),
}


def _check_model_fields(path, meta: Dict[str, Any]) -> None:
    for name, (allowed, accepts) in _MODEL_FIELDS.items():
        if not accepts(meta.get(name)):
            raise FinetuneError(f"{path}: checkpoint metadata field {name!r} is {json.dumps(meta.get(name))[:80]}; "
                                f"expected {allowed}")
    if meta.get("thresholds") is not None and len(meta["thresholds"]) != meta["num_classes"]:
        raise FinetuneError(f"{path}: checkpoint metadata lists {len(meta['thresholds'])} thresholds for num_classes "
                            f"{meta['num_classes']}")
    names = meta.get("class_names")
    if names is not None and len(names) != meta["num_classes"]:
        raise FinetuneError(f"{path}: checkpoint metadata lists {len(names)} class_names for num_classes "
                            f"{meta['num_classes']}")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read 1 MiB at a time (soups record their ingredients' by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_torch_file(path: str | os.PathLike) -> StateDict:
    """Read a `.pth`/`.bin` state dict as data: tensors only, never code.

    `weights_only=True` makes the unpickler refuse anything but tensors and plain containers, so a
    pickle carrying code fails here without running it.
    """
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FinetuneError(
            f"{path}: refused: the pickle holds code or objects other than tensors ({_first_line(e)}); "
            "finetune reads checkpoints as data only — convert it to .safetensors where you trust it") from e
    except Exception as e:  # noqa: BLE001 — torch.load raises many types for a damaged file
        raise FinetuneError(f"{path}: not a readable PyTorch file ({_first_line(e)}); it is truncated or "
                            "corrupt") from e
    return _unwrap_state_dict(path, obj)


def _unwrap_state_dict(path, obj: Any) -> StateDict:
    # Training scripts commonly nest the weights: {"model": sd}, {"state_dict": sd}, {"module.x": ...}.
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FinetuneError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_state_dict(path: str | os.PathLike) -> Tuple[StateDict, Dict[str, Any]]:
    """Tensors and finetune metadata from a `.safetensors`, `.pth`, `.pt` or `.bin` file."""
    path = Path(path)
    refuse_onnx(path)
    if path.suffix == ".safetensors":
        return read_checkpoint(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return load_torch_file(path), {}
    raise FinetuneError(f"{path}: unknown checkpoint extension {path.suffix!r}; expected .safetensors, "
                        ".pth, .pt or .bin")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
