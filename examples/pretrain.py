#!/usr/bin/env python
"""Pre-train PMMRec (or the SASRec ID baseline): the installed `pmmrec-train` command, as a script.

    python examples/pretrain.py                      # built-in synthetic dataset, a minute or two on a CPU
    accelerate launch examples/pretrain.py --dataset data/ml-100k --text-model ... --vision-model ...
    accelerate launch --multi_gpu --num_processes 2 examples/pretrain.py   # 2 GPUs, or 2 CPU processes without GPUs

`python examples/pretrain.py --help` (or `pmmrec-train --help`) lists every option; the code is
`pmmrec_hf/commands/train.py`.
"""

from pmmrec_hf.commands.train import DEFAULTS, WEIGHTS, build_parser, cli, main, parse_args  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(cli())
