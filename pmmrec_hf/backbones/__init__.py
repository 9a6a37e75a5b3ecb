"""Extra vision backbones packaged as transformers models, loadable like any Hub checkpoint.

Importing `pmmrec_hf` registers them with `AutoConfig` / `AutoModel`; saved folders also carry their code
(`auto_map`), so they load with `trust_remote_code=True` where `pmmrec_hf` is not installed.
"""

from .efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteModel, EfficientNetLitePreTrainedModel

__all__ = ["EfficientNetLiteConfig", "EfficientNetLiteModel", "EfficientNetLitePreTrainedModel"]
