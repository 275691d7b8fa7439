#!/usr/bin/env python
"""`python tools/compare.py --help`: the `finetune compare` command, runnable from a checkout."""
import sys
from pathlib import Path

try:
    import finetune  # noqa: F401
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.cli import compare_main

if __name__ == "__main__":
    compare_main(sys.argv[1:])
