"""The building blocks every config shares: strict models, URIs, networks, precisions."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which field and why."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


def absolute_uri(uri: str) -> str:
    """A local path (relative, ``~``, ``file://``) as an absolute plain path; other URIs (``s3://``)
    as given.

    Paths are resolved once, where a config is built, against the current directory: Ray Train,
    Ray Data workers and Serve replicas run elsewhere, and Ray Train refuses relative storage paths.
    """
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def is_weights_path(pretrained: str) -> bool:
    """``pretrained`` names a weights file (else it is an OpenCLIP tag such as
    ``laion2b_s34b_b79k``)."""
    return "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


# Every field that names a file or directory: local paths become absolute when the config is built.
Uri = Annotated[str, AfterValidator(absolute_uri)]


def _network(cidr: str) -> str:
    import ipaddress

    return str(ipaddress.ip_network(cidr, strict=False))  # ValueError names the bad value


Network = Annotated[str, AfterValidator(_network)]  # a CIDR block, e.g. 10.0.0.0/8


Precision = Literal["fp32", "fp16", "bf16"]
# "full" trains everything: pre-training a base, or plain fine-tuning (not a REACT mode)
TuningMode = Literal["gated-image", "locked-text", "full"]


class Resources(StrictModel):
    """What each Ray task, actor, Train worker or Serve replica of a step asks Ray for: given to
    Ray as is, never guessed."""

    num_cpus: float = Field(default=1, gt=0)
    num_gpus: float = Field(default=0, ge=0)
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources, e.g. {cpu_node: 1} to keep the work on a node group",
    )

    def ray_options(self) -> dict:
        """For ``.options()``, ``map_batches`` and Serve's ``ray_actor_options``."""
        options = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        return options | ({"resources": dict(self.custom)} if self.custom else {})

    def train_resources(self) -> dict[str, float]:
        """For Ray Train's ``ScalingConfig(resources_per_worker=...)``."""
        return (
            {"CPU": self.num_cpus} | ({"GPU": self.num_gpus} if self.num_gpus else {}) | self.custom
        )


class ActorPool(Resources):
    """An autoscaling pool of actors, each asking for these resources."""

    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    device: Literal["cuda", "cpu"] | None = Field(
        default=None,
        description="None: cuda when num_gpus > 0; cpu runs the model on a simulated GPU node",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ActorPool:
        if self.max_actors < self.min_actors:
            raise ValueError(
                f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})"
            )
        return self


def check_half_precision(precision: str, num_gpus: float, gpus_field: str) -> None:
    """fp16 / bf16 (AMP) only where the work runs on GPUs: on CPUs it is slower than fp32, and
    refusing at load time beats failing mid-run."""
    if precision != "fp32" and num_gpus == 0:
        raise ValueError(
            f"precision: got {precision!r} with {gpus_field}=0; half precision runs only on GPUs "
            f"(on CPUs it is slower than fp32): set {gpus_field} > 0 or precision=fp32"
        )


# The Ray cluster a stage runs on.
RayAddress = Annotated[str | None, Field(description="None: RAY_ADDRESS, else a local Ray")]

# Images above this many pixels are refused before decoding (decompression bombs).
MAX_IMAGE_PIXELS = 40_000_000
MaxImagePixels = Annotated[int, Field(ge=1, description="larger images are refused, never decoded")]
