import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, BertModel, CLIPVisionModel

from pmmrec_hf import (
    PMMRecConfig,
    PMMRecItemEncoder,
    PMMRecItemEncoderConfig,
    PMMRecModel,
    PMMRecUserEncoder,
)
from tiny_models import IMAGE, item_inputs, tiny_batch, tiny_config, tiny_item_config, tiny_text_config, tiny_user_config, tiny_vision_config


def _seeded(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls(config)


@pytest.mark.parametrize(
    "modality, vision",
    [("multimodal", "clip"), ("multimodal", "resnet"), ("text", "clip"), ("vision", "clip"), ("vision", "resnet")],
)
def test_item_encoder_output_shapes(modality, vision):
    encoder = _seeded(PMMRecItemEncoder, tiny_item_config(modality, vision)).eval()
    inputs = item_inputs(5)
    out = encoder(**inputs)
    assert out.item_embeddings.shape == (5, 16)
    if modality != "vision":
        assert out.text_embeddings.shape == (5, 16)
    else:
        assert out.text_embeddings is None
    if modality != "text":
        assert out.vision_embeddings.shape == (5, 16)
    else:
        assert out.vision_embeddings is None
    if modality == "multimodal":
        vision_tokens = 10 if vision == "clip" else 4  # CLIP: CLS + 3x3 patches; resnet: 2x2 map at 30 px
        assert out.last_hidden_state.shape == (5, 7 + vision_tokens, 16)
        # item embedding = masked mean of the fused tokens (text padding excluded)
        mask = torch.cat([inputs["attention_mask"].bool(), torch.ones(5, vision_tokens, dtype=torch.bool)], 1)
        expected = torch.stack([out.last_hidden_state[i][mask[i]].mean(0) for i in range(5)])
        torch.testing.assert_close(out.item_embeddings, expected)
    else:
        assert out.last_hidden_state is None
        single = out.text_embeddings if modality == "text" else out.vision_embeddings
        assert torch.equal(out.item_embeddings, single)


def test_text_padding_does_not_change_item_embedding():
    encoder = _seeded(PMMRecItemEncoder, tiny_item_config()).eval()
    inputs = item_inputs(3)
    short = {k: v[:, :4] for k, v in inputs.items() if k != "pixel_values"}
    short["attention_mask"] = torch.ones_like(short["attention_mask"])
    padded = {
        "input_ids": torch.cat([short["input_ids"], torch.zeros(3, 3, dtype=torch.long)], 1),
        "attention_mask": torch.cat([short["attention_mask"], torch.zeros(3, 3, dtype=torch.long)], 1),
    }
    a = encoder(pixel_values=inputs["pixel_values"], **short).item_embeddings
    b = encoder(pixel_values=inputs["pixel_values"], **padded).item_embeddings
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vision", ["clip", "resnet"])
def test_towers_equal_plain_backbone_forward(vision):
    encoder = _seeded(PMMRecItemEncoder, tiny_item_config(vision=vision)).eval()
    inputs = item_inputs(4)
    text_tokens = encoder.text_tower({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
                                     inputs["attention_mask"])
    reference = encoder.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(text_tokens, reference.last_hidden_state, atol=1e-6, rtol=1e-6)
    vision_tokens = encoder.vision_tower({"pixel_values": inputs["pixel_values"]})
    reference = encoder.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True)
    if vision == "clip":  # the last block's output, before the final layer norm
        expected = reference.hidden_states[-1]
    else:  # the last feature map flattened to tokens
        expected = reference.last_hidden_state.flatten(2).transpose(1, 2)
    torch.testing.assert_close(vision_tokens, expected, atol=1e-6, rtol=1e-6)


def test_frozen_part_runs_without_autograd_state():
    encoder = _seeded(PMMRecItemEncoder, tiny_item_config()).train()
    inputs = item_inputs(3)
    features = encoder.text_frozen_features(inputs["input_ids"], inputs["attention_mask"])
    assert features.grad_fn is None and not features.requires_grad
    assert encoder.vision_frozen_features(inputs["pixel_values"]).grad_fn is None
    # features given in place of raw inputs give the same embeddings (eval mode)
    encoder.eval()
    a = encoder(**inputs).item_embeddings
    b = encoder(
        attention_mask=inputs["attention_mask"],
        text_features=encoder.text_frozen_features(inputs["input_ids"], inputs["attention_mask"]),
        vision_features=encoder.vision_frozen_features(inputs["pixel_values"]),
    ).item_embeddings
    assert torch.equal(a, b)


def test_trainable_parameters_are_exactly_the_top_blocks_and_our_layers():
    encoder = PMMRecItemEncoder(tiny_item_config(text_trainable_layers=1, vision_trainable_layers=2))
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert any(n.startswith("text_tower.backbone.encoder.layer.2.") for n in trainable)
    assert not any(n.startswith("text_tower.backbone.encoder.layer.1.") for n in trainable)
    assert not any("embeddings" in n for n in trainable)
    assert any(n.startswith("vision_tower.backbone.encoder.layers.1.") for n in trainable)
    assert not any(n.startswith("vision_tower.backbone.encoder.layers.0.") for n in trainable)
    assert {n for n in trainable if not n.startswith(("text_tower", "vision_tower"))} == {
        n for n, _ in encoder.named_parameters() if not n.startswith(("text_tower", "vision_tower"))
    }
    whole = PMMRecItemEncoder(tiny_item_config(text_trainable_layers=-1, vision_trainable_layers=-1))
    # the whole tower trains except what its token output never uses: BERT's pooler, CLIP's post-layernorm
    frozen = {n for n, p in whole.named_parameters() if not p.requires_grad}
    assert frozen == {
        "text_tower.backbone.pooler.dense.weight", "text_tower.backbone.pooler.dense.bias",
        "vision_tower.backbone.post_layernorm.weight", "vision_tower.backbone.post_layernorm.bias",
    }
    assert whole.text_tower.unused_parameter_names == ["pooler.dense.bias", "pooler.dense.weight"]


@pytest.mark.parametrize("text_layers,vision_layers", [(1, 2), (-1, -1), (2, 0)])
@pytest.mark.parametrize("weights", [dict(nicl_weight=0.4, nid_weight=0.3, rcl_weight=0.2),
                                     dict(nicl_weight=0.0, nid_weight=0.0, rcl_weight=0.0),
                                     dict(nicl_weight=0.0, nid_weight=0.0, rcl_weight=0.2)])
def test_every_trainable_parameter_receives_a_gradient(text_layers, vision_layers, weights):
    # what DistributedDataParallel needs: no trainable parameter without a gradient, whatever the objectives
    config = tiny_config(item_kw=dict(text_trainable_layers=text_layers, vision_trainable_layers=vision_layers),
                         **weights)
    model = _seeded(PMMRecModel, config).train()
    model(**tiny_batch()).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    without = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert without == []
    assert any(n.startswith("user_encoder.") for n in trainable)
    assert any(n.startswith("nicl_") for n in trainable) == (weights["nicl_weight"] > 0)
    assert any(n.startswith("nid_head.") for n in trainable) == (weights["nid_weight"] > 0)
    if vision_layers == 0:
        assert not any(n.startswith("item_encoder.vision_tower.") for n in trainable)


def test_freezing_follows_the_objectives_after_loading_and_after_a_change(tmp_path):
    model = _seeded(PMMRecModel, tiny_config(nicl_weight=0.0, nid_weight=0.0))
    assert not any(p.requires_grad for p in model.nid_head.parameters())
    assert not any(p.requires_grad for p in model.nicl_text_head.parameters())
    model.save_pretrained(tmp_path)
    loaded = PMMRecModel.from_pretrained(tmp_path)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    loaded.config.nid_weight = 0.5
    loaded.apply_freezing()
    assert all(p.requires_grad for p in loaded.nid_head.parameters())


def test_one_optimizer_step_moves_only_trainable_parameters():
    model = _seeded(PMMRecModel, tiny_config(item_kw=dict(fusion_dropout=0.0))).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(**tiny_batch())
    for name in ("next_item_loss", "nicl_loss", "nid_loss", "rcl_loss"):
        assert torch.isfinite(out[name])
    out.loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} received no gradient"
        else:
            assert param.grad is None, name
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} did not move"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_loss_is_the_weighted_sum_of_its_components():
    model = _seeded(PMMRecModel, tiny_config(next_item_weight=0.5, nicl_weight=0.25, nid_weight=0.125, rcl_weight=2.0)).eval()
    out = model(**tiny_batch())
    expected = 0.5 * out.next_item_loss + 0.25 * out.nicl_loss + 0.125 * out.nid_loss + 2.0 * out.rcl_loss
    torch.testing.assert_close(out.loss, expected)
    lean = _seeded(PMMRecModel, tiny_config(nicl_weight=0.0, nid_weight=0.0, rcl_weight=0.0)).eval()
    out = lean(**tiny_batch())
    assert out.nicl_loss is None and out.nid_loss is None and out.rcl_loss is None
    torch.testing.assert_close(out.loss, 0.6 * out.next_item_loss)


def test_duplicates_encoded_separately_give_the_same_loss():
    model = _seeded(PMMRecModel, tiny_config(rcl_weight=0.0)).eval()
    batch = tiny_batch()
    out = model(**batch)
    # the same sequences, but every slot encoded as its own item (duplicates and all)
    index = batch["item_index"]
    slots = index[index >= 0]
    expanded_index = torch.full_like(index, -1)
    expanded_index[index >= 0] = torch.arange(slots.numel())
    corrupted = batch["corrupted_index"]
    # corrupted sequences point at the first expanded copy of each item
    first_copy = {int(item): int((slots == item).nonzero()[0]) for item in slots.unique()}
    expanded_corrupted = corrupted.clone().apply_(lambda v: first_copy[v] if v >= 0 else -1)
    expanded = {
        "item_ids": batch["item_ids"][slots],
        "item_index": expanded_index,
        "input_ids": batch["input_ids"][slots],
        "attention_mask": batch["attention_mask"][slots],
        "pixel_values": batch["pixel_values"][slots],
        "item_log_popularity": batch["item_log_popularity"][slots],
        "corrupted_index": expanded_corrupted,
        "noise_labels": batch["noise_labels"],
    }
    out_expanded = model(**expanded)
    assert expanded["item_ids"].numel() > batch["item_ids"].numel()
    for name in ("loss", "next_item_loss", "nicl_loss", "nid_loss"):
        torch.testing.assert_close(out[name], out_expanded[name], atol=1e-5, rtol=1e-5)


def test_user_encoder_is_causal_and_ignores_padding():
    encoder = _seeded(PMMRecUserEncoder, tiny_user_config()).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = encoder(x, mask).last_hidden_state
    changed = x.clone()
    changed[:, 4] = torch.randn(2, 16)  # a later item cannot change earlier states
    out2 = encoder(changed, mask).last_hidden_state
    torch.testing.assert_close(out[:, :4], out2[:, :4])
    assert not torch.allclose(out[:, 4], out2[:, 4])
    padded = x.clone()
    padded[0, :2] = torch.randn(2, 16)  # padding content is invisible to real positions
    torch.testing.assert_close(encoder(padded, mask).last_hidden_state[0, 2:], out[0, 2:])
    # right-aligned positions: a shorter input equals the same items left-padded to full length
    short = encoder(x[:1, 2:], torch.ones(1, 3)).last_hidden_state
    torch.testing.assert_close(short, out[:1, 2:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        encoder(torch.randn(1, 6, 16))


@pytest.mark.parametrize("kind", ["item", "user", "full"])
def test_save_and_load_are_bit_identical(tmp_path, kind):
    if kind == "item":
        model = _seeded(PMMRecItemEncoder, tiny_item_config())
        run = lambda m: m(**item_inputs(4)).item_embeddings  # noqa: E731
    elif kind == "user":
        model = _seeded(PMMRecUserEncoder, tiny_user_config())
        x = torch.randn(2, 5, 16)
        run = lambda m: m(x, torch.tensor([[0, 1, 1, 1, 1], [1] * 5])).last_hidden_state  # noqa: E731
    else:
        model = _seeded(PMMRecModel, tiny_config())
        run = lambda m: m(**tiny_batch()).loss  # noqa: E731
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(run(model), run(loaded))
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    # the frozen/trainable split survives loading
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in loaded.parameters()]
    assert type(AutoModel.from_pretrained(tmp_path)) is type(model)


def test_full_model_from_separately_saved_encoders(tmp_path):
    model = _seeded(PMMRecModel, tiny_config()).eval()
    model.item_encoder.save_pretrained(tmp_path / "item")
    model.user_encoder.save_pretrained(tmp_path / "user")
    assembled = PMMRecModel.from_encoders(str(tmp_path / "item"), str(tmp_path / "user")).eval()
    batch = tiny_batch()
    a, b = model(**batch), assembled(**batch)
    assert torch.equal(a.item_embeddings, b.item_embeddings)
    assert torch.equal(a.user_states, b.user_states)
    assert torch.equal(a.next_item_loss, b.next_item_loss)


def test_from_backbones_pretrained_keeps_backbone_weights(tmp_path):
    torch.manual_seed(1)
    text = BertModel(tiny_text_config(), add_pooling_layer=False)
    vision = CLIPVisionModel(tiny_vision_config("clip"))
    text.save_pretrained(tmp_path / "text")
    vision.save_pretrained(tmp_path / "vision")
    encoder = PMMRecItemEncoder.from_backbones_pretrained(
        str(tmp_path / "text"), str(tmp_path / "vision"), hidden_size=16, fusion_num_attention_heads=2,
        fusion_intermediate_size=24,
    )
    for source, loaded in ((text, encoder.text_model), (vision, encoder.vision_model)):
        src, dst = source.state_dict(), loaded.state_dict()
        assert src.keys() <= dst.keys()
        assert all(torch.equal(src[k], dst[k]) for k in src), "pretrained backbone weights changed"
    # a full model built around it leaves them untouched too
    model = PMMRecModel.from_encoders(encoder, nicl_projection_size=8)
    assert all(torch.equal(v, model.item_encoder.text_model.state_dict()[k]) for k, v in text.state_dict().items())
    # text-only from a single checkpoint
    text_only = PMMRecItemEncoder.from_backbones_pretrained(str(tmp_path / "text"), hidden_size=16)
    assert text_only.config.modality == "text" and text_only.vision_tower is None


def test_backbone_checkpoint_that_does_not_fit_is_an_error(tmp_path):
    from transformers import ViTModel, ViTConfig

    ViTModel(ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                       image_size=IMAGE, patch_size=10)).save_pretrained(tmp_path / "vit")
    # rewrite the config so that the weights no longer match the declared architecture
    import json

    cfg_path = tmp_path / "vit" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="uninitialised"):
        PMMRecItemEncoder.from_backbones_pretrained(vision_model=str(tmp_path / "vit"), hidden_size=16)


@pytest.mark.slow
def test_remote_code_loading_without_the_package(tmp_path):
    """Saved checkpoints load with AutoModel(trust_remote_code=True) in a Python where pmmrec_hf is hidden."""
    model = _seeded(PMMRecModel, tiny_config()).eval()
    model.save_pretrained(tmp_path / "full")
    model.item_encoder.save_pretrained(tmp_path / "item")
    model.user_encoder.save_pretrained(tmp_path / "user")
    batch = tiny_batch()
    torch.save(batch, tmp_path / "batch.pt")
    expected = model(**batch)
    torch.save({"loss": expected.loss, "items": expected.item_embeddings}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["pmmrec_hf"] = None  # hide the package: importing it now raises ImportError
        import torch
        from transformers import AutoModel
        try:
            import pmmrec_hf  # noqa
            raise SystemExit("package still importable")
        except ImportError:
            pass
        root = {str(tmp_path)!r}
        batch = torch.load(root + "/batch.pt")
        expected = torch.load(root + "/expected.pt")
        full = AutoModel.from_pretrained(root + "/full", trust_remote_code=True).eval()
        assert type(full).__name__ == "PMMRecModel" and "transformers_modules" in type(full).__module__
        out = full(**batch)
        assert torch.equal(out.loss, expected["loss"]), (out.loss, expected["loss"])
        item = AutoModel.from_pretrained(root + "/item", trust_remote_code=True).eval()
        keys = ("input_ids", "attention_mask", "pixel_values")
        assert torch.equal(item(**{{k: batch[k] for k in keys}}).item_embeddings, expected["items"])
        user = AutoModel.from_pretrained(root + "/user", trust_remote_code=True)
        assert type(user).__name__ == "PMMRecUserEncoder"
        print("REMOTE OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert "REMOTE OK" in result.stdout, result.stderr[-3000:]


def test_auto_classes_are_registered():
    from transformers import AutoConfig

    from pmmrec_hf import PMMRecUserEncoderConfig

    assert isinstance(AutoModel.from_config(tiny_user_config()), PMMRecUserEncoder)
    assert AutoConfig.for_model("pmmrec_user_encoder").__class__ is PMMRecUserEncoderConfig
    assert isinstance(AutoModel.from_config(tiny_config()), PMMRecModel)


@pytest.mark.slow
def test_paper_sized_model_has_the_reference_parameter_counts():
    from transformers import CLIPVisionConfig, XLMRobertaConfig

    config = PMMRecConfig(
        item_encoder_config=PMMRecItemEncoderConfig(
            text_config=XLMRobertaConfig(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1),
            vision_config=CLIPVisionConfig(patch_size=32),
        )
    )
    with torch.device("meta"):
        model = PMMRecModel(config)
    heads = [model.nicl_text_head, model.nicl_vision_head, model.nid_head]
    head_params = sum(p.numel() for h in heads for p in h.parameters())
    total = sum(p.numel() for p in model.parameters()) - head_params
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) - head_params
    # reference: 388 M parameters, 51.4 M trainable (of which 0.59 M is the text pooler that never gets a
    # gradient: we freeze it), fusion 7.1 M, user encoder 14.2 M
    assert abs(total - 388e6) < 0.5e6
    assert abs(trainable - (51.4e6 - 0.59e6)) < 0.1e6
    assert abs(sum(p.numel() for p in model.item_encoder.fusion.parameters()) - 7.1e6) < 0.05e6
    assert abs(sum(p.numel() for p in model.user_encoder.parameters()) - 14.2e6) < 0.05e6


def _corrupted_batch(sequences, slots=6):
    from tiny_models import batch_from_sequences, tiny_catalogue

    batch = batch_from_sequences(sequences, tiny_catalogue(), slots)
    inputs = batch["item_index"][:, :-1]
    corrupted = torch.where(inputs >= 0, (inputs + 1) % len(batch["item_ids"]), inputs)  # every item replaced
    batch.update(corrupted_index=corrupted, noise_labels=torch.where(inputs >= 0, 1, -100))
    return batch


def test_rcl_skips_users_without_a_real_input_position():
    model = _seeded(PMMRecModel, tiny_config(nicl_weight=0.0, nid_weight=0.3, rcl_weight=0.5)).eval()
    sequences = [[0, 1, 2, 3], [3, 4, 5], [5, 1, 0, 2]]
    with_lonely = model(**_corrupted_batch(sequences + [[4]]))  # [4]: a target and no input
    without = model(**_corrupted_batch(sequences))
    torch.testing.assert_close(with_lonely.rcl_loss, without.rcl_loss, rtol=1e-6, atol=1e-7)


def test_corrupted_item_ids_equal_corrupted_index():
    model = _seeded(PMMRecModel, tiny_config(nid_weight=0.3, rcl_weight=0.5)).eval()
    batch = tiny_batch()
    by_index = model(**batch)
    ids = batch["item_ids"]
    index = batch.pop("corrupted_index")
    batch["corrupted_item_ids"] = torch.where(index >= 0, ids[index.clamp(min=0)], -1)
    by_ids = model(**batch)
    for name in ("loss", "nid_loss", "rcl_loss"):
        assert torch.equal(by_ids[name], by_index[name]), name
    batch["corrupted_item_ids"][0, -1] = 1000
    with pytest.raises(ValueError, match=r"ids \[1000\] are not among the batch's items"):
        model(**batch)
    with pytest.raises(ValueError, match="not both"):
        model(**{**batch, "corrupted_index": index})


def test_inference_forward_on_a_training_batch_is_a_clear_error():
    model = _seeded(PMMRecModel, tiny_config()).eval()
    batch = tiny_batch()  # item_index has L + 1 = 6 columns, the user encoder 5 positions
    with pytest.raises(ValueError, match=r"return_loss=False.*at most .*\(5\) columns; got 6.*item_index\[:, :-1\]"):
        model(**batch, return_loss=False)
    out = model(**{**batch, "item_index": batch["item_index"][:, :-1]}, return_loss=False)
    trained = model(**batch)
    torch.testing.assert_close(out.user_states, trained.user_states)  # the loss path's states, same inputs


def test_items_without_an_image_are_embedded_from_their_text_and_left_out_of_nicl():
    model = _seeded(PMMRecModel, tiny_config(nid_weight=0.3, rcl_weight=0.2)).eval()
    batch = tiny_batch()
    image_mask = torch.tensor([True, False, True, False, True, True])  # items 1 and 3: placeholders
    other = dict(batch, pixel_values=batch["pixel_values"].clone())
    other["pixel_values"][[1, 3]] = torch.randn(2, *batch["pixel_values"].shape[1:])
    a = model(**batch, image_mask=image_mask)
    b = model(**other, image_mask=image_mask)
    for name in ("loss", "next_item_loss", "nicl_loss", "nid_loss", "rcl_loss", "item_embeddings"):
        assert torch.equal(a[name], b[name]), name  # the placeholder pixels affect nothing
    # without the mask the placeholder is an image like any other
    assert not torch.equal(model(**batch).nicl_loss, model(**other).nicl_loss)
    # an image-less item's embedding is the fusion of its text tokens alone
    encoder = model.item_encoder
    items = {k: batch[k][[1]] for k in ("input_ids", "attention_mask")}
    text_only = encoder.text_projection(encoder._text_tokens(items["input_ids"], items["attention_mask"], None))
    allowed = items["attention_mask"].bool()[:, None, None, :]
    for layer in encoder.fusion:
        text_only = layer(text_only, allowed)
    expected = (text_only * items["attention_mask"][..., None]).sum(1) / items["attention_mask"].sum(1, keepdim=True)
    torch.testing.assert_close(a.item_embeddings[1], expected[0], rtol=1e-5, atol=1e-6)
    # every item without an image: NICL still has its text anchors (next item's text), and stays finite
    none = model(**batch, image_mask=torch.zeros(6, dtype=torch.bool))
    assert torch.isfinite(none.nicl_loss) and none.nicl_loss > 0
