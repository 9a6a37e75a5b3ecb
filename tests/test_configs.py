import pytest
from transformers import AutoConfig, CLIPVisionConfig, XLMRobertaConfig

from pmmrec_hf import PMMRecConfig, PMMRecItemEncoderConfig, PMMRecUserEncoderConfig
from tiny_models import tiny_config, tiny_item_config, tiny_text_config, tiny_user_config, tiny_vision_config


def test_defaults_reproduce_the_paper_setting():
    item = PMMRecItemEncoderConfig(text_config=XLMRobertaConfig(), vision_config=CLIPVisionConfig(patch_size=32))
    assert (item.hidden_size, item.modality) == (768, "multimodal")
    assert (item.fusion_num_layers, item.fusion_num_attention_heads, item.fusion_intermediate_size) == (1, 12, 3072)
    assert (item.fusion_hidden_act, item.fusion_dropout) == ("gelu", 0.1)
    assert (item.text_trainable_layers, item.vision_trainable_layers) == (2, 2)
    assert (item.max_text_length, item.image_size, item.image_mean, item.image_std) == (50, 224, [0.5] * 3, [0.5] * 3)
    config = PMMRecConfig(item_encoder_config=item)
    user = config.user_encoder_config
    assert (user.hidden_size, user.num_hidden_layers, user.num_attention_heads, user.intermediate_size) == (768, 2, 2, 3072)
    assert (user.hidden_act, user.hidden_dropout_prob, user.layer_norm_eps) == ("relu", 0.1, 1e-6)
    assert (user.layer_norm_position, user.max_position_embeddings) == ("post", 20)
    assert (config.next_item_weight, config.nicl_weight, config.nicl_temperature) == (0.6, 0.4, 0.1)


def test_config_round_trip(tmp_path):
    config = tiny_config(nid_weight=0.3, replace_prob=0.2)
    config.save_pretrained(tmp_path)
    loaded = PMMRecConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.item_encoder_config, PMMRecItemEncoderConfig)
    assert isinstance(loaded.user_encoder_config, PMMRecUserEncoderConfig)
    assert type(loaded.item_encoder_config.vision_config).__name__ == "CLIPVisionConfig"
    assert loaded.item_encoder_config.text_config.hidden_size == 32
    # AutoConfig knows every model_type once pmmrec_hf is imported
    assert type(AutoConfig.from_pretrained(tmp_path)) is PMMRecConfig


def test_sub_configs_as_dicts():
    item = PMMRecItemEncoderConfig(
        text_config=tiny_text_config().to_dict(), vision_config=tiny_vision_config("resnet").to_dict(),
        hidden_size=16, fusion_num_attention_heads=2,
    )
    assert item.text_hidden_size == 32 and item.vision_hidden_size == 24  # resnet: last stage width


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: PMMRecConfig(item_encoder_config=tiny_item_config(), user_encoder_config=tiny_user_config(hidden_size=32,
                              num_attention_heads=2)), "hidden_size"),
        (lambda: tiny_item_config(modality="audio"), "modality"),
        (lambda: tiny_item_config(fusion_num_attention_heads=3), "fusion_num_attention_heads"),
        (lambda: tiny_user_config(num_attention_heads=3), "num_attention_heads"),
        (lambda: tiny_item_config(text_trainable_layers=-2), "text_trainable_layers"),
        (lambda: tiny_item_config(modality="text", text_config=None), "text_config"),
        (lambda: tiny_item_config(modality="vision", vision_config=None), "vision_config"),
        (lambda: tiny_item_config(fusion_dropout=1.5), "fusion_dropout"),
        (lambda: tiny_item_config(hidden_size=0), "hidden_size"),
        (lambda: tiny_item_config(image_mean=[0.5, 0.5]), "image_mean"),
        (lambda: tiny_user_config(layer_norm_position="middle"), "layer_norm_position"),
        (lambda: tiny_config(nicl_temperature=0), "nicl_temperature"),
        (lambda: tiny_config(replace_prob=1.2), "replace_prob"),
        (lambda: tiny_config(nid_weight=-1.0), "nid_weight"),
        (lambda: PMMRecItemEncoderConfig(text_config={"hidden_size": 3}), "text_config"),
        (lambda: PMMRecConfig(), "item_encoder_config"),
    ],
)
def test_bad_configs_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()
