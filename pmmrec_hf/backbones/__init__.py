"""Extra vision backbones packaged as transformers models, loadable like any Hub checkpoint.

Importing this package registers them with `AutoConfig` / `AutoModel`; saved folders also carry their code
(`auto_map`), so they load with `trust_remote_code=True` where `pmmrec_hf` is not installed.
"""

from transformers import AutoConfig, AutoModel

from .efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteModel, EfficientNetLitePreTrainedModel


def _register() -> None:
    AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig, exist_ok=True)
    AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)
    EfficientNetLiteConfig.register_for_auto_class()
    EfficientNetLiteModel.register_for_auto_class("AutoModel")


_register()

__all__ = ["EfficientNetLiteConfig", "EfficientNetLiteModel", "EfficientNetLitePreTrainedModel"]
