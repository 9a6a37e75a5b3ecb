"""Publish a trained PMMRec checkpoint to the Hugging Face Hub: item encoder, user encoder (and full model) as
separate repos, each with its model card. A thin CLI over ``pmmrec_hf.hub.push_pmmrec_to_hub``.

    python examples/push_to_hub.py --checkpoint runs/pmmrec/final \\
        --item-encoder-repo me/pmmrec-item-encoder --user-encoder-repo me/pmmrec-user-encoder \\
        [--full-model-repo me/pmmrec] [--private] [--revision dev] [--commit-message "..."] [--token hf_...] \\
        [--tokenizer PATH_OR_REPO] [--image-processor PATH_OR_REPO] [--card-data card.json] [--require-trained]

``--checkpoint`` is a folder saved with ``save_pretrained`` (a tokenizer / image processor saved in it is published
too) or a Hub repo id. ``--card-data`` is a JSON file of ``PMMRecCardData`` fields, e.g.
``{"datasets": ["me/interactions"], "hyperparameters": {"learning_rate": 1e-4},
"eval_results": [{"dataset": "me/interactions", "split": "test", "metric": "ndcg@10", "value": 0.031}]}``.
Without ``--token`` the stored login (``hf auth login``) or ``HF_TOKEN`` is used.
"""

from __future__ import annotations

import argparse
import json
import sys

from pmmrec_hf.hub import PMMRecPublishError, push_pmmrec_to_hub


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder saved with save_pretrained, or a Hub repo id")
    parser.add_argument("--item-encoder-repo", help="repo for the item encoder (name or namespace/name)")
    parser.add_argument("--user-encoder-repo", help="repo for the user encoder")
    parser.add_argument("--full-model-repo", help="repo for the full model (optional)")
    parser.add_argument("--private", action="store_true", help="create new repos private")
    parser.add_argument("--revision", help="branch to commit to (created when missing)")
    parser.add_argument("--no-create-branch", action="store_true", help="fail if --revision does not exist")
    parser.add_argument("--commit-message", help="commit title")
    parser.add_argument("--token", help="Hub token with write access (default: stored login / HF_TOKEN)")
    parser.add_argument("--tokenizer", help="tokenizer folder or repo (default: the one saved in the checkpoint)")
    parser.add_argument("--image-processor", help="image processor folder or repo (default: the checkpoint's, or "
                                                  "PMMRec's image transform)")
    parser.add_argument("--card-data", help="JSON file of PMMRecCardData fields")
    parser.add_argument("--require-trained", action="store_true", help="refuse components that were never trained")
    parser.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    args = parser.parse_args(argv)
    if not (args.item_encoder_repo or args.user_encoder_repo or args.full_model_repo):
        parser.error("give at least one of --item-encoder-repo, --user-encoder-repo, --full-model-repo")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    card_data = None
    if args.card_data:
        with open(args.card_data, encoding="utf-8") as f:
            card_data = json.load(f)
    try:
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
    except (PMMRecPublishError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for component, info in commits.items():
        print(f"{component}: {info.repo_url.repo_id} @ {info.oid} ({info.commit_url})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
