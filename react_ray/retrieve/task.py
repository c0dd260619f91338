"""A downstream task as REACT sees it: class names and prompt templates, nothing else.

```yaml
name: shapes
classnames: [circle, square, triangle]     # or classnames_from: imagenet1k
templates: imagenet80                       # a shipped set, or a list of strings with {}
metric: accuracy                            # mean_per_class | 11point_mAP | roc_auc (evaluation)
k_per_prompt: 200
mode: text-to-image                         # text-to-text | both
```
Shipped sets live in ``react_ray/resources`` (see its SOURCES.md).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from react_ray.config import StrictModel, build_config
from react_ray.evaluate.metrics import TaskMetric
from react_ray.formats import storage

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
RetrievalMode = Literal["text-to-image", "text-to-text", "both"]


@cache
def shipped(kind: str) -> dict[str, list[str]]:
    """``templates`` or ``classnames``: the shipped named sets."""
    return json.loads((RESOURCES / f"{kind}.json").read_text())


def is_plain_template(template: str) -> bool:
    """Exactly one bare ``{}`` and no other braces: ``str.format`` then only substitutes the class
    name (``{:>1000000000}`` or ``{0.__class__}`` would not be plain substitution)."""
    return (
        template.count("{}") == 1
        and template.replace("{}", "", 1).count("{") == 0
        and template.count("}") == 1
    )


class ColumnFilter(StrictModel):
    """Keep a pair only if its metadata value passes every bound given."""

    min: float | None = None
    max: float | None = None
    equals: str | float | None = None
    not_contains: str | None = None


class TaskSpec(StrictModel):
    name: str = Field(min_length=1)
    classnames: list[str] | None = None
    classnames_from: str | None = Field(
        default=None, description="a shipped class-name set, e.g. imagenet1k"
    )
    templates: list[str] | str = "imagenet80"
    metric: TaskMetric = Field(
        default="accuracy", description="the evaluation's headline metric (ELEVATER's per dataset)"
    )
    k_per_prompt: int = Field(default=100, ge=1, le=100_000)
    mode: RetrievalMode = "text-to-image"
    score_threshold: float | None = Field(default=None, ge=-1, le=1)
    per_class_cap: int | None = Field(default=None, ge=1)
    balance: bool = Field(
        default=False, description="cap every class at the smallest class's count"
    )
    cross_class: Literal["best", "drop"] = Field(
        default="best",
        description="a pair claimed by several classes: to the best-scoring one, or dropped",
    )
    near_duplicate_threshold: float | None = Field(
        default=0.95,
        gt=0,
        le=1,
        description="drop pairs whose image embedding is this close to a kept one",
    )
    filters: dict[str, ColumnFilter] = Field(default_factory=dict)
    blocklist: str | None = Field(
        default=None, description="file of ids to exclude, one per line (local or s3://)"
    )

    @field_validator("classnames")
    @classmethod
    def _classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("empty class list; give at least one class name")
            blank = [i for i, name in enumerate(value) if not name.strip()]
            if blank:
                raise ValueError(f"class names at positions {blank} are empty")
            duplicates = sorted({n for n in value if value.count(n) > 1})
            if duplicates:
                raise ValueError(f"duplicate class names {duplicates}")
        return value

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            if value not in shipped("templates"):
                raise ValueError(
                    f"unknown template set {value!r}; shipped sets: "
                    f"{', '.join(shipped('templates'))}"
                )
            return value
        if not value:
            raise ValueError("empty template list")
        bad = [t for t in value if not is_plain_template(t)]
        if bad:
            raise ValueError(
                f"every template needs exactly one '{{}}' for the class name and no other braces; "
                f"these do not: {bad[:3]}"
            )
        return value

    @model_validator(mode="after")
    def _one_class_source(self) -> TaskSpec:
        if (self.classnames is None) == (self.classnames_from is None):
            raise ValueError(
                "give exactly one of classnames (a list) or classnames_from (a shipped set)"
            )
        if self.classnames_from is not None and self.classnames_from not in shipped("classnames"):
            raise ValueError(
                f"classnames_from: unknown set {self.classnames_from!r}; shipped sets: "
                f"{', '.join(shipped('classnames'))}"
            )
        return self

    @property
    def classes(self) -> list[str]:
        return (
            self.classnames
            if self.classnames is not None
            else shipped("classnames")[self.classnames_from]
        )

    @property
    def template_list(self) -> list[str]:
        return (
            shipped("templates")[self.templates]
            if isinstance(self.templates, str)
            else self.templates
        )

    def prompts(self) -> list[tuple[int, str]]:
        """(class index, prompt) for every class x template, class-major."""
        return [
            (i, template.format(name))
            for i, name in enumerate(self.classes)
            for template in self.template_list
        ]


def load_task(uri: str) -> TaskSpec:
    data = yaml.safe_load(storage.read_bytes(uri))
    return build_config(TaskSpec, data if isinstance(data, dict) else {"name": data})
