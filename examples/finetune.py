#!/usr/bin/env python
"""Transfer a pre-trained PMMRec to a target dataset: the installed `pmmrec-finetune` command, as a script.

    python examples/finetune.py --pretrained outputs/pretrain/pmmrec/model --setting full
    python examples/finetune.py --pretrained outputs/pretrain/pmmrec/model --setting full --lora

`python examples/finetune.py --help` (or `pmmrec-finetune --help`) lists every option; the code is
`pmmrec_hf/commands/finetune.py`.
"""

from pmmrec_hf.commands.finetune import DEFAULTS, WEIGHTS, build_parser, cli, main, parse_args  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(cli())
