"""Parameter accounting for REACT tuning modes, on the meta device (no memory, no weights)."""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch

from react_ray.models.factory import open_clip_quiet, react_gated_layers, register_tiny_models
from react_ray.models.freezing import is_trainable
from react_ray.models.gated import gated_blocks, insert_gated_blocks


@dataclass(frozen=True)
class ParameterReport:
    model: str
    base_params: int
    gated_layers: int
    gated_block_params: int  # one gated block
    gated_image_trainable: int  # gated blocks + logit_scale
    locked_text_trainable: int  # whole image tower + logit_scale

    @property
    def gated_fraction(self) -> float:
        return self.gated_image_trainable / (
            self.base_params + self.gated_layers * self.gated_block_params
        )

    def row(self) -> list[str]:
        return [
            self.model,
            f"{self.base_params:,}",
            str(self.gated_layers),
            f"{self.gated_block_params:,}",
            f"{self.gated_image_trainable:,}",
            f"{100 * self.gated_fraction:.1f}%",
            f"{self.locked_text_trainable:,}",
        ]


REPORT_HEADERS = [
    "model",
    "base params",
    "K",
    "params / gated block",
    "gated-image trainable",
    "of total",
    "locked-text trainable",
]


def parameter_report(name: str, gated_layers: int | None = None) -> ParameterReport:
    register_tiny_models()
    # shapes only, no weights
    with (
        torch.device("meta"),
        open_clip_quiet(random_weights_expected=True),
    ):
        model = open_clip.create_model(name, device="meta")
    base = sum(p.numel() for p in model.parameters())
    locked = sum(p.numel() for n, p in model.named_parameters() if is_trainable(n, "locked-text"))
    k = react_gated_layers(name) if gated_layers is None else gated_layers
    with torch.device("meta"):
        insert_gated_blocks(model, k)
    per_block = sum(p.numel() for p in gated_blocks(model)[0].parameters())
    gated = sum(p.numel() for n, p in model.named_parameters() if is_trainable(n, "gated-image"))
    return ParameterReport(name, base, k, per_block, gated, locked)
