"""Frozen tower parts stay frozen in train mode (no batch statistics, no running-statistics drift), and items
without an image do not run through the vision tower."""

import torch

from pmmrec_hf import PMMRecItemEncoder, PMMRecModel
from pmmrec_hf.backbones import EfficientNetLiteConfig
from pmmrec_hf.modeling_pmmrec import find_blocks
from tiny_models import item_inputs, tiny_config, tiny_item_config


def lite_config() -> EfficientNetLiteConfig:  # a tiny EfficientNet-Lite: batch norm in every block and in its head
    return EfficientNetLiteConfig(image_size=32, stem_channels=8, hidden_size=24, kernel_sizes=[3, 5, 3],
                                  strides=[1, 2, 2], expand_ratios=[1, 6, 4], out_channels=[8, 12, 16],
                                  num_block_repeats=[1, 2, 2])


def buffers(module) -> dict:
    return {name: b.clone() for name, b in module.named_buffers()}


def test_frozen_backbone_parts_stay_in_inference_mode_in_train_mode():
    for trainable in (0, 1):
        torch.manual_seed(0)
        model = PMMRecModel(tiny_config(vision="resnet", item_kw=dict(vision_config=lite_config(),
                                                                       vision_trainable_layers=trainable)))
        tower = model.item_encoder.vision_tower
        _, _, blocks = find_blocks(tower.backbone)
        top = {id(m) for b in list(blocks)[len(blocks) - trainable:] for m in b.modules()} if trainable else set()
        model.train()
        for name, module in tower.backbone.named_modules():
            assert module.training == (id(module) in top), (trainable, name)
        assert model.item_encoder.fusion.training and model.user_encoder.training
        before = buffers(tower.backbone)
        in_top = {n for n, _ in tower.backbone.named_buffers()
                  if any(n.startswith(f"encoder.layers.{len(blocks) - 1 - i}.") for i in range(trainable))}
        x = item_inputs(6)
        out = model.item_encoder(**x)  # the pixel path: frozen bottom, then the top (and head) in train mode
        out.item_embeddings.sum().backward()
        after = buffers(tower.backbone)
        assert all(torch.equal(after[n], before[n]) for n in before if n not in in_top), \
            "a frozen part's running statistics moved"
        if trainable:  # the trainable block's batch norms do train (batch statistics, running-statistics update)
            assert any(not torch.equal(after[n], before[n]) for n in in_top if "running_mean" in n)
        # frozen_features (run in eval mode) gives each module its own mode back
        tower.frozen_features({"pixel_values": x["pixel_values"]})
        for name, module in tower.backbone.named_modules():
            assert module.training == (id(module) in top), (trainable, name)
        model.eval()
        assert not any(m.training for m in model.modules())


def test_frozen_vision_head_is_the_same_function_in_train_and_eval_mode():
    """With the whole vision tower frozen, its head's batch norm normalises with its running statistics in train
    mode too: the vision tokens of an item do not depend on the other items of the batch."""
    torch.manual_seed(0)
    encoder = PMMRecItemEncoder(tiny_item_config(vision="resnet", vision_config=lite_config(),
                                                 vision_trainable_layers=0, text_trainable_layers=0))
    x = item_inputs(6)
    encoder.train()
    alone = encoder(**{k: v[:2] for k, v in x.items()}).vision_embeddings
    batch = encoder(**x).vision_embeddings[:2]
    encoder.eval()
    inference = encoder(**{k: v[:2] for k, v in x.items()}).vision_embeddings
    torch.testing.assert_close(alone, batch)
    torch.testing.assert_close(alone, inference)


def test_items_without_an_image_skip_the_vision_tower():
    torch.manual_seed(0)
    encoder = PMMRecItemEncoder(tiny_item_config(vision="resnet", vision_config=lite_config(),
                                                 vision_trainable_layers=1))
    encoder.eval()
    seen = []
    encoder.vision_tower.backbone.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    x = item_inputs(6)
    mask = torch.tensor([True, False, True, False, False, False])
    mixed = encoder(**x, image_mask=mask)
    assert seen[-1] == 2  # the two items with an image (the backbone's own call; frozen_features may run too)
    # items with an image: what they get in a batch of their own
    own = encoder(**{k: v[mask] for k, v in x.items()}, image_mask=torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(mixed.item_embeddings[mask], own.item_embeddings)
    # items without one: their embedding does not depend on image tokens at all (any tokens in place of the
    # zeros they now get give the same embedding), so not computing them changes nothing
    zeros = encoder._projected_vision_tokens

    def noisy(pixel_values, vision_features, image_mask):
        tokens = zeros(pixel_values, vision_features, image_mask)
        return torch.where(image_mask[:, None, None], tokens, torch.randn_like(tokens) * 5)

    encoder._projected_vision_tokens = noisy
    noise = encoder(**x, image_mask=mask)
    torch.testing.assert_close(noise.item_embeddings, mixed.item_embeddings)
    del encoder._projected_vision_tokens
    assert torch.equal(mixed.vision_embeddings[~mask], torch.zeros_like(mixed.vision_embeddings[~mask]))


def test_a_batch_with_no_image_still_gives_the_vision_part_a_gradient():
    """Every trainable parameter gets a gradient (zero) in a text-only batch, as DistributedDataParallel needs."""
    torch.manual_seed(0)
    encoder = PMMRecItemEncoder(tiny_item_config(vision="resnet", vision_config=lite_config(),
                                                 vision_trainable_layers=1))
    encoder.train()
    x = item_inputs(4)
    out = encoder(**x, image_mask=torch.zeros(4, dtype=torch.bool))
    assert torch.equal(out.vision_embeddings, torch.zeros_like(out.vision_embeddings))
    out.item_embeddings.sum().backward()
    vision = [(n, p) for n, p in encoder.named_parameters()
              if p.requires_grad and (n.startswith("vision_tower") or n.startswith("vision_projection"))]
    assert vision
    for name, p in vision:
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) == 0, name
    text = [p for n, p in encoder.named_parameters() if n.startswith("text_projection")]
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in text)
