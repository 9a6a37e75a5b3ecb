"""Model cards: Hub metadata round trip, content, and the committed example cards (up to date, snippets run).

Regenerate the committed examples (``model_cards/*_example.md``) with::

    python tests/test_model_card.py
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import BertConfig, BertTokenizer, CLIPVisionConfig

from pmmrec_hf import PMMRecConfig, PMMRecItemEncoderConfig, PMMRecModel, PMMRecUserEncoderConfig
from pmmrec_hf.hub import looks_untrained, push_pmmrec_to_hub
from pmmrec_hf.model_card import CITATION, PMMRecCardData, backbone_base_models, render_model_card
from hub_server import DEFAULT_TOKENS, LocalHubServer, use_local_hub

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = ROOT / "model_cards"
EXAMPLE_FILES = {
    "item_encoder": "item_encoder_example.md",
    "user_encoder": "user_encoder_example.md",
    "full_model": "full_model_example.md",
}
EXAMPLE_ORG = "example-org"
EXAMPLE_REPOS = {
    "item_encoder": f"{EXAMPLE_ORG}/pmmrec-tiny-item-encoder",
    "user_encoder": f"{EXAMPLE_ORG}/pmmrec-tiny-user-encoder",
    "full_model": f"{EXAMPLE_ORG}/pmmrec-tiny",
}
ALICE = "hf_local_alice"
NUM_ITEMS, IMAGE, VOCAB_WORDS = 20, 30, (
    "red blue green black brown white cotton denim wooden ceramic leather t - shirt jacket desk lamp mug boots "
    "hat chair table book pen bag"
).split()


# --------------------------------------------------------------------------------------------------
# a tiny model, its tokenizer, a few training steps and a real (tiny) evaluation: the example cards
# --------------------------------------------------------------------------------------------------


def tiny_tokenizer() -> BertTokenizer:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + VOCAB_WORDS
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, model_max_length=64)


def tiny_card_config(modality: str = "multimodal") -> PMMRecConfig:
    text = BertConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, vocab_size=99,
                      max_position_embeddings=64)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
                              image_size=IMAGE, patch_size=10)
    item = PMMRecItemEncoderConfig(
        text_config=text if modality != "vision" else None, vision_config=vision if modality != "text" else None,
        modality=modality, hidden_size=16, fusion_num_attention_heads=2, fusion_intermediate_size=24,
        image_size=IMAGE, max_text_length=8,
    )
    user = PMMRecUserEncoderConfig(hidden_size=16, intermediate_size=32, max_position_embeddings=5)
    return PMMRecConfig(item_encoder_config=item, user_encoder_config=user, nicl_projection_size=8,
                        nicl_weight=0.4 if modality == "multimodal" else 0.0)


def tiny_model(seed: int = 0, modality: str = "multimodal") -> PMMRecModel:
    torch.manual_seed(seed)
    return PMMRecModel(tiny_card_config(modality)).eval()


def _catalogue(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 5 + len(VOCAB_WORDS), (NUM_ITEMS, 6), generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(NUM_ITEMS, 3, IMAGE, IMAGE, generator=g),
    }


def _sequences(num_users: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(NUM_ITEMS, generator=g)[:length] for _ in range(num_users)])  # (U, length)


TRAINING = {"optimizer": "AdamW", "learning_rate": 1e-3, "weight_decay": 0.0, "steps": 10, "users per step": 8,
            "max sequence length L": 5, "seed": 0}


def trained_tiny_model() -> PMMRecModel:
    """The tiny model after a few AdamW steps on random sequences over a 20-item catalogue (a smoke test, not a
    useful recommender)."""
    model = tiny_model(0).train()
    catalogue = _catalogue(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=TRAINING["learning_rate"],
                                  weight_decay=TRAINING["weight_decay"])
    for step in range(TRAINING["steps"]):
        index = _sequences(TRAINING["users per step"], 6, seed=100 + step)  # (8, L + 1)
        out = model(item_ids=torch.arange(NUM_ITEMS), item_index=index, **catalogue)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return model.eval()


def tiny_evaluation(model: PMMRecModel) -> list[dict]:
    """HR@10 / NDCG@10 by full ranking over the 20 items (history excluded, pessimistic ties) on held-out users."""
    sequences = _sequences(16, 6, seed=999)  # (16, 6): 5 inputs, 1 target
    with torch.no_grad():
        items = model.encode_items(**_catalogue(0))  # (20, d)
        users = model.encode_users(items, sequences[:, :-1]).user_embeddings  # (16, d)
    scores = users @ items.T  # (16, 20)
    target = sequences[:, -1]
    target_score = scores.gather(1, target[:, None])  # (16, 1)
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, sequences[:, :-1], True)
    others = (scores >= target_score) & ~seen
    others.scatter_(1, target[:, None], False)
    rank = 1 + others.sum(1).float()  # (16,)
    hr = (rank <= 10).float().mean().item()
    ndcg = torch.where(rank <= 10, 1 / torch.log2(rank + 1), torch.zeros_like(rank)).mean().item()
    split = {"dataset": "pmmrec-tiny-synthetic", "dataset_name": "tiny synthetic (20 items, 16 users)", "split": "test"}
    return [dict(split, metric="hr@10", value=round(hr, 4)), dict(split, metric="ndcg@10", value=round(ndcg, 4))]


def example_card_data(model: PMMRecModel) -> PMMRecCardData:
    return PMMRecCardData(
        item_encoder_repo=EXAMPLE_REPOS["item_encoder"],
        user_encoder_repo=EXAMPLE_REPOS["user_encoder"],
        full_model_repo=EXAMPLE_REPOS["full_model"],
        description=(
            "An **example card**: a tiny PMMRec (hidden size 16, 3-block towers) trained for a few steps on random "
            "data by `tests/test_model_card.py`. It shows what `pmmrec_hf.hub.push_pmmrec_to_hub` publishes; it is "
            "not a useful recommender."
        ),
        training_data="Random sequences of 6 items over a catalogue of 20 items with random titles and random "
                      "images, generated in-process (next-item and NICL objectives).",
        hyperparameters=dict(TRAINING),
        eval_results=tiny_evaluation(model),
        evaluation_protocol="16 held-out random users: the first 5 items are the history, the 6th the target; full "
                            "ranking over the 20 items with the history excluded.",
        language=["en"],
        tags=["example"],
    )


def render_examples(model: PMMRecModel | None = None) -> dict[str, str]:
    model = model if model is not None else trained_tiny_model()
    data = example_card_data(model)
    parts = {"item_encoder": model.item_encoder, "user_encoder": model.user_encoder, "full_model": model}
    cards = {}
    for component, module in parts.items():
        data.repo_id = EXAMPLE_REPOS[component]
        cards[component] = render_model_card(module, data).content
    return cards


def write_examples() -> None:
    for component, text in render_examples().items():
        (EXAMPLES_DIR / EXAMPLE_FILES[component]).write_text(text, encoding="utf-8")


@contextlib.contextmanager
def hub_client_for(server, token=None):
    """``use_local_hub``, plus a reset of the ``HfApi`` that transformers caches (``transformers.utils.hub._hf_api``,
    created once with the endpoint of the time): without it, a second server in the same process gets requests meant
    for it sent to the first one (and retried with backoff for ~90 s once that one is stopped)."""
    import transformers.utils.hub as transformers_hub

    cached = getattr(transformers_hub, "_hf_api", None)
    with use_local_hub(server, token=token) as env:
        transformers_hub._hf_api = None
        try:
            yield env
        finally:
            transformers_hub._hf_api = cached


def python_blocks(card_text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.DOTALL)


# --------------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------------

EVALS = [
    {"dataset": "org/interactions", "split": "test", "metric": "HR@10", "value": 0.1234},
    {"dataset": "org/interactions", "dataset_name": "Interactions", "split": "validation", "metric": "ndcg@10",
     "value": 0.05},
]


@pytest.mark.parametrize("component", ["item_encoder", "user_encoder", "full_model"])
def test_card_metadata_round_trips_through_hub_parsing(component):
    model = tiny_model()
    module = {"item_encoder": model.item_encoder, "user_encoder": model.user_encoder, "full_model": model}[component]
    card = render_model_card(module, {
        "repo_id": "org/pmmrec-x", "datasets": ["org/interactions"], "eval_results": EVALS, "language": "en",
        "base_model": ["FacebookAI/xlm-roberta-base", "openai/clip-vit-base-patch32"], "tags": ["mine"],
    })
    parsed = ModelCard(card.content)
    data = parsed.data.to_dict()
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    tag = {"item_encoder": "item-encoder", "user_encoder": "user-encoder", "full_model": "full-model"}[component]
    assert data["tags"] == ["pmmrec", "recommendation", "sequential-recommendation", "multimodal", tag, "mine"]
    assert data["datasets"] == ["org/interactions"] and data["language"] == ["en"]
    assert data["base_model"] == ["FacebookAI/xlm-roberta-base", "openai/clip-vit-base-patch32"]
    assert "pipeline_tag" not in data
    # model-index parses back into the EvalResults it was built from
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "pmmrec-x"
    assert [(r.dataset_type, r.dataset_split, r.metric_type, r.metric_name, r.metric_value) for r in results] == [
        ("org/interactions", "test", "hr@10", "HR@10", 0.1234),
        ("org/interactions", "validation", "ndcg@10", "NDCG@10", 0.05),
    ]
    assert results[1].dataset_name == "Interactions" and results[0].task_type == "sequential-recommendation"
    # the metadata is a valid ModelCardData (it re-serialises to the same YAML) and the text round-trips
    again = ModelCardData(**data)
    assert again.to_dict() == data
    assert ModelCard(str(parsed)).data.to_dict() == data
    text = parsed.text
    for section in ("## Usage", "## Architecture", "## Training", "## Evaluation", "## Limitations", "## Citation"):
        assert section in text
    assert CITATION in text and "arXiv" in CITATION and "ICDE" in CITATION and "2312.09602" in CITATION
    assert "| Interactions | validation | NDCG@10 | 0.0500 |" in text
    assert "| org/interactions | test | HR@10 | 0.1234 |" in text
    assert 'from_pretrained("org/pmmrec-x", trust_remote_code=True)' in text
    for design in ("NICL", "NID", "RCL", "Domain shift", "No item IDs", "Cold start"):
        assert design in text


def test_base_model_comes_from_backbone_names_and_local_paths_are_left_out(tmp_path):
    config = tiny_card_config()
    config.item_encoder_config.text_config._name_or_path = "FacebookAI/xlm-roberta-base"
    config.item_encoder_config.vision_config._name_or_path = str(tmp_path)  # a local folder: not a Hub id
    assert backbone_base_models(config) == ["FacebookAI/xlm-roberta-base"]
    data = ModelCard(render_model_card(config).content).data.to_dict()
    assert data["base_model"] == ["FacebookAI/xlm-roberta-base"]
    user_card = render_model_card(config.user_encoder_config).content
    assert "base_model" not in ModelCard(user_card).data.to_dict()  # the user encoder has no pretrained backbone
    # no evaluation: no model-index, and the card says so
    assert "model-index" not in data and "No evaluation results" in render_model_card(config).content


def test_single_modality_item_encoder_card():
    card = render_model_card(tiny_card_config("text").item_encoder_config, {"repo_id": "org/text-items"}).content
    assert "multimodal" not in ModelCard(card).data.tags
    snippet = python_blocks(card)[0]
    assert "processor(text=titles)" in snippet and "pixel_values" not in snippet and "Image" not in snippet
    assert 'AutoProcessor.from_pretrained("org/text-items", trust_remote_code=True)' in snippet
    without = render_model_card(tiny_card_config("text").item_encoder_config, {"repo_id": "org/text-items"},
                                has_tokenizer=False).content
    assert "tokenizer(" in python_blocks(without)[0] and "AutoProcessor" not in python_blocks(without)[0]
    vision = render_model_card(tiny_card_config("vision").item_encoder_config, has_image_processor=False).content
    snippet = python_blocks(vision)[0]
    assert "ViTImageProcessor(" in snippet and "tokenizer" not in snippet
    assert "your-name/pmmrec-item-encoder" in snippet  # no repo id yet: a placeholder


def test_card_data_is_validated():
    with pytest.raises(ValueError, match="component"):
        PMMRecCardData(component="encoder")
    with pytest.raises(ValueError, match="finite"):
        PMMRecCardData(eval_results=[{"dataset": "d", "metric": "hr@10", "value": math.nan}])
    with pytest.raises(ValueError, match="lacks"):
        PMMRecCardData(eval_results=[{"dataset": "d", "value": 0.1}])
    with pytest.raises(ValueError, match="unknown evaluation result keys"):
        PMMRecCardData(eval_results=[{"dataset": "d", "metric": "hr@10", "value": 0.1, "k": 10}])
    with pytest.raises(ValueError, match="unknown model card fields"):
        PMMRecCardData.coerce({"dataset": "d"})
    with pytest.raises(ValueError, match="cannot get a"):
        render_model_card(tiny_card_config().user_encoder_config, {"component": "item_encoder"})
    assert PMMRecCardData.coerce({"datasets": "org/d"}).datasets == ["org/d"]


# --------------------------------------------------------------------------------------------------
# the committed example cards
# --------------------------------------------------------------------------------------------------


def _mask_numbers(text: str) -> str:
    return re.sub(r"\d+\.\d+", "<num>", text)


def test_committed_example_cards_are_up_to_date():
    model = trained_tiny_model()
    rendered = render_examples(model)
    assert not looks_untrained(model.item_encoder) and not looks_untrained(model.user_encoder)
    for component, text in rendered.items():
        committed = (EXAMPLES_DIR / EXAMPLE_FILES[component]).read_text(encoding="utf-8")
        assert _mask_numbers(committed) == _mask_numbers(text), (
            f"{EXAMPLE_FILES[component]} is out of date: regenerate with `python tests/test_model_card.py`"
        )
        data = ModelCard(committed).data.to_dict()
        assert {"pmmrec", "example"} <= set(data["tags"]) and data["model-index"]


def test_example_card_snippets_run_against_a_local_hub(tmp_path, capsys):
    """Publish a tiny model under the example repo ids, then run every Python block of every committed card."""
    model = tiny_model(1)
    with LocalHubServer(tmp_path / "hub", DEFAULT_TOKENS, orgs={EXAMPLE_ORG: ["alice"]}) as server:
        with hub_client_for(server):
            push_pmmrec_to_hub(model, *EXAMPLE_REPOS.values(), token=ALICE, tokenizer=tiny_tokenizer())
            for component, name in EXAMPLE_FILES.items():
                blocks = python_blocks((EXAMPLES_DIR / name).read_text(encoding="utf-8"))
                assert len(blocks) == (2 if component == "user_encoder" else 3), name  # + the pipeline block
                for block in blocks:
                    namespace: dict = {"__name__": f"snippet_{component}"}
                    exec(compile(block, f"<{name}>", "exec"), namespace)  # noqa: S102 - our own documentation
                    if "item_embeddings" in namespace and component != "user_encoder":
                        assert namespace["item_embeddings"].shape == (5, 16)
                    if "scores" in namespace:
                        assert namespace["scores"].shape[0] == 2
                    if "assembled" in namespace:
                        assert type(namespace["assembled"]).__name__ == "PMMRecModel"
        assert not server.errors
    printed = capsys.readouterr().out
    assert "torch.Size([5, 16])" in printed


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    write_examples()
    print(f"wrote {', '.join(EXAMPLE_FILES.values())} to {EXAMPLES_DIR}")
