"""Weight-space merges beyond the plain average: Model Stock and the learned soup.

The arithmetic only: tensors in, tensors out. `finetune.soup` reads the ingredients, checks them,
scores the result and writes the checkpoint (`make_soup(..., method="stock" | "learned")`).

* Model Stock (Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models",
  ECCV 2024, arXiv:2403.19522): `stock_tensor`, one tensor at a time.
* The learned soup (Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
  improves accuracy without increasing inference time", ICML 2022, appendix I; the reference code
  is `learned_bylayer.py` of github.com/mlfoundations/model-soups): `LearnedMixture`.

Both speak of "blocks": `block_of(key)` is `blocks.N` for a tensor of transformer block N, else
the key's first part (`patch_embed`, `cls_token`, `pos_embed`, `norm`, `fc_norm`, `head`, ...).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .checkpoints import StateDict
from .errors import FinetuneError

GiB = 1024 ** 3


def block_of(key: str) -> str:
    """`blocks.3.attn.qkv.weight` -> `blocks.3`; `patch_embed.proj.weight` -> `patch_embed`."""
    parts = key.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return f"blocks.{parts[1]}"
    return parts[0]


EARLY = ("cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed", "norm_pre")
LATE = ("norm", "fc_norm", "attn_pool", "head_drop", "head", "head_dist")


def block_rank(block: str) -> Tuple[int, int, str]:
    """Blocks in network order: embeddings, blocks.0, blocks.1, ..., blocks.11, final norm, head."""
    if block.startswith("blocks."):
        return (1, int(block.split(".")[1]), "")
    if block in EARLY:
        return (0, EARLY.index(block), block)
    return (2, LATE.index(block) if block in LATE else len(LATE), block)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 arithmetic loses the small differences between fine-tunes: compute in >= fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ Model Stock
def mean_pairwise_cosine(deltas: Sequence[torch.Tensor]) -> Optional[float]:
    """The mean, over the k(k-1)/2 pairs, of the cosine between two flattened deltas (float64).

    A pair in which a delta has zero norm (that fine-tune left the tensor exactly where the
    pretrained weights had it) counts as cosine 0, as if orthogonal: it pulls the ratio towards
    the pretrained weights, the cautious side. None when every delta is zero (nothing moved).
    """
    flat = torch.stack([d.reshape(-1) for d in deltas]).double()
    gram = flat @ flat.T
    norms = gram.diag()
    if bool((norms == 0).all()):
        return None
    k = len(deltas)
    total = 0.0
    for i in range(k):
        for j in range(i + 1, k):
            denominator = math.sqrt(float(norms[i]) * float(norms[j]))  # exact for equal deltas: cos 1
            cosine = float(gram[i, j]) / denominator if denominator > 0 else 0.0
            total += min(1.0, max(-1.0, cosine))
    return total / (k * (k - 1) / 2)


def stock_ratio(cosine: float, k: int) -> float:
    """Model Stock's interpolation ratio t = k cos / (1 + (k - 1) cos), clamped to [0, 1].

    For cos in [0, 1] the formula is already in [0, 1] (cos 1 gives t 1). The paper derives it for
    fine-tunes whose deltas from the pretrained weights meet at one angle below 90 degrees, as it
    observed them to, and gives no rule for cos <= 0: there the formula turns negative (a step past
    the pretrained weights, away from the fine-tunes) and is infinite at cos = -1/(k - 1). We clamp
    it to 0: the tensor stays the pretrained one.
    """
    if cosine <= 0:
        return 0.0
    return min(1.0, k * cosine / (1.0 + (k - 1) * cosine))


def stock_tensor(pretrained: torch.Tensor, tuned: Sequence[torch.Tensor]
                 ) -> Tuple[torch.Tensor, Optional[float], Optional[float]]:
    """Model Stock for one tensor: (merged, cos, t), merged = t * mean(w_i) + (1 - t) * w0.

    The cosines in float64, the merge in float32 (float64 for float64 weights), returned in the
    fine-tunes' dtype. When no
    fine-tune moved the tensor (every delta zero) it is returned as it is, with cos and t None.
    """
    k = len(tuned)
    dtype = tuned[0].dtype
    accumulator = accumulator_dtype(dtype)
    base = pretrained.to(accumulator)
    start = pretrained.double()
    cosine = mean_pairwise_cosine([w.double() - start for w in tuned])  # deltas exact: float64 from either dtype
    del start
    if cosine is None:
        return tuned[0].clone(), None, None
    t = stock_ratio(cosine, k)
    mean = torch.zeros_like(base)
    for w in tuned:
        mean.add_(w.to(accumulator))
    mean.div_(k)
    merged = mean if t == 1.0 else mean * t + base * (1.0 - t)
    return merged.to(dtype), cosine, t


def summarise_by_block(values: Dict[str, Optional[float]], sizes: Dict[str, int]) -> Dict[str, Dict[str, Any]]:
    """Per block: the parameter-weighted mean, min and max of per-tensor `values` (None: skipped)."""
    blocks: Dict[str, Dict[str, Any]] = {}
    for key, value in values.items():
        entry = blocks.setdefault(block_of(key), {"t": None, "min": None, "max": None, "tensors": 0,
                                                  "_w": 0, "_s": 0.0})
        entry["tensors"] += 1
        if value is None:
            continue
        entry["_w"] += sizes[key]
        entry["_s"] += value * sizes[key]
        entry["min"] = value if entry["min"] is None else min(entry["min"], value)
        entry["max"] = value if entry["max"] is None else max(entry["max"], value)
    for entry in blocks.values():
        weight, total = entry.pop("_w"), entry.pop("_s")
        entry["t"] = total / weight if weight else None
    return {block: blocks[block] for block in sorted(blocks, key=block_rank)}


# ---------------------------------------------------------------------------------- learned soup
def learned_memory(k: int, params: int, batch_size: int, depth: int, tokens: int, width: int, heads: int
                   ) -> Dict[str, int]:
    """Bytes the learned soup holds at once, estimated: every ingredient's float tensors in float32
    (k * params * 4), three more model-sized float32 sets (the vessel model, the mixed weights and
    their gradients), and a training step's activations at `batch_size` (per block, in float32,
    ~4 * batch * tokens * (17 * width + 2.5 * heads * tokens) bytes: Korthikanti et al. 2022's
    count for a transformer layer, at 4 bytes an element)."""
    ingredients = k * params * 4
    working = 3 * params * 4
    activations = int(depth * 4 * batch_size * tokens * (17 * width + 2.5 * heads * tokens))
    return {"ingredients": ingredients, "working": working, "activations": activations,
            "total": ingredients + working + activations}


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory where the learned soup would run: CUDA's free memory, else MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    from .speed import available_memory_bytes
    return available_memory_bytes()


def check_fits(estimate: Dict[str, int], available: Optional[int], device: torch.device, k: int, params: int,
               batch_size: int) -> None:
    """A one-line refusal when the learned soup's estimate exceeds the free memory."""
    if available is None or estimate["total"] <= available:
        return
    raise FinetuneError(
        f"--method learned: needs about {estimate['total'] / GiB:.1f} GiB ({k} ingredients x {params / 1e6:.1f}M "
        f"params x 4 bytes = {estimate['ingredients'] / GiB:.1f} GiB, {estimate['working'] / GiB:.1f} GiB for the "
        f"model, mixed weights and gradients, {estimate['activations'] / GiB:.1f} GiB of activations at batch "
        f"{batch_size}) but {device} has {available / GiB:.1f} GiB free; use fewer ingredients, a smaller "
        "--batch-size, or --method greedy/uniform (they stream one tensor at a time)")


class LearnedMixture:
    """Softmax-weighted sums of k ingredients, per ingredient or per (block, ingredient), and a
    logit temperature, learned by gradient descent through `torch.func.functional_call`.

    As in model-soups' `learned_bylayer.py`: weights = softmax(raw) with raw initialised equal (so
    the start is the uniform soup), logits scaled by a learned scalar, cross-entropy, AdamW (lr 0.05,
    no weight decay, 5 epochs: the values its authors recommend). Two departures: the temperature is
    parametrised as exp(log T) so it stays positive, and tensors equal in every ingredient (and
    every non-float tensor) are held once, as constants, so they cost neither memory nor gradient;
    by-layer groups are blocks (`block_of`), not single tensors, so a small selection split fits
    ~depth + 5 groups of k weights instead of ~150.
    """

    def __init__(self, keys: Sequence[str], read: Callable[[str], List[torch.Tensor]], k: int,
                 device: torch.device, by_layer: bool = False):
        self.k, self.device, self.by_layer = k, device, by_layer
        self.dtypes: Dict[str, torch.dtype] = {}
        self.stacks: Dict[str, torch.Tensor] = {}      # key -> (k, *shape) float32/64, tensors that differ
        self.constants: Dict[str, torch.Tensor] = {}   # key -> tensor, equal in every ingredient
        self.sizes: Dict[str, int] = {}
        for key in keys:
            tensors = read(key)
            self.dtypes[key] = tensors[0].dtype
            self.sizes[key] = tensors[0].numel()
            if not tensors[0].dtype.is_floating_point or all(torch.equal(tensors[0], t) for t in tensors[1:]):
                self.constants[key] = tensors[0].to(device)
            else:
                accumulator = accumulator_dtype(tensors[0].dtype)
                stack = torch.empty((k, *tensors[0].shape), dtype=accumulator, device=device)
                for i, tensor in enumerate(tensors):
                    stack[i].copy_(tensor)
                self.stacks[key] = stack
            del tensors
        self.groups = sorted({block_of(key) for key in keys}, key=block_rank) if by_layer else ["all"]
        self.group_of = {key: self.groups.index(block_of(key)) if by_layer else 0 for key in keys}
        self.raw = torch.zeros(len(self.groups), k, device=device, requires_grad=True)
        self.log_temperature = torch.zeros((), device=device, requires_grad=True)

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.raw, dim=1)

    def parameters_of(self, weights: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The mixed state (constants included) for functional_call; differentiable in `weights`."""
        mixed = {key: torch.tensordot(weights[self.group_of[key]].to(stack.dtype), stack, dims=1)
                 for key, stack in self.stacks.items()}
        return {**self.constants, **mixed}

    @torch.no_grad()
    def state(self, weights: torch.Tensor) -> StateDict:
        """The soup at `weights`, on the CPU in the ingredients' dtypes (what is written and scored)."""
        return {key: value.to(self.dtypes[key]).cpu() for key, value in self.parameters_of(weights).items()}

    def learn(self, model: torch.nn.Module, batches: Callable[[], Iterable], score: Callable[[StateDict], float],
              start_score: float, epochs: int = 5, lr: float = 0.05, precision_context=None,
              loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> Dict[str, Any]:
        """AdamW on the selection split's batches, one pass an epoch; after each epoch the soup is
        scored by `score` and kept only if strictly better than the best so far, which starts at the
        uniform soup (`start_score`, epoch 0). Returns the record: the best epoch, its weights and
        temperature, and each epoch's mean loss and score. `loss_fn(logits, labels)`: the task's loss
        (default: cross-entropy; a multi-label soup learns on binary cross-entropy)."""
        from torch.func import functional_call
        import contextlib
        model = model.eval()  # no dropout / drop-path: the mixing weights see the network as it will run
        for p in model.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.AdamW([self.raw, self.log_temperature], lr=lr, weight_decay=0.0)
        best = {"epoch": 0, "score": start_score, "weights": self.weights().detach().clone(), "temperature": 1.0}
        history = [{"epoch": 0, "loss": None, "score": start_score, "kept": True}]
        for epoch in range(1, epochs + 1):
            losses, count = 0.0, 0
            for images, labels in batches():
                if labels.numel() == 0:
                    continue
                images, labels = images.to(self.device), labels.to(self.device)
                optimizer.zero_grad(set_to_none=True)
                with precision_context() if precision_context else contextlib.nullcontext():
                    logits = functional_call(model, self.parameters_of(self.weights()), (images,))
                loss = (loss_fn or F.cross_entropy)(logits.float() / self.log_temperature.exp(), labels)
                loss.backward()
                optimizer.step()
                losses += float(loss.detach()) * labels.numel()
                count += labels.numel()
            weights = self.weights().detach().clone()
            value = float(score(self.state(weights)))
            kept = value > best["score"]
            history.append({"epoch": epoch, "loss": losses / max(count, 1), "score": value, "kept": kept})
            if kept:
                best = {"epoch": epoch, "score": value, "weights": weights,
                        "temperature": float(self.log_temperature.detach().exp())}
        return {**best, "history": history}
