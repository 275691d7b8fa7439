#!/usr/bin/env python
"""`python tools/soup.py --help`: the `finetune soup` command, runnable from a checkout."""
import sys
from pathlib import Path

try:
    import finetune  # noqa: F401
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.cli import soup_main

if __name__ == "__main__":
    soup_main(sys.argv[1:])
