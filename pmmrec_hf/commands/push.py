"""``pmmrec-push``: publish a trained PMMRec checkpoint to the Hugging Face Hub, each component its own repo.

A thin command over :func:`pmmrec_hf.hub.push_pmmrec_to_hub`."""

from __future__ import annotations

import argparse
import json
import sys

from ._common import new_parser, show_defaults, run_cli
from .environment import HubUnavailableError, ensure_hub_access, hub_repo_ids
from .run_config import add_config_argument, parse_args_with_config

PROG = "pmmrec-push"

DESCRIPTION = """\
Publish a trained PMMRec checkpoint to the Hugging Face Hub: the item encoder, the user encoder (and the full
model) as separate repos, each with its config, weights, the code for trust_remote_code, the tokenizer / image
processor and a model card.

--checkpoint is a folder saved with save_pretrained (a tokenizer / image processor saved in it is published too)
or a Hub repo id. --card-data is a JSON file of PMMRecCardData fields, e.g.
{"datasets": ["me/interactions"], "hyperparameters": {"learning_rate": 1e-4},
 "eval_results": [{"dataset": "me/interactions", "split": "test", "metric": "ndcg@10", "value": 0.031}]}.
Without --token the stored login (`hf auth login`) or HF_TOKEN is used. Options can come from a YAML/JSON file
(--config); flags override it."""

EPILOG = """\
examples:
  pmmrec-push --checkpoint outputs/pretrain/pmmrec/model \\
      --item-encoder-repo me/pmmrec-item-encoder --user-encoder-repo me/pmmrec-user-encoder
  pmmrec-push --checkpoint outputs/finetune/full/model --full-model-repo me/pmmrec-hm --private --revision dev"""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, DESCRIPTION, EPILOG)
    add_config_argument(parser)
    what = parser.add_argument_group("what to publish")
    what.add_argument("--checkpoint", required=True, help="folder saved with save_pretrained, or a Hub repo id")
    what.add_argument("--item-encoder-repo", help="repo for the item encoder (name or namespace/name)")
    what.add_argument("--user-encoder-repo", help="repo for the user encoder")
    what.add_argument("--full-model-repo", help="repo for the full model (optional)")
    what.add_argument("--tokenizer", help="tokenizer folder or repo (default: the one saved in the checkpoint)")
    what.add_argument("--image-processor", help="image processor folder or repo (default: the checkpoint's, or "
                                                "PMMRec's image transform)")
    what.add_argument("--card-data", help="JSON file of PMMRecCardData fields")
    what.add_argument("--require-trained", action="store_true", help="refuse components that were never trained")
    how = parser.add_argument_group("how")
    how.add_argument("--private", action="store_true", help="create new repos private")
    how.add_argument("--revision", help="branch to commit to (created when missing)")
    how.add_argument("--no-create-branch", action="store_true", help="fail if --revision does not exist")
    how.add_argument("--commit-message", help="commit title")
    how.add_argument("--token", help="Hub token with write access (default: stored login / HF_TOKEN)")
    how.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    return show_defaults(parser)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    if not (args.item_encoder_repo or args.user_encoder_repo or args.full_model_repo):
        parser.error("give at least one of --item-encoder-repo, --user-encoder-repo, --full-model-repo")
    return args


def main(argv=None) -> int:
    from ..hub import PMMRecPublishError, push_pmmrec_to_hub

    args = parse_args(argv)
    card_data = None
    try:
        ensure_hub_access(hub_repo_ids(args.checkpoint), PROG, write=True, endpoint=args.endpoint)
        if args.card_data:
            with open(args.card_data, encoding="utf-8") as f:
                card_data = json.load(f)
        commits = push_pmmrec_to_hub(
            args.checkpoint,
            item_encoder_repo=args.item_encoder_repo,
            user_encoder_repo=args.user_encoder_repo,
            full_model_repo=args.full_model_repo,
            token=args.token,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            tokenizer=args.tokenizer,
            image_processor=args.image_processor,
            card_data=card_data,
            create_branch=not args.no_create_branch,
            require_trained=args.require_trained,
            endpoint=args.endpoint,
        )
    except (PMMRecPublishError, HubUnavailableError, ValueError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    for component, info in commits.items():
        print(f"{component}: {info.repo_url.repo_id} @ {info.oid} ({info.commit_url})")
    return 0


def cli(argv=None) -> int:
    return run_cli(PROG, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
