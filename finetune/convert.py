"""Weight layouts: convert other ViT layouts to timm's and back, and infer the architecture.

Every loader in `finetune.loading` turns its source into a timm `VisionTransformer` state dict
plus an architecture dict; this module holds the key mappings:

- pytorch-pretrained-vit (`patch_embedding`, `transformer.blocks.N.attn.proj_q`, `fc`, ...)
- Hugging Face transformers ViT (`vit.embeddings...`, `vit.encoder.layer.N.attention.attention.query`, ...)
- timm itself (`patch_embed.proj`, `blocks.N.attn.qkv`, `head`, ...)

Google's `.npz` files are read by timm's own loader (`_load_weights`), not here.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Tuple

import torch

from .checkpoints import StateDict
from .errors import FinetuneError

# The standard ViT family (Dosovitskiy et al. 2021, Touvron et al. 2021): width -> (name, heads).
FAMILY = {192: ("tiny", 3), 384: ("small", 6), 768: ("base", 12), 1024: ("large", 16), 1280: ("huge", 16)}
PATCH_SIZES = (8, 14, 16, 32)


# ------------------------------------------------------------------------------------ detection
def detect_layout(sd: StateDict) -> str:
    """'timm', 'ppv' or 'hf' from characteristic keys; 'unknown' otherwise."""
    if "patch_embed.proj.weight" in sd:
        return "timm"
    if "patch_embedding.weight" in sd:
        return "ppv"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd):
        return "hf"
    return "unknown"


def to_timm(sd: StateDict, where: str) -> StateDict:
    """Convert any known layout to timm's; `where` names the source in errors."""
    layout = detect_layout(sd)
    if layout == "timm":
        return dict(sd)
    if layout == "ppv":
        return ppv_to_timm(sd)
    if layout == "hf":
        return hf_to_timm(sd)
    sample = ", ".join(list(sd)[:3])
    raise FinetuneError(f"{where}: not a ViT state dict (no patch embedding among keys such as {sample}); "
                        "expected timm, pytorch-pretrained-vit or transformers ViT keys")


# ------------------------------------------------------------------------ pytorch-pretrained-vit
_PPV_RENAMES = [
    (r"^patch_embedding\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^positional_embedding\.pos_embedding$", "pos_embed"),
    (r"^transformer\.blocks\.(\d+)\.proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.blocks\.(\d+)\.norm1\.", r"blocks.\1.norm1."),
    (r"^transformer\.blocks\.(\d+)\.norm2\.", r"blocks.\1.norm2."),
    (r"^transformer\.blocks\.(\d+)\.pwff\.fc1\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.blocks\.(\d+)\.pwff\.fc2\.", r"blocks.\1.mlp.fc2."),
    (r"^norm\.", "norm."),
    (r"^fc\.", "head."),
]
_PPV_QKV = re.compile(r"^transformer\.blocks\.(\d+)\.attn\.proj_([qkv])\.(weight|bias)$")


def ppv_to_timm(sd: StateDict) -> StateDict:
    """pytorch-pretrained-vit -> timm. Its pre-logits layer is dropped, as ppv itself does by default."""
    kept = {k: v for k, v in sd.items() if not k.startswith("pre_logits.")}
    return _rename_merging_qkv(kept, _PPV_RENAMES, _PPV_QKV, ("q", "k", "v"))


def timm_to_ppv(sd: StateDict) -> StateDict:
    """timm -> pytorch-pretrained-vit, for `finetune export --to ppv`."""
    unsupported = [k for k in sd if k.startswith(("fc_norm.", "reg_token", "norm_pre.", "attn_pool."))
                   or ".ls1." in k or ".q_norm." in k]
    if unsupported or "cls_token" not in sd:
        raise FinetuneError("pytorch-pretrained-vit cannot represent this model "
                            f"({unsupported[0] if unsupported else 'no class token'}); it supports the plain "
                            "class-token ViT only")
    inverse = [(r"^patch_embed\.proj\.", "patch_embedding."), (r"^cls_token$", "class_token"),
               (r"^pos_embed$", "positional_embedding.pos_embedding"),
               (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer.blocks.\1.proj."),
               (r"^blocks\.(\d+)\.norm1\.", r"transformer.blocks.\1.norm1."),
               (r"^blocks\.(\d+)\.norm2\.", r"transformer.blocks.\1.norm2."),
               (r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer.blocks.\1.pwff.fc1."),
               (r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer.blocks.\1.pwff.fc2."),
               (r"^norm\.", "norm."), (r"^head\.", "fc.")]
    out: StateDict = {}
    for key, value in sd.items():
        m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"transformer.blocks.{m.group(1)}.attn.proj_{name}.{m.group(2)}"] = part.clone()
            continue
        out[_rename(key, inverse)] = value
    return out


# ------------------------------------------------------------------------ transformers (HF) ViT
_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def hf_to_timm(sd: StateDict) -> StateDict:
    """transformers ViTModel / ViTForImageClassification -> timm. The unused pooler is dropped."""
    unprefixed = {k.removeprefix("vit."): v for k, v in sd.items()}
    kept = {k: v for k, v in unprefixed.items() if not k.startswith("pooler.") and k != "embeddings.mask_token"}
    return _rename_merging_qkv(kept, _HF_RENAMES, _HF_QKV, ("query", "key", "value"))


def _rename_merging_qkv(sd: StateDict, renames, qkv_pattern: re.Pattern, order: Tuple[str, str, str]) -> StateDict:
    """Rename keys by `renames`; separate q/k/v projections (block, part, weight|bias) become timm's qkv."""
    out: StateDict = {}
    parts: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = qkv_pattern.match(key)
        if m:
            parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[_rename(key, renames)] = value
    for (block, kind), by_name in parts.items():
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([by_name[name] for name in order], dim=0)
    return out


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


# -------------------------------------------------------------------------- architecture inference
def infer_arch(sd: StateDict, where: str) -> Tuple[Dict[str, Any], int, int]:
    """(arch, num_classes, native img_size) of a timm-layout state dict, from its tensor shapes.

    Only the standard ViT family is recognised (widths Ti/S/B/L/H, patch 8/14/16/32, square grid of
    any size): the head count is not stored in the weights, so it comes from the family table.
    """
    proj = sd.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise FinetuneError(f"{where}: no 4-D patch_embed.proj.weight: not a ViT state dict")
    width, in_chans, patch, patch_w = proj.shape
    if width not in FAMILY or patch != patch_w or patch not in PATCH_SIZES:
        raise FinetuneError(
            f"{where}: shapes outside the standard ViT family: found width {width}, patch {patch}x{patch_w}; "
            f"known widths {sorted(FAMILY)} (Ti/S/B/L/H) and patches {list(PATCH_SIZES)}")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0 or "blocks.0.mlp.fc1.weight" not in sd:
        raise FinetuneError(f"{where}: no transformer blocks (blocks.N.*) found: not a ViT state dict")
    class_token = "cls_token" in sd
    reg_tokens = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    # A prefix token makes a standard pos_embed length g*g+1; a perfect square means the prefix
    # tokens carry no position embedding (timm's no_embed_class).
    no_embed_class = bool(class_token or reg_tokens) and "pos_embed" in sd and _is_square(sd["pos_embed"].shape[1])
    grid = _infer_grid(sd, where, 0 if no_embed_class else int(class_token) + reg_tokens)
    kwargs = dict(
        patch_size=patch, embed_dim=width, depth=depth, num_heads=FAMILY[width][1],
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width, in_chans=in_chans,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, class_token=class_token,
    )
    if "fc_norm.weight" in sd:
        kwargs.update(global_pool="avg", fc_norm=True)
    elif not class_token:
        kwargs.update(global_pool="avg")
    if reg_tokens:
        kwargs.update(reg_tokens=reg_tokens)
    if no_embed_class:
        kwargs.update(no_embed_class=True)
    if "norm_pre.weight" in sd:
        kwargs.update(pre_norm=True)
    if "blocks.0.ls1.gamma" in sd:
        kwargs.update(init_values=1e-5)
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    return {"kwargs": kwargs}, num_classes, grid * patch


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def _infer_grid(sd: StateDict, where: str, num_prefix: int) -> int:
    pos = sd.get("pos_embed")
    if pos is None or pos.ndim != 3:
        raise FinetuneError(f"{where}: no 3-D pos_embed: only ViTs with learned position embeddings are supported")
    tokens = pos.shape[1] - num_prefix
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens or grid == 0:
        raise FinetuneError(f"{where}: pos_embed has {pos.shape[1]} tokens ({num_prefix} prefix), not a square "
                            "grid of patches")
    return grid


def timm_to_hf(sd: StateDict) -> StateDict:
    """timm -> transformers ViTForImageClassification, in the Hub's layout (`vit.encoder.layer.N.attention.
    attention.query`, ...: what transformers 4.x reads and 5.x writes back), for `finetune export --to
    transformers`. Keys without a counterpart stay as they are, so loading reports them."""
    inverse = [(r"^cls_token$", "vit.embeddings.cls_token"), (r"^pos_embed$", "vit.embeddings.position_embeddings"),
               (r"^patch_embed\.proj\.", "vit.embeddings.patch_embeddings.projection."),
               (r"^blocks\.(\d+)\.norm1\.", r"vit.encoder.layer.\1.layernorm_before."),
               (r"^blocks\.(\d+)\.norm2\.", r"vit.encoder.layer.\1.layernorm_after."),
               (r"^blocks\.(\d+)\.attn\.proj\.", r"vit.encoder.layer.\1.attention.output.dense."),
               (r"^blocks\.(\d+)\.mlp\.fc1\.", r"vit.encoder.layer.\1.intermediate.dense."),
               (r"^blocks\.(\d+)\.mlp\.fc2\.", r"vit.encoder.layer.\1.output.dense."),
               (r"^norm\.", "vit.layernorm."), (r"^head\.", "classifier.")]
    out: StateDict = {}
    for key, value in sd.items():
        m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"vit.encoder.layer.{m.group(1)}.attention.attention.{name}.{m.group(2)}"] = part.contiguous()
            continue
        out[_rename(key, inverse)] = value
    return out
