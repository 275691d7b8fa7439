"""`optimizer.step()` of torch's SGD / AdamW over a ViT's parameters: single-tensor, foreach, fused.

    python -m benchmarks.optimizer_step [--opt momentum|adamw] [--model vit_base_patch16_384] [--rounds 8]

The measurement behind `finetune.speed.optimizer_kwargs` (BENCHMARKS.md). Three copies of the model,
each with its optimizer built by timm's create_optimizer_v2 as the engine builds it; every round runs
a small forward+backward (64 px: the gradients are as large as at any resolution) then times the
step, for the three in turn. Median milliseconds after one warm-up round.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opt", default="momentum", choices=["momentum", "adamw"])
    parser.add_argument("--model", default="vit_base_patch16_384")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    import timm
    import torch
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2

    model = timm.create_model(args.model, pretrained=False, num_classes=37, img_size=64).train()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 37, (4,))
    flags = {"single-tensor": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    models = {name: copy.deepcopy(model) for name in flags}
    extra = {"momentum": 0.9} if args.opt == "momentum" else {}
    optimizers = {name: create_optimizer_v2(models[name], opt=args.opt, lr=0.002, weight_decay=0.05, **extra, **kw)
                  for name, kw in flags.items()}
    times = {name: [] for name in flags}
    for round_ in range(args.rounds + 1):
        for name in flags:
            F.cross_entropy(models[name](x), y).backward()
            start = time.perf_counter()
            optimizers[name].step()
            seconds = time.perf_counter() - start
            optimizers[name].zero_grad(set_to_none=True)
            if round_:
                times[name].append(seconds)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.opt}, {args.model} ({params:.0f}M parameters), {torch.get_num_threads()} threads, "
          f"median of {args.rounds}:")
    for name, seconds in times.items():
        print(f"  {name:14} {1e3 * statistics.median(seconds):7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
