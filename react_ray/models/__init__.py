"""The model layer: OpenCLIP + REACT gated blocks. Pure torch; imports no Ray."""

from react_ray.models.factory import (
    AMP_DTYPES,
    TINY_MODELS,
    ClipModel,
    autocast,
    available_models,
    build_model,
    embed_dim,
    eval_transform,
    export_react_checkpoint,
    get_tokenizer,
    image_preprocess,
    image_size,
    open_clip_config,
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
    "AMP_DTYPES",
    "TINY_MODELS",
    "TUNING_MODES",
    "ClipModel",
    "GatedResidualBlock",
    "apply_tuning_mode",
    "autocast",
    "available_models",
    "build_model",
    "embed_dim",
    "eval_transform",
    "export_react_checkpoint",
    "gate_values",
    "gated_blocks",
    "get_tokenizer",
    "image_preprocess",
    "image_size",
    "insert_gated_blocks",
    "is_trainable",
    "no_weight_decay",
    "open_clip_config",
    "react_gated_layers",
    "read_state_dict",
]
