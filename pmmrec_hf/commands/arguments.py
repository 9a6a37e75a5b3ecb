"""What the training commands share: their argument groups, and turning parsed arguments into the data, the model
and the collator (``pmmrec-train``, ``pmmrec-finetune``, ``pmmrec-evaluate``; ``examples/*.py`` call them)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields
from typing import Any

from ..configuration_pmmrec import PMMRecConfig, PMMRecItemEncoderConfig, PMMRecUserEncoderConfig
from ..modeling_pmmrec import PMMRecItemEncoder, PMMRecModel
from ..training import TrainingConfig

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", nargs="+", default=[SYNTHETIC],
                       help="'synthetic' (built in, the default), a prepared folder (pmmrec-prepare) or a Hub dataset id; "
                            "several: pre-train on all of them (ids prefixed per platform, see --mixture-*)")
    group.add_argument("--mixture-sampling", default="proportional", choices=["proportional", "uniform", "temperature"],
                       help="several datasets: which platform the next training row comes from (proportional to its "
                            "users; uniform; or proportional to users ** (1 / --mixture-temperature))")
    group.add_argument("--mixture-temperature", type=float, default=2.0)
    group.add_argument("--mixture-batches", default="mixed", choices=["mixed", "per-platform"],
                       help="several datasets: batches mix platforms, or every step (all processes) holds one "
                            "platform's users, so in-batch negatives are items of the user's own platform")
    group.add_argument("--streaming", action="store_true", help="stream the training split (datasets streaming=True)")
    group.add_argument("--eval-split", default="validation", choices=["validation", "test"])
    group.add_argument("--repeated-targets", default="rank", choices=["rank", "miss"],
                       help="evaluation: a target the user already has in its history is ranked (rank, the default) "
                            "or counted as a miss (miss: the research code, which masks the whole history)")
    group.add_argument("--max-eval-users", type=int, default=None, help="evaluate on the first N users only")
    group.add_argument("--synthetic-users", type=int, default=2000)
    group.add_argument("--synthetic-items", type=int, default=500)
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (image decoding happens there)")
    group.add_argument("--train-fraction", type=float, default=1.0,
                       help="train on this fraction of the training users (seeded, nested: the users of a smaller "
                            "fraction are among those of a larger one); evaluation keeps every user")
    group.add_argument("--train-fraction-seed", type=int, default=0, help="the seed of the --train-fraction subset")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model-type", default="pmmrec", choices=["pmmrec", "sasrec"],
                       help="pmmrec, or the ID-based SASRec baseline on the same data and metrics")
    group.add_argument("--text-model", default=None, help="text backbone: Hub id or local folder")
    group.add_argument("--vision-model", default=None, help="vision backbone: Hub id or local folder")
    group.add_argument("--modality", default="multimodal", choices=["multimodal", "text", "vision"])
    group.add_argument("--hidden-size", type=int, default=None, help="item/user embedding size d")
    group.add_argument("--text-trainable-layers", type=int, default=None, help="-1: whole tower")
    group.add_argument("--vision-trainable-layers", type=int, default=None, help="-1: whole tower")
    group.add_argument("--max-length", type=int, default=20, help="L, the user sequence length")
    group.add_argument("--max-text-length", type=int, default=None)
    group.add_argument("--image-size", type=int, default=None)
    group.add_argument("--dropout", type=float, default=None,
                       help="every dropout of the fusion and the user encoder (and of the built-in backbones); default: each config's own (0.1)")
    group.add_argument("--research-image-transform", action="store_true",
                       help="squash to image_size and normalise with 0.5 (the research code) instead of the "
                            "vision model's own image processor")


def add_objective_args(parser: argparse.ArgumentParser, defaults: dict[str, float]) -> None:
    group = parser.add_argument_group("objectives")
    for name in ("next_item", "nicl", "nid", "rcl"):
        group.add_argument(f"--{name.replace('_', '-')}-weight", type=float, default=defaults[name])
    group.add_argument("--nicl-temperature", type=float, default=0.1)
    group.add_argument("--rcl-temperature", type=float, default=0.1)
    group.add_argument("--replace-prob", type=float, default=0.1, help="NID/RCL corruption: item replacement")
    group.add_argument("--shuffle-prob", type=float, default=0.1, help="NID/RCL corruption: span shuffle")
    group.add_argument("--no-logq", action="store_true", help="disable the log-popularity correction")
    group.add_argument("--next-item-similarity", choices=("dot", "cosine"), default=None,
                       help="next-item scoring: dot (the research code; default for a new model) or cosine "
                            "(L2-normalised embeddings, use with --next-item-temperature ~0.07); fine-tuning keeps "
                            "the pre-trained model's unless given")
    group.add_argument("--next-item-temperature", type=float, default=None,
                       help="next-item logits are divided by it (default 1.0 for a new model)")


def add_training_args(parser: argparse.ArgumentParser, defaults: TrainingConfig) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--output-dir", default=defaults.output_dir)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, help="users per process per step")
    group.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size,
                       help="users per evaluation batch (under N processes, batch k is ranked by process k %% N)")
    group.add_argument("--catalogue-batch-size", type=int, default=defaults.catalogue_batch_size,
                       help="items per batch when the catalogue is embedded for evaluation")
    group.add_argument("--gradient-accumulation-steps", type=int, default=defaults.gradient_accumulation_steps,
                       help="default: the launcher's / `accelerate config`'s, else 1")
    group.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    group.add_argument("--tower-learning-rate", type=float, default=defaults.tower_learning_rate,
                       help="learning rate of the backbone towers (default: --learning-rate)")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--tower-weight-decay", type=float, default=defaults.tower_weight_decay)
    group.add_argument("--lr-scheduler", default=defaults.lr_scheduler,
                       help="transformers scheduler name: constant_with_warmup, linear, cosine, ...")
    group.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    group.add_argument("--max-steps", type=int, default=defaults.max_steps)
    group.add_argument("--num-epochs", type=int, default=defaults.num_epochs)
    group.add_argument("--eval-steps", type=int, default=defaults.eval_steps)
    group.add_argument("--save-steps", type=int, default=defaults.save_steps, help="checkpoint every N steps (0: off)")
    group.add_argument("--logging-steps", type=int, default=defaults.logging_steps)
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--mixed-precision", default=defaults.mixed_precision, choices=["no", "fp16", "bf16"],
                       help="default: the launcher's (`accelerate launch --mixed_precision`) or `accelerate config`'s, "
                            "else no")
    group.add_argument("--report-to", default=defaults.report_to, help="tensorboard, wandb, all, or none")
    group.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    group.add_argument("--max-grad-norm", type=float, default=None)
    group.add_argument("--on-non-finite", default=defaults.on_non_finite, choices=["raise", "skip"],
                       help="a non-finite loss or gradient: stop with an error naming the step (raise, default) or "
                            "skip that optimiser step, counted in trainer_state.json (skip)")
    group.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument("--save-total-limit", type=int, default=defaults.save_total_limit,
                       help="keep at most N checkpoints (the oldest are deleted; the best one is always kept)")
    group.add_argument("--metric-for-best-model", default=defaults.metric_for_best_model,
                       help="an evaluation metric (e.g. ndcg@10): every evaluation that improves it is checkpointed")
    group.add_argument("--greater-is-better", action=argparse.BooleanOptionalAction, default=defaults.greater_is_better,
                       help="whether a larger --metric-for-best-model is better (default: yes)")
    group.add_argument("--early-stopping-patience", type=int, default=defaults.early_stopping_patience,
                       help="stop after N evaluations without improvement of --metric-for-best-model")
    group.add_argument("--early-stopping-threshold", type=float, default=defaults.early_stopping_threshold,
                       help="an improvement must exceed this")
    group.add_argument("--load-best-model-at-end", action="store_true", default=defaults.load_best_model_at_end,
                       help="the final model/ is the best checkpoint on --metric-for-best-model")


def training_config_from_args(args: argparse.Namespace) -> TrainingConfig:
    names = {f.name for f in fields(TrainingConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainingConfig(**values)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedData:
    items: Any  # what PMMRecCollator accepts as its item table
    train: Any
    eval_rows: list
    train_counts: list[int]
    name: str
    mixture: Any = None  # pmmrec_hf.data.mixture.DatasetMixture when several datasets are mixed

    def batch_sampler(self, args: argparse.Namespace, num_processes: int = 1):
        """The per-platform batch sampler asked for by --mixture-batches (None for mixed batches)."""
        if self.mixture is None or getattr(args, "mixture_batches", "mixed") == "mixed":
            return None
        from ..data.mixture import PlatformBatchSampler

        if self.mixture.row_platform is None:
            raise ValueError("--mixture-batches per-platform needs map-style data: drop --streaming.")
        return PlatformBatchSampler(self.mixture.row_platform, args.batch_size, self.mixture.probabilities,
                                    group=num_processes)


def load_data(args: argparse.Namespace, process_index: int = 0, num_processes: int = 1) -> LoadedData:
    """The training split (sharded per process when streaming), the evaluation rows and the item table."""
    datasets_given = [args.dataset] if isinstance(args.dataset, str) else list(args.dataset)
    if len(datasets_given) > 1:
        return _load_mixture(args, datasets_given, process_index, num_processes)
    dataset = datasets_given[0]
    if dataset == SYNTHETIC:
        from ..data.synthetic import make_synthetic_dataset

        data = make_synthetic_dataset(num_items=args.synthetic_items, num_users=args.synthetic_users,
                                      seed=args.seed, max_length=args.max_length)
        items, train, eval_split = data.items, data.splits["train"], data.splits[args.eval_split]
    else:
        from ..data.format import load_items, load_prepared, shard_for_process

        items, _ = load_items(dataset, decode_images=False)
        splits = load_prepared(dataset)
        eval_split = splits[args.eval_split]
        if args.streaming:
            stream = load_prepared(dataset, streaming=True, split="train")
            train = shard_for_process(stream, process_index, num_processes, seed=args.seed)
        else:
            train = splits["train"]
    train = _train_fraction(args, train)
    eval_rows = [dict(row) for row in eval_split]
    if args.max_eval_users is not None:
        eval_rows = eval_rows[: args.max_eval_users]
    counts = list(items["train_count"])
    return LoadedData(items=items, train=train, eval_rows=eval_rows, train_counts=counts, name=str(dataset))


def _train_fraction(args: argparse.Namespace, train):
    """The --train-fraction subset of the training rows (the rows themselves at 1.0)."""
    fraction = getattr(args, "train_fraction", 1.0)
    if fraction == 1.0:
        return train
    from ..data.format import subset_users

    return subset_users(train, fraction, seed=getattr(args, "train_fraction_seed", 0))


def _load_mixture(args: argparse.Namespace, folders: list[str], process_index: int, num_processes: int) -> LoadedData:
    """Several prepared datasets mixed (``pmmrec_hf.data.mixture``); evaluation on every platform's users."""
    from ..data.format import shard_for_process
    from ..data.mixture import mix_prepared

    if SYNTHETIC in folders:
        raise ValueError("--dataset: the built-in 'synthetic' dataset cannot be mixed; prepare it to a folder first "
                         "(pmmrec_hf.data.make_synthetic_dataset(..., output_dir=...)).")
    mixture = mix_prepared(folders, sampling=args.mixture_sampling, temperature=args.mixture_temperature,
                           seed=args.seed, streaming=args.streaming)
    logger.info("Mixing %s", mixture.describe())
    train = _train_fraction(args, mixture.train)
    if train is not mixture.train and mixture.row_platform is not None:
        mixture.row_platform = list(train["platform"])
    if args.streaming:
        train = shard_for_process(train, process_index, num_processes, seed=args.seed)
    eval_split = mixture.validation if args.eval_split == "validation" else mixture.test
    eval_rows = [dict(row) for row in eval_split]
    if args.max_eval_users is not None:
        eval_rows = eval_rows[: args.max_eval_users]
    return LoadedData(items=mixture.items, train=train, eval_rows=eval_rows,
                      train_counts=list(mixture.items["train_count"]), name=" + ".join(mixture.names), mixture=mixture)


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------


def tiny_backbone_configs(vocab_size: int, image_size: int = 32, hidden: int = 64, dropout: float | None = None):
    """Small randomly initialised backbones for the built-in synthetic dataset (no download). `dropout` sets
    every dropout of both (default: BERT's 0.1, CLIP vision's 0.0)."""
    from transformers import BertConfig, CLIPVisionConfig

    text_drop = {} if dropout is None else dict(attention_probs_dropout_prob=dropout)
    vision_drop = {} if dropout is None else dict(attention_dropout=dropout, dropout=dropout)
    text = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=64,
                      hidden_dropout_prob=0.1 if dropout is None else dropout, **text_drop)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=8, **vision_drop)
    return text, vision


def load_tokenizer_and_processor(args: argparse.Namespace):
    """The tokenizer (the text model's, or the synthetic vocabulary's) and image processor (or None for the
    research-code transform)."""
    tokenizer = image_processor = None
    if args.modality != "vision":
        if args.text_model:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.text_model)
        else:
            from ..data.synthetic import synthetic_tokenizer

            tokenizer = synthetic_tokenizer()
    if args.modality != "text" and args.vision_model and not args.research_image_transform:
        from transformers import AutoImageProcessor

        try:
            image_processor = AutoImageProcessor.from_pretrained(args.vision_model)
        except (OSError, ValueError):
            logger.warning("No image processor in %s: using the squash-and-normalise transform.", args.vision_model)
    return tokenizer, image_processor


def scoring_overrides(args: argparse.Namespace, new_model: bool) -> dict[str, Any]:
    """The next-item scoring fields given on the command line; a new model gets the defaults (dot, 1.0) for the
    rest, a fine-tuned one keeps its pre-trained values (changing the scoring under a trained model breaks it)."""
    values = {"next_item_similarity": getattr(args, "next_item_similarity", None),
              "next_item_temperature": getattr(args, "next_item_temperature", None)}
    if new_model:
        values = {"next_item_similarity": values["next_item_similarity"] or "dot",
                  "next_item_temperature": values["next_item_temperature"] or 1.0}
    return {k: v for k, v in values.items() if v is not None}


def build_model(args: argparse.Namespace, tokenizer, num_items: int | None = None):
    """A fresh model for pre-training (PMMRec around the given or built-in backbones, or SASRec)."""
    objective = dict(
        next_item_weight=args.next_item_weight, nicl_weight=args.nicl_weight, nid_weight=args.nid_weight,
        rcl_weight=args.rcl_weight, nicl_temperature=args.nicl_temperature, rcl_temperature=args.rcl_temperature,
        replace_prob=args.replace_prob, shuffle_prob=args.shuffle_prob, logq_correction=not args.no_logq,
        **scoring_overrides(args, new_model=True),
    )
    builtin = not args.text_model and not args.vision_model
    d = args.hidden_size or (64 if builtin else 768)
    user_kwargs = dict(hidden_size=d, num_attention_heads=2, intermediate_size=4 * d if not builtin else 2 * d,
                       max_position_embeddings=args.max_length)
    dropout = getattr(args, "dropout", None)
    if dropout is not None:
        user_kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if args.model_type == "sasrec":
        from ..sasrec import SASRecConfig, SASRecModel

        return SASRecModel(SASRecConfig(num_items=num_items, logq_correction=not args.no_logq,
                                        **scoring_overrides(args, new_model=True), **user_kwargs))
    user_config = PMMRecUserEncoderConfig(**user_kwargs)
    item_kwargs: dict[str, Any] = {"hidden_size": d}
    for name in ("text_trainable_layers", "vision_trainable_layers", "max_text_length", "image_size"):
        if getattr(args, name) is not None:
            item_kwargs[name] = getattr(args, name)
    if dropout is not None:
        item_kwargs["fusion_dropout"] = dropout
    if args.modality != "multimodal":
        objective["nicl_weight"] = 0.0
    if builtin:
        text, vision = tiny_backbone_configs(len(tokenizer), image_size=args.image_size or 32, hidden=d,
                                             dropout=dropout)
        item_kwargs.setdefault("text_trainable_layers", -1)
        item_kwargs.setdefault("vision_trainable_layers", -1)
        item_kwargs.setdefault("image_size", 32)
        item_kwargs.setdefault("max_text_length", 32)
        item_config = PMMRecItemEncoderConfig(
            text_config=text if args.modality != "vision" else None,
            vision_config=vision if args.modality != "text" else None,
            modality=args.modality, fusion_num_attention_heads=2, fusion_intermediate_size=2 * d, **item_kwargs,
        )
        return PMMRecModel(PMMRecConfig(item_encoder_config=item_config, user_encoder_config=user_config,
                                        nicl_projection_size=min(d, 256), **objective))
    item_encoder = PMMRecItemEncoder.from_backbones_pretrained(
        args.text_model if args.modality != "vision" else None,
        args.vision_model if args.modality != "text" else None,
        modality=args.modality, **item_kwargs,
    )
    return PMMRecModel.from_encoders(item_encoder, PMMRecModel(PMMRecConfig(
        item_encoder_config=item_encoder.config, user_encoder_config=user_config, **objective)).user_encoder,
        **objective)


def build_collator(model, items, tokenizer, image_processor, max_length: int):
    """The training collator matching the model (corruption is applied in the training loop, per step)."""
    from ..data.collator import PMMRecCollator

    if not hasattr(model.config, "item_encoder_config"):  # SASRec: ids only
        return PMMRecCollator(items, modality="ids", max_length=max_length)
    return PMMRecCollator.from_config(model.config, items, tokenizer, image_processor, max_length=max_length,
                                      replace_prob=0.0, shuffle_prob=0.0)
