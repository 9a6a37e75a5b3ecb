"""pmmrec_hf: transferable multi-modal sequential recommendation (PMMRec) the Hugging Face way."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from .configuration_pmmrec import PMMRecConfig, PMMRecItemEncoderConfig, PMMRecUserEncoderConfig
from .modeling_pmmrec import (
    BackboneTower,
    PMMRecItemEncoder,
    PMMRecItemEncoderOutput,
    PMMRecModel,
    PMMRecModelOutput,
    PMMRecPreTrainedModel,
    PMMRecUserEncoder,
    PMMRecUserEncoderOutput,
)

from .backbones import EfficientNetLiteConfig, EfficientNetLiteModel
from .processing_pmmrec import PMMRecImageProcessor, PMMRecProcessor
from .pipelines import (
    ITEM_EMBEDDING_TASK,
    RECOMMENDATION_TASK,
    PMMRecItemEmbeddingPipeline,
    PMMRecRecommendationPipeline,
)
from .feature_cache import FeatureCache
from .sasrec import SASRecConfig, SASRecModel

__version__ = "0.1.0"


def __getattr__(name):  # light top-level imports: the Hub helpers load on first use
    if name in ("push_pmmrec_to_hub", "check_component"):
        from . import hub

        return getattr(hub, name)
    if name == "PMMRecCardData":
        from .model_card import PMMRecCardData

        return PMMRecCardData
    raise AttributeError(f"module 'pmmrec_hf' has no attribute {name!r}")


def _register() -> None:
    """Every model type of the package, for AutoConfig / AutoModel (importing any submodule runs this)."""
    for config_class, model_class in (
        (PMMRecItemEncoderConfig, PMMRecItemEncoder),
        (PMMRecUserEncoderConfig, PMMRecUserEncoder),
        (PMMRecConfig, PMMRecModel),
        (SASRecConfig, SASRecModel),  # the ID baseline
        (EfficientNetLiteConfig, EfficientNetLiteModel),  # an extra backbone type (offline ImageNet weights)
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        # saved checkpoints carry their code and an auto_map, so they load with trust_remote_code
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModel")
    # the processor of the item encoder and the full model (AutoProcessor / AutoImageProcessor on a saved folder)
    for config_class in (PMMRecItemEncoderConfig, PMMRecConfig):
        AutoProcessor.register(config_class, PMMRecProcessor, exist_ok=True)
        AutoImageProcessor.register(config_class, slow_image_processor_class=PMMRecImageProcessor, exist_ok=True)
    # the custom pipelines (saved checkpoints list them in config.custom_pipelines)
    from transformers.pipelines import PIPELINE_REGISTRY

    for task, pipeline_class in ((ITEM_EMBEDDING_TASK, PMMRecItemEmbeddingPipeline),
                                 (RECOMMENDATION_TASK, PMMRecRecommendationPipeline)):
        if task not in PIPELINE_REGISTRY.supported_tasks:
            PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=AutoModel,
                                                type="multimodal")


_register()

__all__ = [
    "PMMRecConfig",
    "PMMRecItemEncoderConfig",
    "PMMRecUserEncoderConfig",
    "PMMRecPreTrainedModel",
    "PMMRecItemEncoder",
    "PMMRecUserEncoder",
    "PMMRecModel",
    "PMMRecItemEncoderOutput",
    "PMMRecUserEncoderOutput",
    "PMMRecModelOutput",
    "BackboneTower",
    "SASRecConfig",
    "SASRecModel",
    "FeatureCache",
    "PMMRecImageProcessor",
    "PMMRecProcessor",
    "PMMRecItemEmbeddingPipeline",
    "PMMRecRecommendationPipeline",
]
