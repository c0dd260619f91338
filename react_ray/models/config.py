"""Which CLIP to build: the one model description every stage and both Serve apps take."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from react_ray.fields import StrictModel, Uri, absolute_uri, is_weights_path


def _weights_or_tag(pretrained: str) -> str:
    return absolute_uri(pretrained) if is_weights_path(pretrained) else pretrained


class ModelConfig(StrictModel):
    """Which CLIP to build. ``pretrained`` is an OpenCLIP tag (``laion2b_s34b_b79k``) or a
    weights file; ``checkpoint`` is a REACT-format state_dict (local, ``file://`` or ``s3://``).
    REACT's released names (``name: react_ViT-L-14``, ``pretrained: react_clip_ret_laion400m``)
    become the model that fits them, with their local copy as checkpoint (models/releases.py)."""

    name: str = "react-tiny"
    pretrained: Annotated[str, AfterValidator(_weights_or_tag)] | None = None
    checkpoint: Uri | None = None
    gated_layers: int | None = Field(
        default=None,
        ge=0,
        description="gated blocks before the last K ViT blocks; None = REACT's K",
    )
    base_tag: str | None = Field(
        default=None,
        description="the OpenCLIP tag the checkpoint's weights descend from: its image statistics "
        "apply (when the checkpoint does not record its own)",
    )
    release: str | None = Field(
        default=None, description="set from REACT's released names: model:tag"
    )

    @model_validator(mode="after")
    def _react_release(self) -> ModelConfig:
        from react_ray.models.releases import find_release, is_release_name

        if self.release is not None or not is_release_name(self.name, self.pretrained):
            return self
        release = find_release(self.name, self.pretrained)
        self.release = release.label  # first: each assignment below validates the model again
        if self.checkpoint is None:
            self.checkpoint = absolute_uri(release.local_uri())
        self.name, self.pretrained, self.gated_layers = (
            release.open_clip_name,
            None,
            release.gated_layers,
        )
        self.base_tag = release.base_tag
        return self
