"""Which engine settings pay on this machine: engine variants beside the baselines, one process.

    python -m benchmarks.engine_variants [--model B_16] [--img-size 384] [--batch-size 4] [--steps 4]

Not part of `make bench` (seven contenders of a B_16 step take a quarter of an hour on 2 cores); it
is the measurement behind the choices in finetune/speed.py and the tables of BENCHMARKS.md. Each
variant is `engine.train_one_epoch` on its own copy of the model with a given precision, attention
kernel and optimizer flags (`speed.optimizer_kwargs` = the fused optimizer); the baselines are
finetune.bench's hand-written loops. Reported: median img/s by wall clock, the paired per-round
ratio to pytorch-pretrained-vit fp32 and timm bf16, and the same by CPU time (robust to other jobs
on the machine; see finetune.bench.cpu_time_view).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys

VARIANTS = (  # label, precision, attention, fused optimizer
    ("engine fp32, fused attention (default here)", "fp32", "fused", False),
    ("engine fp32, fused attention, fused SGD", "fp32", "fused", True),
    ("engine fp32, explicit attention, fused SGD", "fp32", "explicit", True),
    ("engine bf16, explicit attention, fused SGD", "bf16", "explicit", True),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="B_16")
    parser.add_argument("--img-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    import torch
    from timm.optim import create_optimizer_v2
    from finetune import bench as B, engine, speed
    from finetune.recipes import recipe_from_dict

    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    model, weights = B.bench_model(args.model, 37, args.img_size)
    model.to(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator)
    labels = torch.randint(0, 37, (args.batch_size,), generator=generator)
    loader = B.RepeatedBatch(images, labels, 1)

    def variant(precision: str, attention: str, fused_optimizer: bool):
        net = copy.deepcopy(model).train()
        speed.set_attention(net, attention)
        recipe = recipe_from_dict({"name": "variant", "model": args.model, "img_size": args.img_size, "epochs": 1,
                                   "batch_size": args.batch_size, "precision": precision,
                                   "optimizer": dict(B.BENCH_OPTIMIZER), "schedule": {"name": "none"},
                                   "data": {"dataset": "digits", "workers": 0, "augment": "none"}})
        optimizer = engine.build_optimizer(recipe, net)
        if fused_optimizer:  # what engine.build_optimizer gives once it passes speed.optimizer_kwargs
            o = recipe.optimizer
            optimizer = create_optimizer_v2(net, opt=engine.TIMM_OPTIMIZERS[o.name], lr=o.lr,
                                            weight_decay=o.weight_decay, momentum=o.momentum,
                                            **speed.optimizer_kwargs(device))
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        return lambda: engine.train_one_epoch(net, loader, optimizer, scaler, recipe=recipe, epoch=1, device=device,
                                              progress=False)

    contenders = {label: variant(p, a, f) for label, p, a, f in VARIANTS}
    baselines = B._baselines(model, device, images, labels, print)
    contenders.update({"ppv fp32": baselines["ppv_fp32"], "timm fp32": baselines["timm_fp32"],
                       "timm bf16, fused attention": baselines["timm_bf16"]})
    print(f"{args.model} ({weights}), {args.img_size}px, batch {args.batch_size}, {B._device_label(device)}; "
          f"1 warm-up + {args.steps} rounds", flush=True)
    cpu: dict = {}
    wall = B.time_rounds(contenders, device, args.steps, 1, lambda m: print(m, flush=True), cpu=cpu)
    ppv, bf16 = "ppv fp32", "timm bf16, fused attention"
    print(f"\n{'contender':46} {'img/s':>7} {'vs ppv':>7} {'vs bf16':>8} | {'CPU s':>6} {'img/s':>7} "
          f"{'vs ppv':>7} {'vs bf16':>8}   (left: wall clock, paired medians; right: by CPU time)")
    threads = torch.get_num_threads()
    for name, seconds in wall.items():
        c = statistics.median(cpu[name])
        print(f"{name:46} {args.batch_size / statistics.median(seconds):7.3f} "
              f"{statistics.median(b / s for b, s in zip(wall[ppv], seconds)):6.2f}x "
              f"{statistics.median(b / s for b, s in zip(wall[bf16], seconds)):7.2f}x | {c:6.1f} "
              f"{args.batch_size * threads / c:7.3f} {statistics.median(cpu[ppv]) / c:6.2f}x "
              f"{statistics.median(cpu[bf16]) / c:7.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"wall": wall, "cpu": cpu}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
