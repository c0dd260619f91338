"""Which parameters train in each tuning mode. REACT's two modes freeze the text tower; ``full``
(pre-training a base, plain fine-tuning) trains everything."""

from __future__ import annotations

from torch import nn

TUNING_MODES = ("gated-image", "locked-text", "full")


def is_trainable(name: str, mode: str) -> bool:
    if mode not in TUNING_MODES:
        raise ValueError(f"tuning mode: got {mode!r}; choose one of {', '.join(TUNING_MODES)}")
    if name == "logit_scale" or mode == "full":
        return True
    if mode == "gated-image":
        return ".gated_attn_block." in name
    return name.startswith("visual.")


def apply_tuning_mode(model: nn.Module, mode: str) -> list[str]:
    """Set ``requires_grad`` for ``mode``; return the sorted names of the trainable parameters."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, mode))
        if param.requires_grad:
            trainable.append(name)
    if mode == "gated-image" and len(trainable) == 1:
        raise ValueError(
            "tuning mode 'gated-image' needs gated blocks: build the model with gated_layers > 0"
        )
    return sorted(trainable)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """REACT's recipe: no weight decay on biases, norms, gates and logit_scale (all < 2-d)."""
    return param.ndim < 2 or "alpha_" in name or "logit_scale" in name
