"""ELEVATER's metrics against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from react_ray.evaluate.metrics import (
    accuracy_metrics,
    average_precision_11point,
    mean_average_precision_11point,
    roc_auc,
    task_metric,
)


def test_11_point_average_precision_by_hand():
    # Ranked: hit, miss, hit, miss, miss -> recall .5 .5 1 1 1, precision 1 .5 2/3 .5 .4. Recall
    # levels
    # 0..0.5 (6 of them) reach precision 1; 0.6..1 (5) reach 2/3 at best.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert average_precision_11point(scores, np.array([1, 0, 1, 0, 0])) == pytest.approx(
        (6 + 5 * 2 / 3) / 11
    )
    assert average_precision_11point(scores, np.array([1, 1, 0, 0, 0])) == 1.0
    # The only positive last: precision 1/5 at every recall level.
    assert average_precision_11point(scores, np.array([0, 0, 0, 0, 1])) == pytest.approx(0.2)
    # Two classes: the mean of the two APs; a class with no positive image is left out.
    both = np.stack([scores, scores[::-1]], 1)
    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0], [0, 1]])
    assert mean_average_precision_11point(both, targets) == pytest.approx(
        ((6 + 5 * 2 / 3) / 11 + 1.0) / 2
    )
    assert mean_average_precision_11point(both[:, :1], np.c_[targets[:, 0]]) == pytest.approx(
        (6 + 5 * 2 / 3) / 11
    )


def test_roc_auc_by_hand():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # A tie between a positive and a negative counts half: (0.5 + 1 + 1 + 1) / 4.
    assert roc_auc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([1, 0, 0, 1])) == pytest.approx(0.875)
    assert roc_auc(np.array([0.3, 0.2]), np.array([0, 1])) == 0.0
    assert np.isnan(roc_auc(np.array([0.3, 0.2]), np.array([1, 1])))


def test_task_metrics_from_logits():
    # Hateful Memes: class 1 is the positive one; its softmax probability ranks the images.
    logits = np.array([[0.2, 0.3], [0.3, 0.1], [0.1, 0.25], [0.4, 0.2], [0.3, 0.2]])
    targets = np.eye(2, dtype=np.int8)[[1, 0, 1, 0, 1]]
    # margins (class 1 - class 0): .1, -.2, .15, -.2, -.1; positives .1 .15 -.1 vs negatives -.2
    # -.2: all above
    assert task_metric("roc_auc", logits, targets) == 1.0
    assert task_metric("accuracy", logits, targets) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="roc_auc needs a binary task"):
        task_metric("roc_auc", np.zeros((2, 3)), np.eye(3, dtype=np.int8)[[0, 1]])
    # Mean per-class (Caltech101, Aircraft, Flowers, Pets): class 0 2/2 right, class 1 1/3.
    logits = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [1, 0]], float)
    targets = np.eye(2, dtype=np.int8)[[0, 0, 1, 1, 1]]
    assert task_metric("mean_per_class", logits, targets) == pytest.approx((1 + 1 / 3) / 2)
    assert task_metric("accuracy", logits, targets) == pytest.approx(3 / 5)


def test_multi_label_images_count_for_each_of_their_classes():
    """VOC2007: an image with a person and a dog is right when the top class is either."""
    logits = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.0, 0.8, 0.1]])
    targets = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 1]], np.int8)
    metrics = accuracy_metrics(logits, targets)
    assert metrics["top1"] == pytest.approx(2 / 3)  # rows 0 and 2
    # class 0: row 0 right; class 1: rows 0 and 2 right, row 1 wrong; class 2: row 2 right
    assert metrics["per_class"] == pytest.approx([1.0, 2 / 3, 1.0])
    # mAP on softmax(100 x cosine) scores: class 1's positives are all three rows -> AP 1; class 0
    # has
    # one positive ranked first -> 1; class 2's positive (row 2, score ~0) ranks below row 1 -> 0.5
    # at
    # every recall level.
    assert task_metric("11point_mAP", logits, targets) == pytest.approx((1 + 1 + 0.5) / 3)


def test_elevater_suite_one_table_with_each_sets_metric(tmp_path):
    """Three ELEVATER sets, one per kind of metric (class folders; webdataset with multi-label .cls;
    a binary set), two models: each cell is the set's own metric, the same as scoring by hand."""
    import io
    import json
    import tarfile

    from PIL import Image

    from react_ray.config import ElevaterConfig, ModelConfig
    from react_ray.evaluate.elevater import ELEVATER
    from react_ray.evaluate.metrics import task_metric
    from react_ray.evaluate.zeroshot import ZeroShotScorer, labeled_samples
    from react_ray.formats import storage
    from react_ray.jobs.evaluate import run_elevater
    from react_ray.retrieve.task import shipped

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            buffer, format="JPEG"
        )
        return buffer.getvalue()

    root = tmp_path / "elevater"
    for name in shipped("classnames")["cifar10"][:4]:
        for i in range(3):
            storage.write_bytes_atomic(str(root / "cifar-10" / name / f"{i}.jpg"), jpeg())
    for folder, labels in (
        ("voc-2007-classification", ["0,14", "14", "3", "6,14", "11"]),
        ("hateful-memes", ["0", "1", "1", "0", "0", "1"]),
    ):
        (root / folder).mkdir(parents=True)
        with tarfile.open(root / folder / "00000.tar", "w") as tar:
            for i, label in enumerate(labels):
                for suffix, data in (("jpg", jpeg()), ("cls", label.encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    models = {
        "base": ModelConfig(name="react-micro"),
        "other": ModelConfig(name="react-micro", gated_layers=2),
    }
    config = ElevaterConfig(
        root=str(root),
        models=models,
        output=str(tmp_path / "out"),
        datasets=["cifar-10", "voc-2007-classification", "hateful-memes", "mnist"],
    )
    summary = run_elevater(config)
    assert list(summary["datasets"]) == ["cifar-10", "voc-2007-classification", "hateful-memes"]
    assert summary["missing"] == ["mnist"]
    for name, scores in summary["datasets"].items():
        classes = shipped("classnames")[ELEVATER[name].resources]
        samples = list(labeled_samples(str(root / name), classes))
        scorer = ZeroShotScorer(
            {k: v.model_dump() for k, v in models.items()},
            classes,
            shipped("templates")[ELEVATER[name].resources],
        )
        logits, _ = scorer.score([image for _, image, _ in samples])
        targets = np.zeros((len(samples), len(classes)), np.int8)
        for row, (_, _, labels) in enumerate(samples):
            targets[row, list(labels)] = 1
        for label in models:
            assert scores[label] == pytest.approx(
                100 * task_metric(ELEVATER[name].metric, logits[label], targets)
            )
    assert json.loads((tmp_path / "out" / "elevater.json").read_text())["mean"][
        "base"
    ] == pytest.approx(sum(s["base"] for s in summary["datasets"].values()) / 3)
    html = (tmp_path / "out" / "elevater.html").read_text()
    assert "11-point mAP" in html and "ROC-AUC" in html and "Not found under" in html
    with pytest.raises(ValueError, match=r"\['imagenet'\] are not ELEVATER's"):
        ElevaterConfig(
            root=str(root), models=models, output=str(tmp_path / "x"), datasets=["imagenet"]
        )


def test_a_classifier_past_its_deadline_stops_building():
    """The zero-shot app passes its request deadline: no class embeddings are computed for a request
    that has already been answered 504."""
    import time

    from react_ray.evaluate.zeroshot import zero_shot_classifier
    from react_ray.models import build_model

    clip = build_model("react-micro")
    with pytest.raises(TimeoutError, match="classifier for 2 classes not built in time"):
        zero_shot_classifier(clip, ["cat", "dog"], ["a {}."], deadline=time.monotonic() - 1)
    assert zero_shot_classifier(
        clip, ["cat", "dog"], ["a {}."], deadline=time.monotonic() + 60
    ).shape == (2, 32)
