"""`make bench`: every benchmark in its own process; the exit status is the worst of theirs.

Separate processes matter: Linux carries a parent's peak RSS into the children it starts, so a
parent that had imported torch would spoil the memory benchmark's readings.
"""
from __future__ import annotations

import subprocess
import sys

# bench_engine: the engine's training step (B_16 at 384, batch 4, precision and attention "auto")
# beside pytorch-pretrained-vit fp32, timm fp32 and timm bf16, with the issue-10 ratios (BENCHMARKS.md).
BENCHMARKS = ("benchmarks.bench_engine", "benchmarks.bench_attention", "benchmarks.bench_soup_memory")


def main() -> int:
    statuses = []
    for module in BENCHMARKS:
        print(f"\n=== {module}", flush=True)
        statuses.append(subprocess.run([sys.executable, "-m", module]).returncode)
    return max(statuses)


if __name__ == "__main__":
    sys.exit(main())
