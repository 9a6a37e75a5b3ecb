import pytest
import torch
from transformers import BertModel, CLIPVisionModel

from pmmrec_hf import PMMRecModel
from pmmrec_hf.transfer import TRANSFER_SETTINGS, apply_lora, load_for_transfer
from tiny_models import tiny_batch, tiny_config, tiny_text_config, tiny_vision_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 'pre-trained' model (random weights, nudged away from init) saved whole and as two encoders,
    plus the original backbones it started from."""
    root = tmp_path_factory.mktemp("source")
    torch.manual_seed(3)
    text = BertModel(tiny_text_config(), add_pooling_layer=False)
    vision = CLIPVisionModel(tiny_vision_config())
    text.save_pretrained(root / "text")
    vision.save_pretrained(root / "vision")
    torch.manual_seed(4)
    model = PMMRecModel(tiny_config())
    with torch.no_grad():  # "pre-training" moved every weight, the towers' too
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(root / "full")
    model.item_encoder.save_pretrained(root / "item")
    model.user_encoder.save_pretrained(root / "user")
    return root, model, text, vision


def _same(a: dict, b: dict, prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return all(torch.equal(a[k], b[k]) for k in keys)


def _fresh(a: dict, b: dict, prefix: str) -> bool:
    """No weight under prefix equals the source's (re-initialised)."""
    keys = [k for k in a if k.startswith(prefix) and a[k].numel() > 1]
    assert keys, prefix
    return not any(torch.equal(a[k], b[k]) for k in keys)


def test_each_setting_loads_exactly_the_intended_weights(source):
    root, model, text, vision = source
    src = model.state_dict()
    backbones = {"item_encoder.text_tower.backbone.": text.state_dict(),
                 "item_encoder.vision_tower.backbone.": vision.state_dict()}
    kw = dict(text_model=str(root / "text"), vision_model=str(root / "vision"))

    full = load_for_transfer("full", str(root / "full"), nicl_weight=0.0).state_dict()
    assert full.keys() == src.keys() and all(torch.equal(full[k], src[k]) for k in src)

    item = load_for_transfer("item_encoder", item_encoder=str(root / "item")).state_dict()
    assert _same(src, item, "item_encoder.")
    assert _fresh(item, src, "user_encoder.")

    user = load_for_transfer("user_encoder", user_encoder=str(root / "user"), config=model.config, **kw).state_dict()
    assert _same(src, user, "user_encoder.")
    for prefix, original in backbones.items():  # towers back at their original (pre-PMMRec) weights
        assert all(torch.equal(user[prefix + k], v) for k, v in original.items())
    assert _fresh(user, src, "item_encoder.fusion.") and _fresh(user, src, "item_encoder.text_projection.")

    for modality in ("text", "vision"):
        single = load_for_transfer(modality, str(root / "full"))
        state = single.state_dict()
        assert single.config.item_encoder_config.modality == modality and single.item_encoder.fusion is None
        assert _same(src, state, f"item_encoder.{modality}_tower.")
        assert _same(src, state, f"item_encoder.{modality}_projection.")
        assert _same(src, state, "user_encoder.")
        other = "vision" if modality == "text" else "text"
        assert not any(k.startswith(f"item_encoder.{other}_") for k in state)

    scratch = load_for_transfer("scratch", config=model.config, **kw).state_dict()
    for prefix, original in backbones.items():
        assert all(torch.equal(scratch[prefix + k], v) for k, v in original.items())
    assert _fresh(scratch, src, "user_encoder.") and _fresh(scratch, src, "item_encoder.fusion.")
    # scratch / user_encoder without original backbones: refused (the towers would silently be random) ...
    for setting, extra in (("scratch", {}), ("user_encoder", {"user_encoder": str(root / "user")})):
        with pytest.raises(ValueError, match="`text_model` and `vision_model` are not given.*random_towers=True"):
            load_for_transfer(setting, config=model.config, **extra)
        with pytest.raises(ValueError, match="`vision_model` is not given"):
            load_for_transfer(setting, config=model.config, text_model=kw["text_model"], **extra)
    # ... unless asked for: towers initialised from their configs, and it runs
    out = load_for_transfer("scratch", config=model.config, random_towers=True)(**tiny_batch())
    assert torch.isfinite(out.loss)


def test_every_setting_trains(source):
    root, model, _, _ = source
    for setting in TRANSFER_SETTINGS:
        kwargs = {"config": model.config, "random_towers": True} if setting in ("scratch", "user_encoder") else {}
        transferred = load_for_transfer(setting, str(root / "full"), nicl_weight=0.0, nid_weight=0.0, rcl_weight=0.0,
                                        **kwargs)
        out = transferred(**tiny_batch())
        out.loss.backward()
        assert out.nicl_loss is None and torch.isfinite(out.next_item_loss), setting


def test_bad_settings_are_clear_errors(source):
    root, _, _, _ = source
    with pytest.raises(ValueError, match="setting"):
        load_for_transfer("half", str(root / "full"))
    with pytest.raises(ValueError, match="item encoder"):
        load_for_transfer("item_encoder", user_encoder=str(root / "user"))


def test_lora_trains_only_adapters(source, tmp_path):
    root, model, _, _ = source
    peft_model = apply_lora(load_for_transfer("full", str(root / "full")), r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # adapters sit in the towers' trainable top blocks, the fusion and the user encoder only
    assert any(".text_tower.backbone.encoder.layer.2." in n for n in trainable)
    assert not any(".encoder.layer.0." in n for n in trainable)
    assert any(".fusion." in n for n in trainable) and any(".user_encoder." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(**tiny_batch()).loss.backward()
    optimizer.step()
    for name, param in peft_model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == ("lora_" in name), f"{name}: changed={changed}"
    # adapter-only saving, and merge-and-save back to a plain PMMRecModel
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_config.json" in saved and not (tmp_path / "adapter" / "model.safetensors").exists()
    peft_model.eval()
    expected = peft_model(**tiny_batch()).loss
    merged = peft_model.merge_and_unload()
    assert type(merged) is PMMRecModel
    merged.save_pretrained(tmp_path / "merged")
    reloaded = PMMRecModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(reloaded(**tiny_batch()).loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setting", ["full", "item_encoder", "text"])
def test_fine_tuning_objectives_decide_which_heads_train(source, setting):
    # pre-trained with every objective; fine-tuned with next-item only: the NICL / NID heads are frozen
    root, _, _, _ = source
    model = load_for_transfer(setting, str(root / "full"), nicl_weight=0.0, nid_weight=0.0, rcl_weight=0.0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {n for n, _ in model.nid_head.named_parameters(prefix="nid_head")} <= frozen
    if model.nicl_text_head is not None:
        assert all(not p.requires_grad for p in model.nicl_text_head.parameters())
    model(**tiny_batch()).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    again = load_for_transfer(setting, str(root / "full"), nid_weight=0.5)
    assert all(p.requires_grad for p in again.nid_head.parameters())
