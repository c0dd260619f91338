"""ELEVATER's 20 image-classification sets, zero-shot, as REACT reports them: one table, a row
per dataset and a column per model, each cell the dataset's own metric.

Class names and templates are the ones OpenAI published with CLIP and CLIP_benchmark ships
(``react_ray/resources``, see SOURCES.md); the metric per dataset is ELEVATER's: mean per-class
accuracy for Caltech101, FGVC Aircraft, Flowers and Pets, 11-point mAP for VOC2007 (multi-label:
``.cls`` ``3,7``), ROC-AUC for Hateful Memes, accuracy elsewhere. The sets themselves are not
downloadable here: point ``root`` at the folders ELEVATER's toolkit prepares.
"""

from __future__ import annotations

from dataclasses import dataclass

from react_ray.config import ELEVATER_SETS
from react_ray.evaluate.metrics import TaskMetric


@dataclass(frozen=True)
class ElevaterSet:
    resources: str  # the class-name and template sets in react_ray/resources
    metric: TaskMetric


# ELEVATER's dataset names -> our shipped class names / templates and its metric (one table,
# which the config validates names against).
ELEVATER: dict[str, ElevaterSet] = {
    name: ElevaterSet(**entry) for name, entry in ELEVATER_SETS.items()
}


def task_spec(name: str) -> dict:
    entry = ELEVATER[name]
    return {
        "name": name,
        "classnames_from": entry.resources,
        "templates": entry.resources,
        "metric": entry.metric,
    }
