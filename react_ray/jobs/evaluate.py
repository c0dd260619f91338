"""``react-ray evaluate`` and ``react-ray elevater``: zero-shot evaluation, its reports."""

from __future__ import annotations

import json
import time

import yaml

from react_ray.config import ElevaterConfig, EvaluateConfig
from react_ray.evaluate.elevater import ELEVATER, task_spec
from react_ray.evaluate.metrics import METRIC_NAMES
from react_ray.evaluate.zeroshot import EvalReport, evaluate, write_report
from react_ray.formats import storage
from react_ray.ray_utils import connect
from react_ray.report import page, table


def run_evaluation(config: EvaluateConfig) -> EvalReport:
    """Evaluate; write ``report.json`` / ``report.html``; return the report."""
    if config.distributed == "ray":
        connect(config.ray_address)
    report = evaluate(config)
    write_report(config.output, report)
    return report


def run_elevater(config: ElevaterConfig) -> dict:
    """Evaluate every model on every ELEVATER set found under ``root``; write
    elevater.json/.html."""
    start = time.perf_counter()
    wanted = config.datasets or list(ELEVATER)
    present = [n for n in wanted if storage.exists(storage.join(config.root, n))]
    if not present:
        raise FileNotFoundError(f"elevater: none of {', '.join(wanted)} under {config.root}")
    scores: dict[str, dict[str, float]] = {}
    for name in present:
        task_uri = storage.join(config.output, name, "task.yaml")  # a record of what was asked
        storage.write_text_atomic(task_uri, yaml.safe_dump(task_spec(name), sort_keys=False))
        report = run_evaluation(
            EvaluateConfig(
                eval_set=storage.join(config.root, name),
                task=task_uri,
                models=config.models,
                output=storage.join(config.output, name),
                batch_size=config.batch_size,
                distributed=config.distributed,
                pool=config.pool,
                ray_address=config.ray_address,
            )
        )
        scores[name] = {label: 100 * m["task_metric"] for label, m in report.results.items()}
        print(
            f"elevater: {name} ({METRIC_NAMES[ELEVATER[name].metric]}): "
            + ", ".join(f"{label} {value:.2f}" for label, value in scores[name].items())
        )
    labels = list(config.models)
    means = {label: sum(s[label] for s in scores.values()) / len(scores) for label in labels}
    summary = {
        "datasets": scores,
        "mean": means,
        "missing": [n for n in wanted if n not in present],
        "seconds": round(time.perf_counter() - start, 1),
    }
    rows = [
        [name, METRIC_NAMES[ELEVATER[name].metric], *(f"{s[label]:.2f}" for label in labels)]
        for name, s in scores.items()
    ]
    rows.append([f"mean of {len(scores)}", "", *(f"{means[label]:.2f}" for label in labels)])
    storage.write_text_atomic(
        storage.join(config.output, "elevater.json"), json.dumps(summary, indent=1)
    )
    missing = (
        f"<p>Not found under {config.root}: {', '.join(summary['missing'])}</p>"
        if summary["missing"]
        else ""
    )
    storage.write_text_atomic(
        storage.join(config.output, "elevater.html"),
        page("ELEVATER zero-shot", missing + table(["dataset", "metric", *labels], rows)),
    )
    widths = [
        max(len(str(c)) for c in column) for column in zip(["dataset", "metric", *labels], *rows)
    ]
    for row in [["dataset", "metric", *labels], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    return summary
