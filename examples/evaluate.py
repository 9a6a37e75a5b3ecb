#!/usr/bin/env python
"""Evaluate a checkpoint by full ranking over all items: the installed `pmmrec-evaluate` command, as a script.

    python examples/evaluate.py --model outputs/pretrain/pmmrec/model --split test
    accelerate launch --multi_gpu --num_processes 2 examples/evaluate.py --model ...   # work split over processes

`python examples/evaluate.py --help` (or `pmmrec-evaluate --help`) lists every option; the code is
`pmmrec_hf/commands/evaluate.py`.
"""

import os
import sys

# this file is named like the Hugging Face `evaluate` package: keep its folder off the import path so that
# `import evaluate` anywhere in the process finds the package, not this script
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]

from pmmrec_hf.commands.evaluate import build_parser, cli, main, parse_args  # noqa: E402, F401

if __name__ == "__main__":
    raise SystemExit(cli())
