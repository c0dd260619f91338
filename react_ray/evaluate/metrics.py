"""Zero-shot metrics as REACT reports them (ELEVATER's): accuracy, mean per-class accuracy,
11-point mAP (VOC2007, multi-label) and ROC-AUC (Hateful Memes, binary), plus the paired
bootstrap interval of a top-1 gain.

``logits`` are (N, C) image-class cosines; ``targets`` (N, C) multi-hot labels (one 1 per row
for single-label sets). Scores for mAP and ROC-AUC are ELEVATER's: softmax(100 x cosine).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

TaskMetric = Literal["accuracy", "mean_per_class", "11point_mAP", "roc_auc"]
METRIC_NAMES = {
    "accuracy": "accuracy",
    "mean_per_class": "mean per-class accuracy",
    "11point_mAP": "11-point mAP",
    "roc_auc": "ROC-AUC",
}


def top1_hits(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per image: is the top class one of its labels."""
    return targets[np.arange(len(logits)), logits.argmax(1)] > 0


def accuracy_metrics(logits: np.ndarray, targets: np.ndarray) -> dict:
    """top-1, top-k (k = min(5, C)) and mean per-class top-1 (a multi-label image counts for each of
    its classes)."""
    num_classes = targets.shape[1]
    k = min(5, num_classes)
    top = np.argsort(-logits, axis=1)[:, :k]
    top1 = top1_hits(logits, targets)
    topk = np.take_along_axis(targets, top, axis=1).any(1)
    per_class = [
        float(top1[targets[:, c] > 0].mean()) if targets[:, c].any() else float("nan")
        for c in range(num_classes)
    ]
    return {
        "top1": float(top1.mean()),
        f"top{k}": float(topk.mean()),
        "mean_per_class": float(np.nanmean(per_class)),
        "per_class": per_class,
        "n": len(logits),
    }


def softmax_scores(logits: np.ndarray) -> np.ndarray:
    scaled = 100.0 * logits
    scaled -= scaled.max(1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(1, keepdims=True)


def average_precision_11point(scores: np.ndarray, positives: np.ndarray) -> float:
    """VOC2007's AP: the mean over recall r in {0, 0.1, ..., 1} of the best precision at recall >=
    r."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(np.float64)
    if not hits.any():
        return float("nan")
    true_positives = np.cumsum(hits)
    recall = true_positives / hits.sum()
    precision = true_positives / np.arange(1, len(hits) + 1)
    return float(
        np.mean(
            [
                precision[recall >= r].max() if (recall >= r).any() else 0.0
                for r in np.linspace(0, 1, 11)
            ]
        )
    )


def mean_average_precision_11point(scores: np.ndarray, targets: np.ndarray) -> float:
    return float(
        np.nanmean(
            [
                average_precision_11point(scores[:, c], targets[:, c] > 0)
                for c in range(targets.shape[1])
            ]
        )
    )


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive outscores a negative (ties count half)."""
    positives = positives.astype(bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    start = 0
    for end in range(1, len(scores) + 1):
        if end == len(scores) or sorted_scores[end] != sorted_scores[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # 1-based mean rank of the tie group
            start = end
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def task_metric(metric: TaskMetric, logits: np.ndarray, targets: np.ndarray) -> float:
    """The task's headline metric, as ELEVATER computes it."""
    if metric == "accuracy":
        return float(top1_hits(logits, targets).mean())
    if metric == "mean_per_class":
        return accuracy_metrics(logits, targets)["mean_per_class"]
    scores = softmax_scores(logits)
    if metric == "11point_mAP":
        return mean_average_precision_11point(scores, targets)
    if targets.shape[1] != 2:
        raise ValueError(
            "roc_auc needs a binary task (2 classes, the "
            f"second positive); this one has {targets.shape[1]}"
        )
    return roc_auc(scores[:, 1], targets[:, 1] > 0)


def paired_bootstrap(
    correct: np.ndarray, baseline: np.ndarray, samples: int = 10_000, seed: int = 0
) -> dict:
    """Top-1 gain of ``correct`` over ``baseline`` (both per-image booleans on the same images), in
    points, with a 95% percentile interval from resampling the images (the same draw for both)."""
    difference = correct.astype(np.float64) - baseline.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 1000):  # bounded memory: 1000 resamples of N images at a time
        draws = rng.integers(0, len(difference), size=(min(1000, samples - start), len(difference)))
        means[start : start + len(draws)] = difference[draws].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "gain": 100 * float(difference.mean()),
        "low": 100 * float(low),
        "high": 100 * float(high),
        "samples": samples,
    }
