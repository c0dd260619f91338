"""``react-ray train``: REACT customization (or pre-training) on Ray Train, then its report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from react_ray.config import TrainConfig
from react_ray.formats import storage
from react_ray.leases import holds_lease
from react_ray.ray_utils import connect
from react_ray.report import png_bytes, pyplot
from react_ray.train.trainer import make_trainer, read_history


@dataclass
class TrainSummary:
    output: str
    mode: str
    steps: int
    workers: int
    trainable_params: int
    total_params: int
    final_loss: float
    resumes: int
    seconds: float
    samples_per_s: float

    def __str__(self) -> str:
        share = self.trainable_params / self.total_params
        return (
            f"{self.mode}: {self.steps} steps on {self.workers} worker(s) in {self.seconds:.0f}s "
            f"({self.samples_per_s:.0f} samples/s), final loss {self.final_loss:.3f}; trainable "
            f"{self.trainable_params:,} of {self.total_params:,} params ({share:.1%}); "
            f"resumed {self.resumes}x; model: {storage.join(self.output, 'model.pt')}"
        )


def plot_history(history: list[dict], title: str) -> bytes:
    """Loss, learning rate, logit scale and gate openness against step, as a PNG."""
    plt = pyplot()
    rows = [r for r in history if "loss" in r]
    resumes = [r["step"] for r in history if r.get("event") == "resumed"]
    panels = [("loss", "loss"), ("lr", "learning rate"), ("logit_scale", "logit scale")]
    if any(key.startswith("gate/") for key in rows[0]):
        panels.append(("gate_mean", "mean |tanh gate|"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
    for axis, (key, label) in zip(axes, panels):
        axis.plot([r["step"] for r in rows], [r[key] for r in rows])
        for step in resumes:
            axis.axvline(step, color="tab:red", linestyle=":", linewidth=1)
        axis.set_xlabel("step")
        axis.set_title(label)
    figure.suptitle(
        title + (f" (dotted: resumed from a checkpoint at {resumes})" if resumes else "")
    )
    return png_bytes(figure)


@holds_lease("train")
def run_training(config: TrainConfig) -> TrainSummary:
    """Train on the connected cluster, then plot the curves and write ``train.json``. The model
    is built on the workers only (a checkpoint or weights file is read there, not twice)."""
    start = time.perf_counter()
    connect(config.ray_address)
    print(
        f"train: {config.mode} on {config.model.name}, {config.steps} steps, global batch "
        f"{config.batch_size} on {config.workers} worker(s) "
        f"({'GPU' if config.worker.num_gpus else 'CPU'}) -> {config.output}"
    )
    result = make_trainer(config).fit()
    if result.error is not None:
        raise RuntimeError(f"train: the run failed: {result.error}") from result.error
    history = read_history(config.output)
    storage.write_bytes_atomic(
        storage.join(config.output, "training.png"),
        plot_history(history, f"{config.mode} on {config.model.name}"),
    )
    steps = [r for r in history if "loss" in r]
    seconds = time.perf_counter() - start
    summary = TrainSummary(
        output=config.output,
        mode=config.mode,
        steps=steps[-1]["step"],
        workers=config.workers,
        trainable_params=steps[-1]["trainable_params"],
        total_params=steps[-1]["total_params"],
        final_loss=steps[-1]["loss"],
        resumes=sum(r.get("event") == "resumed" for r in history),
        seconds=seconds,
        samples_per_s=sum(r["samples_per_s"] for r in steps[-5:]) / len(steps[-5:]),
    )
    storage.write_text_atomic(
        storage.join(config.output, "train.json"),
        json.dumps(asdict(summary) | {"config": config.model_dump(mode="json")}, indent=1),
    )
    return summary
