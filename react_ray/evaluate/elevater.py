"""ELEVATER's 20 image-classification sets, zero-shot, as REACT reports them: one table, a row
per dataset and a column per model, each cell the dataset's own metric.

Class names and templates are the ones OpenAI published with CLIP and CLIP_benchmark ships
(``react_ray/resources``, see SOURCES.md); the metric per dataset is ELEVATER's: mean per-class
accuracy for Caltech101, FGVC Aircraft, Flowers and Pets, 11-point mAP for VOC2007 (multi-label:
``.cls`` ``3,7``), ROC-AUC for Hateful Memes, accuracy elsewhere. The sets themselves are not
downloadable here: point ``root`` at the folders ELEVATER's toolkit prepares.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import yaml

from react_ray import storage
from react_ray.config import ElevaterConfig, EvaluateConfig
from react_ray.evaluate.metrics import METRIC_NAMES, TaskMetric
from react_ray.report import page, table


@dataclass(frozen=True)
class ElevaterSet:
    resources: str  # the class-name and template sets in react_ray/resources
    metric: TaskMetric


# ELEVATER's dataset names -> our shipped class names / templates and its metric.
ELEVATER: dict[str, ElevaterSet] = {
    "caltech-101": ElevaterSet("caltech101", "mean_per_class"),
    "cifar-10": ElevaterSet("cifar10", "accuracy"),
    "cifar-100": ElevaterSet("cifar100", "accuracy"),
    "country211": ElevaterSet("country211", "accuracy"),
    "dtd": ElevaterSet("dtd", "accuracy"),
    "eurosat_clip": ElevaterSet("eurosat", "accuracy"),
    "fer-2013": ElevaterSet("fer2013", "accuracy"),
    "fgvc-aircraft-2013b-variants102": ElevaterSet("fgvc_aircraft", "mean_per_class"),
    "food-101": ElevaterSet("food101", "accuracy"),
    "gtsrb": ElevaterSet("gtsrb", "accuracy"),
    "hateful-memes": ElevaterSet("hateful_memes", "roc_auc"),
    "kitti-distance": ElevaterSet("kitti_closest_vehicle_distance", "accuracy"),
    "mnist": ElevaterSet("mnist", "accuracy"),
    "oxford-flower-102": ElevaterSet("flowers", "mean_per_class"),
    "oxford-iiit-pets": ElevaterSet("pets", "mean_per_class"),
    "patch-camelyon": ElevaterSet("pcam", "accuracy"),
    "rendered-sst2": ElevaterSet("renderedsst2", "accuracy"),
    "resisc45_clip": ElevaterSet("resisc45", "accuracy"),
    "stanford-cars": ElevaterSet("cars", "accuracy"),
    "voc-2007-classification": ElevaterSet("voc2007", "11point_mAP"),
}


def task_spec(name: str) -> dict:
    entry = ELEVATER[name]
    return {"name": name, "classnames_from": entry.resources, "templates": entry.resources, "metric": entry.metric}


def run_elevater(config: ElevaterConfig) -> dict:
    """Evaluate every model on every ELEVATER set found under ``root``; write elevater.json/.html."""
    from react_ray.evaluate.zeroshot import run_evaluation

    start = time.perf_counter()
    wanted = config.datasets or list(ELEVATER)
    present = [n for n in wanted if storage.exists(storage.join(config.root, n))]
    if not present:
        raise FileNotFoundError(f"elevater: none of {', '.join(wanted)} under {config.root}")
    scores: dict[str, dict[str, float]] = {}
    for name in present:
        task_uri = storage.join(config.output, name, "task.yaml")  # a record of what was asked
        storage.write_text_atomic(task_uri, yaml.safe_dump(task_spec(name), sort_keys=False))
        report = run_evaluation(EvaluateConfig(
            eval_set=storage.join(config.root, name), task=task_uri, models=config.models,
            output=storage.join(config.output, name), batch_size=config.batch_size,
            distributed=config.distributed, ray_address=config.ray_address))
        scores[name] = {label: 100 * m["task_metric"] for label, m in report.results.items()}
        print(f"elevater: {name} ({METRIC_NAMES[ELEVATER[name].metric]}): "
              + ", ".join(f"{label} {value:.2f}" for label, value in scores[name].items()))
    labels = list(config.models)
    means = {label: sum(s[label] for s in scores.values()) / len(scores) for label in labels}
    summary = {"datasets": scores, "mean": means, "missing": [n for n in wanted if n not in present],
               "seconds": round(time.perf_counter() - start, 1)}
    rows = [[name, METRIC_NAMES[ELEVATER[name].metric], *(f"{s[label]:.2f}" for label in labels)]
            for name, s in scores.items()]
    rows.append([f"mean of {len(scores)}", "", *(f"{means[label]:.2f}" for label in labels)])
    storage.write_text_atomic(storage.join(config.output, "elevater.json"), json.dumps(summary, indent=1))
    missing = f"<p>Not found under {config.root}: {', '.join(summary['missing'])}</p>" if summary["missing"] else ""
    storage.write_text_atomic(storage.join(config.output, "elevater.html"),
                              page("ELEVATER zero-shot", missing + table(["dataset", "metric", *labels], rows)))
    widths = [max(len(str(c)) for c in column) for column in zip(["dataset", "metric", *labels], *rows)]
    for row in [["dataset", "metric", *labels], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    return summary
