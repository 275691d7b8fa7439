"""Load ViT weights from every hub people use into one model: timm's `VisionTransformer`.

    model = finetune.load_model("B_16", num_classes=37, img_size=384)

A *ref* names the weights:

    B_16, B_32, L_16, L_32, Ti_16, S_16    zoo names (ZOO below): a default source plus alternatives
    ppv:B_16_imagenet1k                    pytorch-pretrained-vit release files (torch hub cache)
    timm:vit_base_patch16_384.augreg_in21k_ft_in1k   any timm pretrained tag (Hugging Face cache)
    hf:google/vit-base-patch16-384         transformers ViT checkpoints (Hugging Face cache)
    npz:PATH                               Google's original .npz (or imagenet21k[+imagenet2012]/NAME.npz)
    PATH.safetensors / .pth / .bin         our checkpoints, or a plain state dict of a known layout
    scratch:patch_size=4,embed_dim=128,... an untrained ViT with these timm VisionTransformer kwargs

Every source is reduced to a `Pretrained` (timm-layout state dict + architecture + data config),
and one function, `model_from_pretrained`, builds the model from it: resample the position
embedding to `img_size` (2-D bicubic), and replace the head with a zero-initialised Linear when
`num_classes` differs (the ViT paper's fine-tuning practice).
"""
from __future__ import annotations

import difflib
import zipfile
import pickle
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from . import convert, download, hubs
from .checkpoints import StateDict, read_state_dict, refuse_onnx
from .errors import FinetuneError

GOOGLE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# What timm.create_model(pretrained=True) raises when weights cannot be fetched or read: network and
# cache errors (huggingface_hub's are OSErrors, except EntryNotFoundError), corrupt files, wrong layouts.
_TIMM_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, AssertionError, pickle.UnpicklingError,
                     SafetensorError, EntryNotFoundError)


@dataclass
class Pretrained:
    """Weights in timm layout, and everything needed to rebuild and feed the network."""
    state_dict: StateDict
    arch: Dict[str, Any]            # {"timm_name": ...} and/or {"kwargs": {...}}, see build_model
    num_classes: int                # size of the stored head (0: none)
    img_size: int                   # native resolution of the stored position embedding
    data_config: Dict[str, Any]     # mean, std, interpolation, crop_pct
    source: str
    class_names: Optional[List[str]] = None
    extra: Dict[str, Any] = field(default_factory=dict)   # metadata of our own checkpoints


# ------------------------------------------------------------------------------------------ zoo
@dataclass(frozen=True)
class ZooEntry:
    name: str
    timm_name: str                 # the architecture, as timm names it
    sources: Tuple[str, ...]       # the first is the default
    note: str = ""


ZOO: Dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("Ti_16", "vit_tiny_patch16_224", ("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                                               "timm:deit_tiny_patch16_224.fb_in1k"), "handy on CPU"),
    ZooEntry("S_16", "vit_small_patch16_224", ("timm:vit_small_patch16_224.augreg_in21k_ft_in1k",
                                               "timm:deit_small_patch16_224.fb_in1k"), "handy on CPU"),
    ZooEntry("B_16", "vit_base_patch16_384", ("ppv:B_16_imagenet1k", "timm:vit_base_patch16_384.augreg_in21k_ft_in1k",
                                              "hf:google/vit-base-patch16-384",
                                              "npz:imagenet21k+imagenet2012/ViT-B_16.npz")),
    ZooEntry("B_32", "vit_base_patch32_384", ("ppv:B_32_imagenet1k", "timm:vit_base_patch32_384.augreg_in21k_ft_in1k",
                                              "hf:google/vit-base-patch32-384",
                                              "npz:imagenet21k+imagenet2012/ViT-B_32.npz")),
    ZooEntry("L_16", "vit_large_patch16_384", ("ppv:L_16_imagenet1k", "timm:vit_large_patch16_384.augreg_in21k_ft_in1k",
                                               "hf:google/vit-large-patch16-384",
                                               "npz:imagenet21k+imagenet2012/ViT-L_16.npz")),
    ZooEntry("L_32", "vit_large_patch32_384", ("ppv:L_32_imagenet1k", "timm:vit_large_patch32_384.orig_in21k_ft_in1k",
                                               "hf:google/vit-large-patch32-384",
                                               "npz:imagenet21k+imagenet2012/ViT-L_32.npz")),
]}

# pytorch-pretrained-vit's own table (pytorch_pretrained_vit/configs.py); its release files are
# download.ppv_url(name) ($FINETUNE_PPV_BASE_URL, default the 0.0.2 GitHub release).
PPV_MODELS = {  # name -> (timm architecture, num_classes, native img size)
    "B_16": ("vit_base_patch16_224", 21843, 224), "B_32": ("vit_base_patch32_224", 21843, 224),
    "L_32": ("vit_large_patch32_224", 21843, 224),
    "B_16_imagenet1k": ("vit_base_patch16_384", 1000, 384), "B_32_imagenet1k": ("vit_base_patch32_384", 1000, 384),
    "L_16_imagenet1k": ("vit_large_patch16_384", 1000, 384), "L_32_imagenet1k": ("vit_large_patch32_384", 1000, 384),
}
# Google's .npz files are download.npz_url(location) ($FINETUNE_NPZ_BASE_URL, default their bucket).


# ----------------------------------------------------------------------------------- public API
def load_model(ref: str, num_classes: Optional[int] = None, img_size: Optional[int] = None,
               data_config: Optional[Dict[str, Any]] = None, class_names: Optional[List[str]] = None
               ) -> VisionTransformer:
    """A timm VisionTransformer with the weights `ref` names (see the module docstring).

    `num_classes` different from the weights' replaces the head with a zero-initialised Linear;
    `img_size` different from theirs resamples the position embedding. `data_config` overrides
    the normalisation the source implies. The model carries `pretrained_cfg` (timm's data config)
    and `finetune_info` (what a checkpoint needs to rebuild it).
    """
    pretrained = load_pretrained(ref)
    if data_config:
        pretrained.data_config = {**pretrained.data_config, **data_config}
    return model_from_pretrained(pretrained, num_classes=num_classes, img_size=img_size, class_names=class_names)


def load_pretrained(ref: str) -> Pretrained:
    """The weights `ref` names, in timm layout, without building a model."""
    ref = str(ref).strip()
    if ref in ZOO:
        return _from_zoo(ZOO[ref])
    scheme, _, rest = ref.partition(":")
    loaders: Dict[str, Callable[[str, str], Pretrained]] = {
        "ppv": _from_ppv, "timm": _from_timm, "hf": _from_hf, "npz": _from_npz, "scratch": _from_scratch}
    if scheme in loaders and rest:
        return loaders[scheme](ref, rest)
    refuse_onnx(ref)
    if Path(ref).suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt") or Path(ref).is_file():
        return _from_path(ref)
    raise FinetuneError(_unknown_ref_message(ref))


def build_model(arch: Dict[str, Any], num_classes: int, img_size: int) -> VisionTransformer:
    """An untrained VisionTransformer of architecture `arch` (the form stored in checkpoints).

    `arch` is `{"timm_name": "vit_base_patch16_384"}` for a timm architecture, optionally with
    `"kwargs"` overriding its constructor arguments, or `{"kwargs": {...}}` alone for a
    VisionTransformer built from explicit arguments. `kwargs.norm_eps` sets LayerNorm's epsilon.
    """
    kwargs = dict(arch.get("kwargs") or {})
    _check_sizes(arch, kwargs, num_classes, img_size)
    if "norm_eps" in kwargs:
        kwargs["norm_layer"] = partial(torch.nn.LayerNorm, eps=kwargs.pop("norm_eps"))
    kwargs.update(num_classes=num_classes, img_size=img_size)
    try:
        if arch.get("timm_name"):
            model = timm.create_model(arch["timm_name"], pretrained=False, **kwargs)
        else:
            model = VisionTransformer(**kwargs)
    except Exception as e:  # noqa: BLE001 — timm's constructors raise many types for impossible arguments
        raise FinetuneError(f"cannot build a ViT from architecture {str(arch)[:200]}: {type(e).__name__}: "
                            f"{str(e)[:200]}") from e
    if not isinstance(model, VisionTransformer):
        raise FinetuneError(f"{arch.get('timm_name')} is a {type(model).__name__}, not a VisionTransformer")
    return model


# Far beyond any published ViT (ViT-22B: depth 48, width 6144), yet small enough that a stranger's
# metadata cannot make us spend minutes or all memory building a network before its weights are checked.
SIZE_LIMITS = {"depth": 512, "embed_dim": 32768, "num_heads": 1024, "mlp_ratio": 64, "patch_size": 1024,
               "img_size": 8192, "num_classes": 1_000_000}


def _check_sizes(arch: Dict[str, Any], kwargs: Dict[str, Any], num_classes: int, img_size: int) -> None:
    for key, value in {**kwargs, "num_classes": num_classes, "img_size": img_size}.items():
        limit = SIZE_LIMITS.get(key)
        if limit is not None and isinstance(value, (int, float)) and not 0 <= value <= limit:
            raise FinetuneError(f"cannot build a ViT from architecture {str(arch)[:200]}: {key} {value} is outside "
                                f"0..{limit}")


def model_from_pretrained(p: Pretrained, num_classes: Optional[int] = None, img_size: Optional[int] = None,
                          class_names: Optional[List[str]] = None) -> VisionTransformer:
    num_classes = p.num_classes if num_classes is None else int(num_classes)
    img_size = p.img_size if img_size is None else int(img_size)
    if num_classes <= 0:
        raise FinetuneError(f"{p.source}: the weights have no classification head; pass num_classes")
    if p.arch.get("pre_logits") and num_classes == p.num_classes:
        warnings.warn(f"{p.source}: the pre-logits layer is dropped (as timm and pytorch-pretrained-vit do), so "
                      "the original head's logits change; fine-tuning with a new head is unaffected")
    replace_head = num_classes != p.num_classes
    # Check the weights against a skeleton on the meta device first: metadata naming a far larger
    # network than its tensors is an error message, not a real allocation of that network.
    with torch.device("meta"):
        skeleton = build_model(_arch_for_build(p.arch), num_classes, img_size)
    state = _fit_state_dict(p, skeleton, replace_head)
    _check_fit(skeleton, state, p.source, replace_head)
    model = build_model(_arch_for_build(p.arch), num_classes, img_size)
    _load_strict(model, state, p.source, replace_head)
    if class_names is None and num_classes == p.num_classes:
        class_names = p.class_names
    _attach_info(model, p, num_classes, img_size, class_names)
    return model


def export_ppv(model: VisionTransformer) -> StateDict:
    """pytorch-pretrained-vit layout of `model`'s weights (loads into `pytorch_pretrained_vit.ViT`)."""
    return convert.timm_to_ppv({k: v.detach().cpu() for k, v in model.state_dict().items()})


def data_config_of(model: torch.nn.Module) -> Dict[str, Any]:
    """timm's data config (input_size, mean, std, interpolation, crop_pct) that the model carries."""
    return timm.data.resolve_model_data_config(getattr(model, "module", model))


# ------------------------------------------------------------------------------ model assembly
def _arch_for_build(arch: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in arch.items() if k in ("timm_name", "kwargs")}


def _fit_state_dict(p: Pretrained, model: VisionTransformer, replace_head: bool) -> StateDict:
    state = dict(p.state_dict)
    if replace_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        old_grid = p.img_size // model.patch_embed.patch_size[0]
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        if state["pos_embed"].ndim != 3 or state["pos_embed"].shape[1] != old_grid * old_grid + prefix:
            raise FinetuneError(f"{p.source}: the position embedding {tuple(state['pos_embed'].shape)} does not fit "
                                f"img_size {p.img_size} with patch {model.patch_embed.patch_size[0]} ({old_grid}x{old_grid} "
                                "patches); the metadata or the weights are wrong")
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(model.patch_embed.grid_size), old_size=[old_grid, old_grid],
            num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
            interpolation="bicubic", antialias=True)
    return state


def _load_strict(model: VisionTransformer, state: StateDict, source: str, replace_head: bool) -> None:
    _check_fit(model, state, source, replace_head)
    model.load_state_dict(state, strict=False)
    if replace_head:
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)


def _check_fit(model: VisionTransformer, state: StateDict, source: str, replace_head: bool) -> None:
    target = model.state_dict()
    missing = [k for k in target if k not in state and not (replace_head and k.startswith("head."))]
    unexpected = [k for k in state if k not in target]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
             for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
                           if keys)
        raise FinetuneError(f"{source}: weights do not fit the architecture ({detail})")


# What a checkpoint's model keeps of its metadata beyond the architecture: where its weights came
# from, and for the task (`finetune.tasks`) its name and multi-label threshold.
CARRIED_META = ("lineage", "task", "threshold")
CALIBRATION_META = ("temperature", "thresholds")


def _attach_info(model: VisionTransformer, p: Pretrained, num_classes: int, img_size: int,
                 class_names: Optional[List[str]]) -> None:
    if class_names is not None and len(class_names) != num_classes:
        raise FinetuneError(f"{p.source}: {len(class_names)} class names for {num_classes} classes")
    data_config = {"mean": tuple(p.data_config["mean"]), "std": tuple(p.data_config["std"]),
                   "interpolation": p.data_config.get("interpolation", "bicubic"),
                   "crop_pct": float(p.data_config.get("crop_pct", 1.0)),
                   "crop_mode": p.data_config.get("crop_mode", "center"), "input_size": (3, img_size, img_size)}
    # timm reads pretrained_cfg for its data config; keep it the single source of normalisation.
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **data_config}
    model.finetune_info = {
        "arch": _arch_for_build(p.arch), "num_classes": num_classes, "img_size": img_size,
        "class_names": list(class_names) if class_names else None, "data_config": data_config,
        "source": p.source, **{k: v for k, v in p.extra.items() if k in CARRIED_META},
        # A temperature (and multi-label per-class thresholds) is fitted to this head at this
        # resolution (finetune.calibration).
        **({k: p.extra[k] for k in CALIBRATION_META if p.extra.get(k) is not None}
           if (num_classes, img_size) == (p.num_classes, p.img_size) else {}),
    }


# ------------------------------------------------------------------------------------- sources
def _from_zoo(entry: ZooEntry) -> Pretrained:
    try:
        return replace(load_pretrained(entry.sources[0]), source=entry.sources[0])
    except FinetuneError as e:
        others = ", ".join(f"{s}{' (cached)' if is_cached(s) else ''}" for s in entry.sources[1:])
        raise FinetuneError(f"{entry.name}: {e}; alternatives: {others}") from e


def _from_ppv(ref: str, name: str) -> Pretrained:
    if name == "L_16":
        raise FinetuneError(f"{ref}: pytorch-pretrained-vit never released L_16 (ImageNet-21k) weights; "
                            "use ppv:L_16_imagenet1k or timm:vit_large_patch16_224.augreg_in21k")
    if name not in PPV_MODELS:
        raise FinetuneError(f"unknown pytorch-pretrained-vit model {name!r}{_suggest(name, PPV_MODELS)}; "
                            f"known: {', '.join(PPV_MODELS)}")
    timm_name, num_classes, size = PPV_MODELS[name]
    path = hubs.fetch_url(ref, download.ppv_url(name), hubs.torch_hub_checkpoints() / f"{name}.pth",
                          hint="FINETUNE_PPV_BASE_URL sets the folder it is fetched from")
    state, _ = read_state_dict(path)
    arch = {"timm_name": timm_name, **({"pre_logits": True} if "pre_logits.weight" in state else {})}
    return Pretrained(convert.to_timm(state, str(path)), arch, num_classes, size,
                      _data_config(*GOOGLE_MEAN_STD, "bilinear", 1.0), ref, _imagenet_names(num_classes))


def _from_timm(ref: str, tag: str) -> Pretrained:
    # timm's own pretrained path, so each family's checkpoint_filter_fn (OpenCLIP, DINOv2, EVA, ...
    # layouts) and the tag's hub file name apply exactly as in timm.create_model(tag, pretrained=True).
    cfg = _timm_pretrained_cfg(tag)
    _require_timm_vit(ref, cfg["architecture"])
    model = _timm_pretrained_model(ref, tag, cfg)
    resolved = model.pretrained_cfg
    return Pretrained(model.state_dict(), {"timm_name": cfg["architecture"]}, model.num_classes,
                      model.patch_embed.img_size[0], _data_config_from_timm(resolved), ref,
                      resolved.get("label_names") or _imagenet_names(model.num_classes))


def _timm_pretrained_cfg(tag: str) -> Dict[str, Any]:
    if tag not in timm.list_pretrained():
        raise FinetuneError(f"unknown timm pretrained tag {tag!r}{_suggest(tag, timm.list_pretrained())}; "
                            "see timm.list_pretrained('vit_*')")
    return timm.models.get_pretrained_cfg(tag).to_dict()


def _require_timm_vit(ref: str, architecture: str) -> None:
    try:
        with torch.device("meta"):  # the class only: no memory, no weights
            model_class = type(timm.create_model(architecture, pretrained=False))
    except (RuntimeError, NotImplementedError):  # an architecture whose construction needs real tensors
        model_class = type(timm.create_model(architecture, pretrained=False))
    if not issubclass(model_class, VisionTransformer):
        raise FinetuneError(f"{ref}: {architecture} is a timm {model_class.__name__}, not a VisionTransformer; "
                            "use a ViT tag such as timm:vit_base_patch16_224.augreg2_in21k_ft_in1k")


def _timm_pretrained_model(ref: str, tag: str, cfg: Dict[str, Any]) -> VisionTransformer:
    cached = hubs.timm_cached_file(cfg)
    if cached is None and hubs.offline():
        raise hubs.timm_missing_error(ref, cfg, "offline mode is on")
    if cached is None and (cfg.get("hf_hub_id") or cfg.get("url")):
        cached = hubs.timm_fetch(ref, cfg)  # our download (progress, resume, one-line errors), not timm's
    # The file is handed to timm directly, so timm itself never touches the network.
    overlay = {"file": str(cached)} if cached else None
    try:
        return timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay,
                                 cache_dir=hubs.timm_cache_dir(cfg))
    except _TIMM_LOAD_ERRORS as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        cached = cached or hubs.timm_cached_file(cfg)
        if cached is None:
            raise hubs.timm_missing_error(ref, cfg, f"download failed: {reason}") from e
        raise FinetuneError(f"{ref}: timm cannot load {cached} ({reason}); the file is truncated, corrupt or "
                            f"not the weights of {tag}: delete it and fetch it again") from e


def _from_hf(ref: str, repo_id: str) -> Pretrained:
    import json
    config = json.loads(hubs.hf_file(ref, repo_id, ("config.json",)).read_text())
    if config.get("model_type") not in (None, "vit"):
        raise FinetuneError(f"{ref}: model_type {config.get('model_type')!r} is not a transformers ViT ('vit')")
    path = hubs.hf_file(ref, repo_id, ("model.safetensors", "pytorch_model.bin"))
    state = convert.hf_to_timm(read_state_dict(path)[0])
    kwargs = dict(patch_size=config.get("patch_size", 16), embed_dim=config["hidden_size"],
                  depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                  mlp_ratio=config["intermediate_size"] / config["hidden_size"],
                  qkv_bias=config.get("qkv_bias", True), in_chans=config.get("num_channels", 3),
                  norm_eps=config.get("layer_norm_eps", 1e-12))
    if config.get("hidden_act", "gelu") != "gelu":
        raise FinetuneError(f"{ref}: hidden_act {config['hidden_act']!r} is not supported (only 'gelu')")
    preprocessor = hubs.hf_file(ref, repo_id, ("preprocessor_config.json",), required=False)
    labels = config.get("id2label") or {}
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    names = [labels.get(str(i)) for i in range(num_classes)] if len(labels) == num_classes else None
    return Pretrained(state, {"kwargs": kwargs}, num_classes, config.get("image_size", 224),
                      _hf_data_config(preprocessor), ref, names)


def _hf_data_config(path: Optional[Path]) -> Dict[str, Any]:
    import json
    pre = json.loads(path.read_text()) if path else {}
    interpolation = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(pre.get("resample", 2), "bilinear")
    return _data_config(pre.get("image_mean", GOOGLE_MEAN_STD[0]), pre.get("image_std", GOOGLE_MEAN_STD[1]),
                        interpolation, 1.0)


def _from_npz(ref: str, location: str) -> Pretrained:
    import numpy as np
    from timm.models.vision_transformer import _load_weights
    path = _npz_path(ref, location)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):  # a lone .npy array, not an archive of them
                raise ValueError("a single array, not an .npz archive")
            shapes = {k: npz[k].shape for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FinetuneError(f"{path}: not a readable .npz file ({str(e)[:120]}); it is truncated or corrupt") from e
    try:
        arch, num_classes, img_size = _npz_arch(path, shapes)
    except (KeyError, IndexError, TypeError, ValueError) as e:  # a file of other arrays than Google's
        raise FinetuneError(f"{path}: not a Google ViT checkpoint: array {e} is missing or has an unexpected "
                            "shape") from e
    model = build_model(arch, max(num_classes, 1), img_size)
    try:
        with torch.no_grad():
            _load_weights(model, str(path))  # timm's own reader of Google's layout
    except (KeyError, ValueError, RuntimeError, IndexError, TypeError, AttributeError) as e:
        raise FinetuneError(f"{path}: not a Google ViT checkpoint timm can read ({str(e)[:120]})") from e
    state = {k: v for k, v in model.state_dict().items() if num_classes or not k.startswith("head.")}
    return Pretrained(state, arch, num_classes, img_size, _data_config(*GOOGLE_MEAN_STD, "bilinear", 1.0),
                      ref, _imagenet_names(num_classes))


def _npz_path(ref: str, location: str) -> Path:
    path = Path(location).expanduser()
    if path.is_file():
        return path
    if location.startswith(("imagenet21k/", "imagenet21k+imagenet2012/")):
        return hubs.fetch_url(ref, download.npz_url(location), hubs.torch_hub_checkpoints() / "vit_models" / location,
                              hint="FINETUNE_NPZ_BASE_URL sets the folder it is fetched from")
    raise FinetuneError(f"{ref}: no such file {path}; give a path to a Google ViT .npz, or "
                        "imagenet21k/ViT-B_16.npz / imagenet21k+imagenet2012/ViT-B_16.npz to use the hub cache")


def _npz_arch(path: Path, shapes: Dict[str, tuple]) -> Tuple[Dict[str, Any], int, int]:
    """Architecture of a Google .npz from its shapes (kernel [p, p, 3, D], heads in the query kernel)."""
    prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in shapes), None)
    if prefix is None:
        raise FinetuneError(f"{path}: no embedding/kernel array: not a Google ViT checkpoint")
    kernel = shapes[f"{prefix}embedding/kernel"]
    if len(kernel) != 4:
        raise FinetuneError(f"{path}: embedding/kernel has shape {tuple(kernel)}; a Google ViT patch kernel is "
                            "4-D [patch, patch, channels, width]")
    ph, pw, in_chans, width = kernel
    depth = sum(1 for k in shapes if k.startswith(f"{prefix}Transformer/encoderblock_") and k.endswith("LayerNorm_0/scale"))
    query = shapes.get(f"{prefix}Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    if width not in convert.FAMILY or ph != pw or ph not in convert.PATCH_SIZES or depth == 0 or query is None:
        raise FinetuneError(f"{path}: shapes outside the standard ViT family: width {width}, patch {ph}x{pw}, "
                            f"{depth} blocks; known widths {sorted(convert.FAMILY)}, patches {list(convert.PATCH_SIZES)}")
    mlp = shapes[f"{prefix}Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"][-1]
    tokens = shapes[f"{prefix}Transformer/posembed_input/pos_embedding"][1] - 1
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise FinetuneError(f"{path}: position embedding of {tokens} patches is not a square grid")
    kwargs = dict(patch_size=int(ph), embed_dim=int(width), depth=depth, num_heads=int(query[1]),
                  mlp_ratio=mlp / width, in_chans=int(in_chans))
    arch: Dict[str, Any] = {"kwargs": kwargs}
    if f"{prefix}pre_logits/kernel" in shapes:
        arch["pre_logits"] = True
    num_classes = shapes[f"{prefix}head/bias"][0] if f"{prefix}head/bias" in shapes else 0
    return arch, int(num_classes), grid * int(ph)


def _from_scratch(ref: str, spec: str) -> Pretrained:
    kwargs: Dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise FinetuneError(f"{ref}: expected key=value pairs such as patch_size=4,embed_dim=128, got {item!r}")
        kwargs[key.strip()] = _parse_scalar(value.strip())
    img_size = int(kwargs.pop("img_size", 224))
    num_classes = int(kwargs.pop("num_classes", 0))
    model = build_model({"kwargs": kwargs}, max(num_classes, 1), img_size)  # validates the kwargs
    state = {k: v for k, v in model.state_dict().items() if num_classes or not k.startswith("head.")}
    return Pretrained(state, {"kwargs": kwargs}, num_classes, img_size,
                      _data_config(*GOOGLE_MEAN_STD, "bilinear", 1.0), ref)


def _from_path(ref: str) -> Pretrained:
    path = Path(ref).expanduser()
    if not path.is_file():
        raise FinetuneError(f"{path}: no such checkpoint file")
    state, meta = read_state_dict(path)
    if meta.get("arch"):
        return Pretrained(state, meta["arch"], int(meta["num_classes"]), int(meta["img_size"]),
                          meta["data_config"], str(path), meta.get("class_names"), extra=meta)
    state = convert.to_timm(state, str(path))
    arch, num_classes, img_size = convert.infer_arch(state, str(path))
    return Pretrained(state, arch, num_classes, img_size, _guess_data_config(path, arch), str(path),
                      _imagenet_names(num_classes))


def _guess_data_config(path: Path, arch: Dict[str, Any]) -> Dict[str, Any]:
    # A file named after a timm pretrained tag (as timm's hub files are) carries that tag's config.
    tag = path.name.removesuffix(path.suffix)
    if tag in timm.list_pretrained():
        return _data_config_from_timm(timm.models.get_pretrained_cfg(tag).to_dict())
    warnings.warn(f"{path}: no data config stored with these weights; assuming mean=std=0.5 (Google ViT). "
                  "Pass data_config= to load_model if they were trained with other statistics")
    return _data_config(*GOOGLE_MEAN_STD, "bicubic", 1.0)


# ------------------------------------------------------------------------------------- helpers
def _data_config(mean, std, interpolation: str, crop_pct: float) -> Dict[str, Any]:
    return {"mean": tuple(mean), "std": tuple(std), "interpolation": interpolation, "crop_pct": crop_pct}


def _data_config_from_timm(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {**_data_config(cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"), cfg.get("crop_pct", 0.875)),
            "crop_mode": cfg.get("crop_mode", "center")}


def _imagenet_names(num_classes: Optional[int]) -> Optional[List[str]]:
    if num_classes not in (1000, 21843):
        return None
    try:
        info = timm.data.ImageNetInfo("imagenet-1k" if num_classes == 1000 else "imagenet-21k")
        return [info.index_to_description(i) for i in range(num_classes)]
    except Exception:  # noqa: BLE001 — names are a convenience; timm versions differ in this API
        return None


def _parse_scalar(text: str) -> Any:
    import yaml
    return yaml.safe_load(text)


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _unknown_ref_message(ref: str) -> str:
    candidates = list(ZOO) + [f"ppv:{n}" for n in PPV_MODELS]
    return (f"unknown model ref {ref!r}{_suggest(ref, candidates)}; use a zoo name ({', '.join(ZOO)}), "
            "ppv:NAME, timm:TAG, hf:REPO, npz:PATH, scratch:KEY=VALUE,..., or a path to an existing "
            ".safetensors/.pth/.bin file")


# ----------------------------------------------------------------------------------- zoo listing
def zoo_table() -> List[Dict[str, Any]]:
    """One row per zoo model: name, parameters, resolution, sources with their cache state."""
    rows = []
    for entry in ZOO.values():
        with torch.device("meta"):
            model = timm.create_model(entry.timm_name, pretrained=False)
        rows.append({
            "name": entry.name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "img_size": model.patch_embed.img_size[0], "default": entry.sources[0],
            "sources": [{"ref": s, "cached": is_cached(s)} for s in entry.sources], "note": entry.note,
        })
    return rows


def is_cached(ref: str) -> bool:
    """Whether the weights of `ref` are on disk already (so loading needs no network)."""
    scheme, _, rest = ref.partition(":")
    if scheme == "ppv" and rest in PPV_MODELS:
        return (hubs.torch_hub_checkpoints() / f"{rest}.pth").is_file()
    if scheme == "timm":
        return rest in timm.list_pretrained() and hubs.timm_cached_file(_timm_pretrained_cfg(rest)) is not None
    if scheme == "hf":
        return hubs.hf_cached_file(rest, ("model.safetensors", "pytorch_model.bin")) is not None
    if scheme == "npz":
        return Path(rest).is_file() or (hubs.torch_hub_checkpoints() / "vit_models" / rest).is_file()
    return Path(ref).is_file()
