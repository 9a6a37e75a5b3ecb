"""Every checkpoint the package writes loads with transformers (and peft) alone, where pmmrec_hf cannot be imported.

One subprocess (a fresh Python whose import system refuses `pmmrec_hf`, run from a folder where the source tree is
not on sys.path) loads, from folders saved here and from repos pushed to the local Hub server:

- an item encoder with an EfficientNet-Lite vision tower (our own backbone type), the user encoder, the full model
  (all three from `push_pmmrec_to_hub`, and from `save_pmmrec_outputs` folders), and a SASRec checkpoint;
- the published processor (`AutoProcessor`), on greyscale, palette and RGBA images;
- both custom pipelines; the LoRA adapter through `PeftModel` and `AutoPeftModel`;
- every python block of the generated model cards (except the one that imports pmmrec_hf, which is run here),
  with stdin closed, so that a "Do you wish to run the custom code? [y/N]" prompt fails the test.

Outputs are compared exactly with what the package computes here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image

from pmmrec_hf import (
    EfficientNetLiteConfig,
    PMMRecConfig,
    PMMRecItemEncoderConfig,
    PMMRecModel,
    PMMRecProcessor,
    PMMRecUserEncoderConfig,
    SASRecConfig,
    SASRecModel,
)
from pmmrec_hf.data.image_processing import PMMRecImageTransform
from pmmrec_hf.hub import push_pmmrec_to_hub
from hub_server import DEFAULT_TOKENS, LocalHubServer, hub_env  # tests/hub_server.py
from pmmrec_hf.training import save_pmmrec_outputs
from pmmrec_hf.transfer import apply_lora
from test_model_card import hub_client_for, python_blocks, tiny_tokenizer
from tiny_models import tiny_text_config

ALICE = "hf_local_alice"
IMAGE = 32

# Runs first in the subprocess: pmmrec_hf (and any submodule) cannot be imported.
HIDE_PACKAGE = textwrap.dedent(
    """
    import sys

    class _Refuse:
        def find_spec(self, name, path=None, target=None):
            if name == "pmmrec_hf" or name.startswith("pmmrec_hf."):
                raise ImportError("pmmrec_hf is hidden in this test")
            return None

    sys.meta_path.insert(0, _Refuse())
    sys.modules["pmmrec_hf"] = None
    try:
        import pmmrec_hf  # noqa: F401
        raise SystemExit("pmmrec_hf is still importable")
    except ImportError:
        pass
    """
)


def _lite_model(seed: int = 0) -> PMMRecModel:
    torch.manual_seed(seed)
    vision = EfficientNetLiteConfig(image_size=IMAGE, stem_channels=8, hidden_size=24, kernel_sizes=[3, 3, 3],
                                    strides=[1, 2, 2], expand_ratios=[1, 2, 2], out_channels=[8, 12, 16],
                                    num_block_repeats=[1, 1, 1])
    item = PMMRecItemEncoderConfig(text_config=tiny_text_config(), vision_config=vision, hidden_size=16,
                                   fusion_num_attention_heads=2, fusion_intermediate_size=24, image_size=IMAGE,
                                   max_text_length=8)
    user = PMMRecUserEncoderConfig(hidden_size=16, intermediate_size=32, max_position_embeddings=5)
    model = PMMRecModel(PMMRecConfig(item_encoder_config=item, user_encoder_config=user, nicl_projection_size=8))
    with torch.no_grad():  # "trained": own layers away from their initial values (push warns otherwise)
        for name, param in model.named_parameters():
            if "backbone" not in name:
                param.add_(0.01 * torch.randn_like(param))
    return model.eval()


def _images() -> list:
    grey = Image.linear_gradient("L").resize((40, 28))
    palette = Image.linear_gradient("L").resize((20, 50)).convert("P")
    rgba = Image.new("RGBA", (33, 33), (200, 30, 60, 90))
    return [grey, palette, rgba, Image.new("RGB", (50, 40), "orange")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LocalHubServer(tmp_path_factory.mktemp("hub"), DEFAULT_TOKENS) as hub:
        yield hub


@pytest.fixture(scope="module")
def published(server, tmp_path_factory):
    """Checkpoints saved locally and pushed to the local Hub, and what the package computes with them."""
    root = tmp_path_factory.mktemp("remote")
    model, tokenizer = _lite_model(), tiny_tokenizer()
    texts = ["Red Cotton T-shirt", "blue jeans", "a lamp", "green mug"]
    images = _images()
    saved = save_pmmrec_outputs(model, str(root / "out"), tokenizer)
    peft_model = apply_lora(PMMRecModel.from_pretrained(saved["model"]), r=2, alpha=4, dropout=0.0)
    with torch.no_grad():  # adapters that change the outputs (B starts at zero)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn_like(param))
    peft_model.eval()
    sasrec = SASRecModel(SASRecConfig(num_items=7, hidden_size=16, intermediate_size=32, max_position_embeddings=5))
    sasrec.eval().save_pretrained(root / "sasrec")
    with hub_client_for(server):
        push_pmmrec_to_hub(model, "lite-item", "lite-user", "lite-full", token=ALICE, tokenizer=tokenizer)
        push_pmmrec_to_hub(peft_model, lora_adapter_repo="lite-lora", lora_base_model_repo="lite-full", token=ALICE)
        # one push: the base model (the adapters taken off) and its adapter
        push_pmmrec_to_hub(peft_model, full_model_repo="lora-base", lora_adapter_repo="lora-two", token=ALICE)
        api = HfApi(token=ALICE)
        api.create_repo("alice/sasrec")
        api.upload_folder(repo_id="alice/sasrec", folder_path=str(root / "sasrec"))
        cards = {repo: Path(api.hf_hub_download(f"alice/{repo}", "README.md")).read_text()
                 for repo in ("lite-item", "lite-user", "lite-full", "lite-lora")}
        adapter_config = json.loads(Path(api.hf_hub_download("alice/lite-lora", "adapter_config.json")).read_text())
        second_config = json.loads(Path(api.hf_hub_download("alice/lora-two", "adapter_config.json")).read_text())
        base_weights = PMMRecModel.from_pretrained("alice/lora-base").state_dict()

    processor = PMMRecProcessor.from_pretrained(saved["item_encoder"])
    inputs = processor(text=texts, images=images)
    batch = {**inputs, "item_ids": torch.arange(4), "item_index": torch.tensor([[-1, 0, 1, 2], [3, 2, 1, 0]])}
    with torch.no_grad():
        expected = {
            "pixels": PMMRecImageTransform(IMAGE)(images),
            "items": model.item_encoder(**inputs).item_embeddings,
            "users": model.user_encoder(torch.ones(2, 3, 16)).user_embeddings,
            "loss": model(**batch).loss,
            "lora": peft_model(**batch).loss,
            "sasrec": sasrec.encode_items(item_ids=torch.arange(7)),
            "encode": torch.as_tensor(model.item_encoder.encode(texts, images, processor=processor)),
            "single": model.item_encoder(**processor(text=texts[:1], images=images[:1])).item_embeddings[0],
        }
    torch.save({"texts": texts, "inputs": dict(inputs), "batch": batch, "expected": expected}, root / "data.pt")
    return {"root": root, "saved": saved, "cards": cards, "adapter_config": adapter_config,
            "second_config": second_config, "base_weights": base_weights, "model": model, "peft": peft_model}


def test_published_adapter_names_the_published_base_model(published):
    config = published["adapter_config"]
    assert config["base_model_name_or_path"] == "alice/lite-full"
    assert config["auto_mapping"] == {"base_model_class": "AutoModel", "parent_library": "transformers"}
    assert published["second_config"]["base_model_name_or_path"] == "alice/lora-base"
    # the base published with the adapter is the model the adapters were trained on (no LoRA weights in it)
    base, original = published["base_weights"], published["model"].state_dict()
    assert set(base) == set(original) and all(torch.equal(base[k], original[k]) for k in base)
    assert any("lora_" in n for n, _ in published["peft"].named_parameters())  # the wrapped model is unchanged


def test_lora_publishing_refuses_bad_requests_before_any_network_call(published):
    with pytest.raises(ValueError, match="needs a LoRA-wrapped model"):
        push_pmmrec_to_hub(published["model"], lora_adapter_repo="x-lora", token=ALICE)
    with pytest.raises(ValueError, match="needs its base model's repo"):
        push_pmmrec_to_hub(published["peft"], lora_adapter_repo="x-lora", token=ALICE)


def test_saved_folders_ship_every_module_their_code_imports(published):
    saved = published["saved"]
    shipped = {"configuration_pmmrec.py", "modeling_pmmrec.py", "losses.py", "configuration_efficientnet_lite.py",
               "modeling_efficientnet_lite.py", "processing_pmmrec.py", "pipelines.py"}
    for key in ("model", "item_encoder", "user_encoder"):
        assert shipped <= set(os.listdir(saved[key])), key
    for key in ("model", "item_encoder"):
        files = set(os.listdir(saved[key]))
        assert {"processor_config.json", "preprocessor_config.json", "tokenizer_config.json"} <= files
        config = json.loads(Path(saved[key], "config.json").read_text())
        assert "pmmrec-item-embedding" in config["custom_pipelines"]
    assert "custom_pipelines" not in json.loads(Path(saved["user_encoder"], "config.json").read_text())


@pytest.mark.slow
def test_everything_loads_and_runs_without_the_package(published, server):
    root, saved = published["root"], published["saved"]
    cards = published["cards"]
    snippets = []
    for repo, card in cards.items():
        for block in python_blocks(card):
            if "pmmrec_hf" not in block:  # the block for users of the package runs in test_model_card
                snippets.append((repo, block))
    # item encoder: embedding + pipeline; user encoder: scoring; full model: recommend + pipelines; LoRA: loading
    assert [r for r, _ in snippets] == ["lite-item", "lite-item", "lite-user", "lite-full", "lite-full", "lite-lora"]
    (root / "snippets.json").write_text(json.dumps(snippets))
    script = HIDE_PACKAGE + textwrap.dedent(
        f"""
        import json, torch
        from transformers import AutoModel, AutoProcessor, pipeline
        from peft import AutoPeftModel, PeftModel

        data = torch.load({str(root / "data.pt")!r}, weights_only=False)
        expected, inputs, batch = data["expected"], data["inputs"], data["batch"]
        saved = {saved!r}

        def check(name, got, want):
            assert torch.equal(got, want), (name, (got - want).abs().max())
            print("ok", name)

        for source in (saved["item_encoder"], "alice/lite-item"):
            item = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
            assert "transformers_modules" in type(item).__module__
            assert type(item.vision_model).__name__ == "EfficientNetLiteModel"
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
            assert type(processor).__name__ == "PMMRecProcessor"
            from PIL import Image
            images = [Image.linear_gradient("L").resize((40, 28)), Image.linear_gradient("L").resize((20, 50)).convert("P"),
                      Image.new("RGBA", (33, 33), (200, 30, 60, 90)), Image.new("RGB", (50, 40), "orange")]
            got = processor(text=data["texts"], images=images)
            check("pixels " + source, got["pixel_values"], expected["pixels"])
            check("input_ids " + source, got["input_ids"], inputs["input_ids"])
            with torch.no_grad():
                check("items " + source, item(**got).item_embeddings, expected["items"])
            check("encode " + source, torch.as_tensor(item.encode(data["texts"], images)), expected["encode"])
            embed = pipeline("pmmrec-item-embedding", model=source, trust_remote_code=True)
            vector = embed({{"text": data["texts"][0], "image": images[0]}}, return_tensors=True)
            check("pipeline " + source, vector, expected["single"])
        for source in (saved["user_encoder"], "alice/lite-user"):
            user = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
            with torch.no_grad():
                check("users " + source, user(torch.ones(2, 3, 16)).user_embeddings, expected["users"])
        for source in (saved["model"], "alice/lite-full"):
            full = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
            with torch.no_grad():
                check("loss " + source, full(**batch).loss, expected["loss"])
            recommend = pipeline("pmmrec-recommendation", model=source, trust_remote_code=True)
            top = recommend(["a", "b"], catalogue={{"a": "red shirt", "b": "lamp", "c": "mug", "d": "jeans"}}, top_k=2)
            assert [r["item_id"] for r in top] and not {{"a", "b"}} & {{r["item_id"] for r in top}}, top
        for source in ({str(root / "sasrec")!r}, "alice/sasrec"):
            sasrec = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
            with torch.no_grad():
                check("sasrec " + source, sasrec.encode_items(item_ids=torch.arange(7)), expected["sasrec"])
        base = AutoModel.from_pretrained("alice/lite-full", trust_remote_code=True)
        lora = PeftModel.from_pretrained(base, "alice/lite-lora").eval()
        with torch.no_grad():
            check("lora PeftModel", lora(**batch).loss, expected["lora"])
        lora = AutoPeftModel.from_pretrained("alice/lite-lora", trust_remote_code=True).eval()
        with torch.no_grad():
            check("lora AutoPeftModel", lora(**batch).loss, expected["lora"])

        for repo, block in json.load(open({str(root / "snippets.json")!r})):
            exec(compile(block, f"<card {{repo}}>", "exec"), {{"__name__": "__main__"}})
            print("ok snippet", repo)
        print("REMOTE OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")}
    env.update(hub_env(server))  # anonymous: the repos are public
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env,
                            stdin=subprocess.DEVNULL, timeout=600)
    assert "REMOTE OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
