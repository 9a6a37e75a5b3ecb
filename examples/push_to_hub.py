#!/usr/bin/env python
"""Publish a trained PMMRec checkpoint to the Hub: the installed `pmmrec-push` command, as a script.

    python examples/push_to_hub.py --checkpoint outputs/pretrain/pmmrec/model \\
        --item-encoder-repo me/pmmrec-item-encoder --user-encoder-repo me/pmmrec-user-encoder

`python examples/push_to_hub.py --help` (or `pmmrec-push --help`) lists every option; the code is
`pmmrec_hf/commands/push.py`.
"""

from pmmrec_hf.commands.push import build_parser, cli, main, parse_args  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(cli())
