"""Training throughput of the model we load: timm's fused attention (SDPA) vs plain attention.

    python -m benchmarks.bench_attention [--model vit_small_patch16_224] [--batch 16] [--steps 5]

The same VisionTransformer, the same weights and data, one forward+backward+SGD step at a time;
only `attn.fused_attn` differs. Reported as images/s and the ratio fused/plain, measured in one
run (absolute times drift on shared machines): the two are timed in alternating rounds and each
keeps its best round, so a noisy neighbour does not favour either. On CPU the two are close (the
fused kernel mostly saves memory); on a GPU (flash / memory-efficient kernels) fused must win:
there the benchmark exits 1 if fused is not at least as fast, which would mean the fast path is
not being taken.
"""
from __future__ import annotations

import argparse
import sys
import time

import timm
import torch


def images_per_second(model, batch: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    _step(model, optimizer, batch, labels)  # warm-up: allocator, kernels
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        _step(model, optimizer, batch, labels)
    _sync()
    return steps * batch.shape[0] / (time.perf_counter() - start)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step(model, optimizer, batch, labels) -> None:
    loss = torch.nn.functional.cross_entropy(model(batch), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def set_fused(model, fused: bool) -> None:
    for block in model.blocks:
        block.attn.fused_attn = fused


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = timm.create_model(args.model, pretrained=False, num_classes=10).train().to(device)
    size = model.patch_embed.img_size
    batch = torch.randn(args.batch, 3, *size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    rates = {"plain": 0.0, "fused (SDPA)": 0.0}
    for _ in range(args.rounds):
        for name, fused in (("plain", False), ("fused (SDPA)", True)):
            set_fused(model, fused)
            rates[name] = max(rates[name], images_per_second(model, batch, labels, args.steps))
    ratio = rates["fused (SDPA)"] / rates["plain"]
    print(f"{args.model}, batch {args.batch}, best of {args.rounds} rounds of {args.steps} steps, {device}"
          f"{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}")
    for name, rate in rates.items():
        print(f"  {name:14} {rate:8.1f} img/s")
    print(f"  fused / plain  {ratio:8.2f}x")
    return 1 if device.type == "cuda" and ratio < 1.0 else 0


if __name__ == "__main__":
    sys.exit(main())
