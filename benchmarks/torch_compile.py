"""Does `torch.compile` pay for a ViT training step here? Compile time vs per-step speedup.

    python -m benchmarks.torch_compile [--model vit_small_patch16_224] [--img-size 224] [--batch 8] [--rounds 5]

One model, eager and `torch.compile(model)` (inductor, default mode) stepping the same weights with
one momentum SGD; the first compiled step (compilation) is timed apart, then eager and compiled
steps alternate. Prints the speedup and after how many steps the compilation has paid for itself.
The measurement behind BENCHMARKS.md's "torch.compile" row (not part of `make bench`: compiling
takes minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import timm
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=37, img_size=args.img_size).train()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 37, (args.batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    compiled = torch.compile(model)

    def step(net) -> float:
        start = time.perf_counter()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(model)
    compile_s = step(compiled)
    step(compiled)
    times = {"eager": [], "compiled": []}
    for round_ in range(args.rounds):
        pair = (("eager", model), ("compiled", compiled))
        for name, net in (pair if round_ % 2 == 0 else pair[::-1]):
            times[name].append(step(net))
    eager, fast = statistics.median(times["eager"]), statistics.median(times["compiled"])
    gain = eager - fast
    print(f"{args.model} at {args.img_size}px, batch {args.batch}, {torch.get_num_threads()} threads: "
          f"first compiled step (compilation) {compile_s:.0f} s; eager {eager:.3f} s/step, compiled {fast:.3f} s/step "
          f"(median of {args.rounds}): {eager / fast:.2f}x; "
          + (f"pays for itself after {compile_s / gain:.0f} steps" if gain > 0 else "never pays for itself"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
