"""EfficientNet-Lite as a transformers backbone: re-exported from the flat modules that travel with checkpoints
(`pmmrec_hf/configuration_efficientnet_lite.py`, `pmmrec_hf/modeling_efficientnet_lite.py`; remote code needs
modules that sit next to each other and import each other relatively)."""

from ..configuration_efficientnet_lite import EfficientNetLiteConfig
from ..modeling_efficientnet_lite import EfficientNetLiteModel, EfficientNetLitePreTrainedModel

__all__ = ["EfficientNetLiteConfig", "EfficientNetLiteModel", "EfficientNetLitePreTrainedModel"]
