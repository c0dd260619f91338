"""Typed, validated configuration: one pydantic model per stage, YAML presets, CLI overrides.

``load_config(GenerateConfig, "jobs/presets/generate_demo.yaml", ["corpus.num_shards=8"])``
returns a validated ``GenerateConfig`` or raises :class:`ConfigError` whose message names
the field, the bad value and what is allowed.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which field and why."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Precision = Literal["fp32", "fp16", "bf16"]
TuningMode = Literal["gated-image", "locked-text"]


class ModelConfig(StrictModel):
    """Which CLIP to build. ``pretrained`` is an OpenCLIP tag (``laion2b_s34b_b79k``) or a
    weights file; ``checkpoint`` is a REACT-format state_dict (local, ``file://`` or ``s3://``)."""

    name: str = "react-tiny"
    pretrained: str | None = None
    checkpoint: str | None = None
    gated_layers: int | None = Field(
        default=None, ge=0, description="gated blocks before the last K ViT blocks; None = REACT's K"
    )


class CorpusConfig(StrictModel):
    """The synthetic LAION-style corpus (see ``react_ray.data.synthetic``)."""

    num_shards: int = Field(default=4, ge=1)
    samples_per_shard: int = Field(default=500, ge=1, le=10_000)  # img2dataset keys: 4 row digits
    image_size: int = Field(default=64, ge=16, le=1024)
    seed: int = 0
    formats: list[Literal["webdataset", "parquet", "laion-metadata"]] = Field(
        default_factory=lambda: ["webdataset", "parquet", "laion-metadata"], min_length=1
    )
    url_base: str = "https://images.react-ray.invalid"
    eval_samples_per_class: int = Field(default=40, ge=1)
    write_images: bool = Field(
        default=False, description="also write images/<key>.jpg, for serving them over HTTP"
    )


class GenerateConfig(StrictModel):
    output: str = "runs/demo/corpus"
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)


class DemoConfig(StrictModel):
    output: str = "runs/demo"
    model: ModelConfig = Field(default_factory=ModelConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    tuning_mode: TuningMode = "gated-image"


C = TypeVar("C", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"corpus.num_shards=8"`` -> (["corpus", "num_shards"], 8); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key part")
    return key.split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown field (check the spelling against the preset)")
        elif item["type"] == "missing":
            lines.append(f"{field}: required field is missing")
        else:
            lines.append(f"{field}: got {item.get('input')!r}; {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(config_type: type[C], data: dict) -> C:
    try:
        return config_type.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def load_config(config_type: type[C], path: str | None, overrides: list[str] = ()) -> C:
    """Read a YAML preset (or start from defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path:
        from react_ray.storage import read_bytes

        loaded = yaml.safe_load(read_bytes(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded or {}
    return build_config(config_type, apply_overrides(data, list(overrides)))


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
