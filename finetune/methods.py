"""Fine-tuning methods beyond plain SGD, each a recipe key, each off unless the recipe turns it on:

    drop_path, dropout          stochastic depth and dropout rates of the model (set on its modules)
    freeze                      none | backbone (a linear probe: head only) | blocks:N (first N frozen)
    lora.{rank,alpha,dropout,targets}   LoRA adapters through peft; the head trains in full
    model_ema.{decay,warmup}    an exponential moving average of the weights (timm's ModelEmaV3)
    mixup.{mixup_alpha,cutmix_alpha,prob,switch_prob,off_epoch}   timm's Mixup with soft targets
    optimizer.layer_decay       layer-wise lr decay (in the engine's build_optimizer, timm's factory)

`prepare(model, recipe)` turns the loaded ViT into the module to train; `plain_state(module)` gives
back the weights of a plain timm ViT (LoRA merged), which is what every checkpoint holds: a LoRA
or EMA fine-tune is an ordinary checkpoint that loads, soups, exports and compares like any other.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer

from .checkpoints import StateDict
from .errors import FinetuneError
from . import tasks
from .recipes import Recipe


# ---------------------------------------------------------------------------------- preparation
def prepare(model: VisionTransformer, recipe: Recipe) -> torch.nn.Module:
    """The module to train: drop rates set, parameters frozen, LoRA adapters added, as the recipe says."""
    set_drop_rates(model, recipe.drop_path, recipe.dropout)
    freeze(model, recipe.freeze)
    if recipe.lora.rank:
        return add_lora(model, recipe)
    return model


def set_drop_rates(model: VisionTransformer, drop_path: float, dropout: float) -> None:
    """Stochastic depth rising linearly from 0 to `drop_path` over the blocks (timm's rule), and
    `dropout` on the embedding, projection, MLP and head dropout layers; the dropout of attention
    probabilities stays 0, as in the ViT paper and pytorch-pretrained-vit (dropout_rate 0.1,
    attention_dropout_rate 0). Set on the modules, not the architecture, so checkpoints of runs
    that differ only here still soup."""
    rates = torch.linspace(0, drop_path, len(model.blocks)).tolist()
    for block, rate in zip(model.blocks, rates):
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(rate) if rate > 0 else torch.nn.Identity())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and not name.endswith("attn_drop"):
            module.p = dropout


def freeze(model: VisionTransformer, spec: str) -> None:
    """`none`, `backbone` (everything but the head) or `blocks:N` (embeddings and the first N blocks)."""
    if spec == "none":
        return
    if spec == "backbone":
        frozen = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    else:
        count = frozen_block_count(spec, len(model.blocks))
        frozen = [p for name, p in model.named_parameters()
                  if name.split(".")[0] in ("cls_token", "reg_token", "pos_embed", "patch_embed")
                  or (name.startswith("blocks.") and int(name.split(".")[1]) < count)]
    for parameter in frozen:
        parameter.requires_grad_(False)


def frozen_block_count(spec: str, depth: int) -> int:
    kind, _, number = spec.partition(":")
    if kind != "blocks" or not number.isdigit() or not 0 <= int(number) <= depth:
        raise FinetuneError(f"freeze: {spec!r} is not none, backbone or blocks:N with 0 <= N <= {depth} "
                            "(the model's depth)")
    return int(number)


def trainable_share(module: torch.nn.Module) -> Tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------------------- LoRA
def add_lora(model: VisionTransformer, recipe: Recipe) -> torch.nn.Module:
    """LoRA adapters (peft) on the recipe's target linears of `model`, in place; the head trains in
    full. Returns the peft wrapper, whose forward is the ViT's."""
    from peft import LoraConfig, inject_adapter_in_model
    targets = [t.strip() for t in recipe.lora.targets.split(",") if t.strip()]
    names = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise FinetuneError(f"lora.targets: {', '.join(unknown)} name no linear layer of the model; "
                            f"its linear layers are {', '.join(sorted(names))}")
    config = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                        target_modules=targets)
    # Adapters go straight into the timm model (no PeftModel around it), so the engine, the
    # optimizer factory (group_matcher, no_weight_decay) and timm's data config all see a ViT.
    model = inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name or name.startswith("head."))
    return model


def plain_state(module: torch.nn.Module) -> StateDict:
    """The weights of a plain timm ViT: LoRA deltas merged into their base weights."""
    if "peft" not in sys.modules:  # no adapter can exist without peft loaded, and importing it costs ~3 s
        return {key: value.detach().cpu() for key, value in module.state_dict().items()}
    from peft.tuners.lora import LoraLayer
    deltas = {name: m.get_delta_weight("default") for name, m in module.named_modules()
              if isinstance(m, LoraLayer) and "default" in m.lora_A}
    state = {}
    for key, value in module.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        owner = plain.rsplit(".", 1)[0]
        if owner in deltas and plain.endswith(".weight"):
            value = value + deltas[owner].to(value.dtype)
        state[plain] = value.detach().cpu()
    return state


def unadapted_state(state: StateDict) -> StateDict:
    """A resume point's weights without the adapters (base weights as they were: not merged), to
    rebuild the plain ViT before adapters are added back and the whole state loaded into them."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


# ------------------------------------------------------------------------------------------ EMA
def make_ema(module: torch.nn.Module, recipe: Recipe):
    """timm's ModelEmaV3 of the module being trained, or None when model_ema.decay is 0."""
    if not recipe.model_ema.decay:
        return None
    from timm.utils import ModelEmaV3
    return ModelEmaV3(module, decay=recipe.model_ema.decay, use_warmup=recipe.model_ema.warmup)


# ---------------------------------------------------------------------------------------- mixup
def make_mixup(recipe: Recipe, num_classes: int):
    """timm's Mixup/CutMix for the recipe's task (the label smoothing folded into its soft targets), or None."""
    return tasks.get(recipe.task).mixup(recipe, num_classes)


def mixup_active(recipe: Recipe, epoch: int) -> bool:
    return recipe.mixup.off_epoch is None or epoch < recipe.mixup.off_epoch


def describe(module: torch.nn.Module, recipe: Recipe) -> Optional[str]:
    """One log line on what the recipe turned on, with the share of trainable parameters."""
    trainable, total = trainable_share(module)
    on = [f"{name} {value}" for name, value in (
        ("drop_path", recipe.drop_path), ("dropout", recipe.dropout), ("layer_decay", recipe.optimizer.layer_decay),
        ("ema", recipe.model_ema.decay), ("mixup", recipe.mixup.mixup_alpha), ("cutmix", recipe.mixup.cutmix_alpha),
        ("random_erasing", recipe.data.random_erasing)) if value]
    if recipe.freeze != "none":
        on.append(f"freeze {recipe.freeze}")
    if recipe.lora.rank:
        on.append(f"lora rank {recipe.lora.rank} on {recipe.lora.targets}")
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)" + (
        f"  |  {', '.join(on)}" if on else "")
