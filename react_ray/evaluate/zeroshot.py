"""Zero-shot classification with prompt ensembles, for any number of models in one table.

A class's weight is the mean of its L2-normalised template embeddings, renormalised (CLIP's
prompt ensemble). Metrics: top-1, top-5, mean per-class accuracy, and the task's own (ELEVATER's:
``metrics.py``); multi-label sets (VOC2007) give several labels per image. Small sets run in this
process; large ones (``distributed: ray``) run on a Ray Data actor pool, each actor holding
every model, so the images are decoded once for all of them.
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from react_ray.config import EvaluateConfig, ModelConfig
from react_ray.evaluate.metrics import (
    METRIC_NAMES,
    TaskMetric,
    accuracy_metrics,
    paired_bootstrap,
    task_metric,
    top1_hits,
)
from react_ray.fields import MAX_IMAGE_PIXELS
from react_ray.formats import storage
from react_ray.formats.decode import decode_image
from react_ray.formats.readers import IMAGE_EXTENSIONS, image_folder_files, webdataset_samples
from react_ray.models import ClipModel, build_model
from react_ray.report import page, table
from react_ray.retrieve.decontaminate import decontamination_statement
from react_ray.retrieve.task import TaskSpec, load_task

log = logging.getLogger(__name__)


@torch.no_grad()
def zero_shot_classifier(
    clip: ClipModel, classnames: list[str], templates: list[str], deadline: float | None = None
) -> torch.Tensor:
    """(C, D) class weights: the renormalised mean of each class's normalised prompt embeddings.
    ``deadline`` (time.monotonic()): stop with TimeoutError once passed (a request already answered
    504)."""
    weights = []
    for name in classnames:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"classifier for {len(classnames)} classes not built in time")
        prompts = clip.encode_texts([t.format(name) for t in templates])
        weights.append(torch.nn.functional.normalize(prompts.mean(0), dim=0))
    return torch.stack(weights)


def classify_pixels(clip: ClipModel, pixels: list, weights: torch.Tensor) -> np.ndarray:
    """Decoded images (uint8 arrays) -> (N, C) class probabilities under ``weights``."""
    from PIL import Image

    batch = torch.stack([clip.preprocess(Image.fromarray(p)) for p in pixels])
    logits = float(clip.model.logit_scale.detach().exp()) * clip.encode_images(batch) @ weights.T
    return torch.softmax(logits, dim=1).numpy()


# ---------------------------------------------------------------- labeled sets
def _label_files(uri: str) -> tuple[str, list[str]]:
    """("webdataset", tar files) or ("folder", image files) for a labeled set at ``uri``."""
    if uri.endswith(".tar"):
        return "webdataset", [uri]
    tars = storage.list_files(uri, ".tar")
    if tars:
        return "webdataset", tars
    images = image_folder_files(uri)
    if not images:
        raise FileNotFoundError(f"eval_set: {uri} has no .tar shards and no CLASS/*.jpg images")
    return "folder", images


def labeled_samples(
    uri: str, classnames: list[str]
) -> Iterator[tuple[str, bytes | None, tuple[int, ...]]]:
    """(key, image bytes, label indices) for every sample; labels from ``KEY.cls`` (``3``, or
    ``3,7`` for a multi-label image), the json's ``label``/``labels``/``class``, or the folder
    name."""
    kind, files = _label_files(uri)
    return _read_labeled(kind, files, classnames)


# Image files per read task of a folder set (a tar set: one tar per task).
FOLDER_FILES_PER_TASK = 256


def labeled_sources(uri: str) -> list[dict]:
    """The set's files in groups, one per read task: the Ray Data items of ``read_labeled``."""
    kind, files = _label_files(uri)
    step = 1 if kind == "webdataset" else FOLDER_FILES_PER_TASK
    return [{"kind": kind, "files": files[i : i + step]} for i in range(0, len(files), step)]


def read_labeled(batch: dict, classnames: list[str], block_rows: int = 256) -> Iterator[dict]:
    """Ray Data generator UDF: groups of files (``labeled_sources``) -> blocks of key, image
    bytes and labels (``"3,7"``), so images go from the read tasks to the scorers, never through
    the driver."""
    for kind, files in zip(batch["kind"], batch["files"]):
        block = []
        for sample in _read_labeled(str(kind), [str(f) for f in files], classnames):
            block.append(sample)
            if len(block) >= block_rows:
                yield _labeled_columns(block)
                block = []
        if block:
            yield _labeled_columns(block)


def _labeled_columns(block: list[tuple[str, bytes | None, tuple[int, ...]]]) -> dict:
    return {
        "key": np.array([key for key, _, _ in block], object),
        "image": np.array([image or b"" for _, image, _ in block], object),
        "label": np.array([",".join(map(str, labels)) for _, _, labels in block], object),
    }


def _read_labeled(
    kind: str, files: list[str], classnames: list[str]
) -> Iterator[tuple[str, bytes | None, tuple[int, ...]]]:
    index = {name: i for i, name in enumerate(classnames)}
    if kind == "folder":
        for path in files:
            name = path.rstrip("/").split("/")[-2]
            if name not in index:
                raise ValueError(f"eval_set: folder {name!r} ({path}) is not a class of the task")
            yield path, storage.read_bytes(path), (index[name],)
        return
    for tar in files:
        with storage.open_uri(tar) as f:
            for sample in webdataset_samples(f):
                labels = _sample_labels(sample, index, tar)
                image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
                yield f"{tar}:{sample['__key__']}", image, labels


def _sample_labels(sample: dict, index: dict[str, int], tar: str) -> tuple[int, ...]:
    if "cls" in sample:
        labels = [int(x) for x in sample["cls"].decode().split(",") if x.strip()]
    else:
        meta = json.loads(sample.get("json", b"{}"))
        labels = meta.get("labels", [meta.get("label", index.get(meta.get("class")))])
        if None in labels:
            raise ValueError(
                f"eval_set: sample {sample['__key__']} in {tar} has no .cls member and no "
                "label/labels/class in its json"
            )
    if not labels or not all(0 <= int(label) < len(index) for label in labels):
        raise ValueError(
            f"eval_set: sample {sample['__key__']} in {tar} has "
            f"labels {labels}, but the task has {len(index)} classes"
        )
    return tuple(int(label) for label in labels)


# ---------------------------------------------------------------- scoring
class ZeroShotScorer:
    """Every model and its classifier; image bytes -> per-model logits. Also a Ray Data actor."""

    def __init__(self, models: dict[str, dict], classnames: list[str], templates: list[str]):
        self.models = {
            label: build_model(ModelConfig.model_validate(spec)) for label, spec in models.items()
        }
        self.classifiers = {
            label: zero_shot_classifier(clip, classnames, templates)
            for label, clip in self.models.items()
        }

    @torch.no_grad()
    def score(self, images: list[bytes]) -> tuple[dict[str, np.ndarray], list[str | None]]:
        """-> ({model label: (N, C) logits, NaN rows for bad images}, per-image skip reason)."""
        reasons, pixels = [], {}
        out = {
            label: np.full(
                (len(images), len(next(iter(self.classifiers.values())))), np.nan, np.float32
            )
            for label in self.models
        }
        for label, clip in self.models.items():
            resize = tuple(clip.decode_args.items())
            if resize not in pixels:
                pixels[resize] = [
                    decode_image(data or b"", max_pixels=MAX_IMAGE_PIXELS, **clip.decode_args)
                    for data in images
                ]
            decoded = pixels[resize]
            reasons = [reason for _, reason, _ in decoded]
            good = [i for i, (array, _, _) in enumerate(decoded) if array is not None]
            if not good:
                continue
            batch = torch.stack([clip.preprocess(Image.fromarray(decoded[i][0])) for i in good])
            out[label][good] = (clip.encode_images(batch) @ self.classifiers[label].T).numpy()
        return out, reasons

    def __call__(self, batch: dict) -> dict:
        logits, reasons = self.score(list(batch["image"]))
        return {
            "key": batch["key"],
            "label": batch["label"],
            "reason": np.array([r or "" for r in reasons], object),
            **{f"logits::{label}": value for label, value in logits.items()},
        }


@dataclass
class EvalReport:
    task: str
    classnames: list[str]
    results: dict[str, dict]  # model label -> metrics (accuracy_metrics + "task_metric")
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    seconds: float = 0.0
    # e.g. whether the training set was decontaminated
    notes: list[str] = field(default_factory=list)
    # model label -> paired_bootstrap vs the first model
    gains: dict[str, dict] = field(default_factory=dict)
    metric: TaskMetric = (
        "accuracy"  # the task's own metric (ELEVATER's), in its own column when not top-1
    )

    def gain_lines(self) -> list[str]:
        baseline = next(iter(self.results))
        return [
            f"{label} vs {baseline}: {g['gain']:+.2f} points top-1, 95% interval [{g['low']:+.2f}, "
            f"{g['high']:+.2f}] (paired bootstrap over the {self.results[label]['n']} images, "
            f"{g['samples']} resamples)"
            for label, g in self.gains.items()
        ]

    def rows(self) -> list[list[str]]:
        k = min(5, len(self.classnames))
        own = self.metric not in ("accuracy", "mean_per_class")
        return [
            [
                label,
                str(m["n"]),
                f"{100 * m['top1']:.2f}",
                f"{100 * m[f'top{k}']:.2f}",
                f"{100 * m['mean_per_class']:.2f}",
                *([f"{100 * m['task_metric']:.2f}"] if own else []),
            ]
            for label, m in self.results.items()
        ]

    @property
    def headers(self) -> list[str]:
        own = (
            [f"{METRIC_NAMES[self.metric]} %"]
            if self.metric not in ("accuracy", "mean_per_class")
            else []
        )
        return [
            "model",
            "images",
            "top-1 %",
            f"top-{min(5, len(self.classnames))} %",
            "mean per-class %",
            *own,
        ]

    def __str__(self) -> str:
        widths = [max(len(str(x)) for x in col) for col in zip(self.headers, *self.rows())]
        lines = [
            "  ".join(str(c).rjust(w) for c, w in zip(row, widths))
            for row in [self.headers, *self.rows()]
        ]
        skipped = (
            f"; skipped {sum(self.skipped.values())} images {self.skipped}" if self.skipped else ""
        )
        return (
            f"zero-shot on {self.task} ({len(self.classnames)} classes){skipped}\n"
            + "\n".join(lines)
            + "".join(f"\n{line}" for line in [*self.gain_lines(), *self.notes])
        )


def _score_local(
    config: EvaluateConfig, task: TaskSpec
) -> tuple[dict, list[tuple[int, ...]], list[str | None]]:
    scorer = ZeroShotScorer(
        {k: v.model_dump() for k, v in config.models.items()}, task.classes, task.template_list
    )
    logits: list[dict] = []
    labels, reasons = [], []
    batch: list[tuple[str, bytes | None, int]] = []

    def flush():
        out, why = scorer.score([b for _, b, _ in batch])
        logits.append(out)
        labels.extend(label for _, _, label in batch)
        reasons.extend(why)
        batch.clear()

    for sample in labeled_samples(config.eval_set, task.classes):
        batch.append(sample)
        if len(batch) >= config.batch_size:
            flush()
    if batch:
        flush()
    merged = {label: np.concatenate([part[label] for part in logits]) for label in config.models}
    return merged, labels, reasons


def _score_ray(
    config: EvaluateConfig, task: TaskSpec
) -> tuple[dict, list[tuple[int, ...]], list[str | None]]:
    import ray

    sources = labeled_sources(config.eval_set)
    dataset = (
        ray.data.from_items(sources, override_num_blocks=len(sources))
        # images go from read tasks (one per tar / file group) to the scorers, not via the driver
        .map_batches(read_labeled, batch_size=1, fn_kwargs={"classnames": task.classes})
        .map_batches(
            ZeroShotScorer,
            batch_size=config.batch_size,
            **config.pool.ray_options(),
            compute=ray.data.ActorPoolStrategy(
                min_size=config.pool.min_actors, max_size=config.pool.max_actors
            ),
            fn_constructor_kwargs={
                "models": {k: v.model_dump() for k, v in config.models.items()},
                "classnames": task.classes,
                "templates": task.template_list,
            },
        )
    )
    parts = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    # a stable order, whatever the actors did
    order = np.argsort(np.concatenate([p["key"] for p in parts]))
    merged = {
        label: np.concatenate([p[f"logits::{label}"] for p in parts])[order]
        for label in config.models
    }
    labels = np.concatenate([p["label"] for p in parts])[order]
    reasons = np.concatenate([p["reason"] for p in parts])[order]
    return (
        merged,
        [tuple(int(x) for x in text.split(",")) for text in labels],
        [r or None for r in reasons],
    )


def evaluate(config: EvaluateConfig) -> EvalReport:
    """Score every model on the eval set (here, or on the connected Ray with ``distributed: ray``)
    and compare each with the first."""
    start = time.perf_counter()
    task = load_task(config.task)
    score = _score_ray if config.distributed == "ray" else _score_local
    logits, labels, reasons = score(config, task)
    targets = np.zeros((len(labels), len(task.classes)), np.int8)
    for row, indices in enumerate(labels):
        targets[row, list(indices)] = 1
    good = np.array([r is None for r in reasons])
    skipped: dict[str, int] = {}
    for reason in reasons:
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            log.warning("eval image skipped: %s", reason)
    results = {
        label: accuracy_metrics(value[good], targets[good])
        | {"task_metric": task_metric(task.metric, value[good], targets[good])}
        for label, value in logits.items()
    }
    correct = {label: top1_hits(value[good], targets[good]) for label, value in logits.items()}
    baseline = next(iter(correct))
    gains = {
        label: paired_bootstrap(hits, correct[baseline])
        for label, hits in correct.items()
        if label != baseline
    }
    notes = (
        [decontamination_statement(config.training_set, config.eval_set)]
        if config.training_set
        else []
    )
    report = EvalReport(
        task.name,
        task.classes,
        results,
        skipped,
        time.perf_counter() - start,
        notes,
        gains,
        task.metric,
    )
    return report


def write_report(output: str, report: EvalReport) -> None:
    storage.write_text_atomic(
        storage.join(output, "evaluation.json"), json.dumps(asdict(report), indent=1)
    )
    per_class = [
        [name, *(f"{100 * m['per_class'][i]:.1f}" for m in report.results.values())]
        for i, name in enumerate(report.classnames)
    ]
    body = (
        "".join(f"<p>{html.escape(note)}</p>" for note in [*report.gain_lines(), *report.notes])
        + table(report.headers, report.rows())
        + "<h2>Per-class top-1 %</h2>"
        + table(["class", *report.results], per_class)
    )
    storage.write_text_atomic(
        storage.join(output, "evaluation.html"), page(f"Zero-shot: {report.task}", body)
    )
