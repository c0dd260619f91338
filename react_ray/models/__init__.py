"""The model layer: OpenCLIP + REACT gated blocks. Pure torch; imports no Ray."""

from react_ray.models.factory import (
    TINY_MODELS,
    ClipModel,
    available_models,
    build_model,
    eval_transform,
    export_react_checkpoint,
    get_tokenizer,
    image_preprocess,
    react_gated_layers,
    read_state_dict,
)
from react_ray.models.freezing import TUNING_MODES, apply_tuning_mode, is_trainable, no_weight_decay
from react_ray.models.gated import (
    GatedResidualBlock,
    gate_values,
    gated_blocks,
    insert_gated_blocks,
)

__all__ = [
    "TINY_MODELS",
    "TUNING_MODES",
    "ClipModel",
    "GatedResidualBlock",
    "apply_tuning_mode",
    "available_models",
    "build_model",
    "eval_transform",
    "export_react_checkpoint",
    "gate_values",
    "gated_blocks",
    "get_tokenizer",
    "image_preprocess",
    "insert_gated_blocks",
    "is_trainable",
    "no_weight_decay",
    "react_gated_layers",
    "read_state_dict",
]
