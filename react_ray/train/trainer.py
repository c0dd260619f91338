"""Stage 4 on Ray Train: a ``TorchTrainer`` over the training shards, fault tolerant and resumable.

The run directory (``config.output``, local or ``s3://``) is Ray Train's ``storage_path/name``:
checkpoints land there every ``checkpoint_every`` steps; a worker that dies is replaced and
the group resumes from the last checkpoint (``FailureConfig``); running the same job again
resumes too. At the end the run holds ``model.pt`` (REACT format, bare fp16 state_dict),
``metrics.jsonl``, ``training.png`` and ``train.json``.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import asdict, dataclass

from react_ray import storage
from react_ray.config import TrainConfig
from react_ray.leases import holds_lease
from react_ray.ray_utils import LOG_LEVEL, connect
from react_ray.report import png_bytes, pyplot
from react_ray.train.data import training_dataset
from react_ray.train.loop import train_worker


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
        return (f"{self.mode}: {self.steps} steps on {self.workers} worker(s) in {self.seconds:.0f}s "
                f"({self.samples_per_s:.0f} samples/s), final loss {self.final_loss:.3f}; trainable "
                f"{self.trainable_params:,} of {self.total_params:,} params ({share:.1%}); "
                f"resumed {self.resumes}x; model: {storage.join(self.output, 'model.pt')}")


def _run_config(config: TrainConfig):
    import pyarrow.fs
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    output = config.output.rstrip("/")
    filesystem = None
    if storage.is_remote(output):  # through fsspec, so S3 endpoints/credentials work as everywhere else
        fs, path = storage.filesystem(output)
        filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
        parent, name = posixpath.split(path)
    else:
        parent, name = posixpath.split(storage.local_path(output))
    return RunConfig(
        name=name, storage_path=parent, storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        logging_config=ray.LoggingConfig(log_level=LOG_LEVEL),  # Train's own notices: its log files
    )


def make_trainer(config: TrainConfig):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": config.cpus_per_worker} | ({"GPU": 1} if config.use_gpu else {}) | config.worker_resources
    return TorchTrainer(
        train_worker,
        train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     resources_per_worker=resources),
        run_config=_run_config(config),
        datasets={"train": training_dataset(config)},
        dataset_config=_data_config(config),
    )


def _data_config(config: TrainConfig):
    from ray.train import DataConfig

    if config.data_sharding == "stream" and config.seed is None:
        return DataConfig(datasets_to_split="all")
    # Slice: every worker reads the whole stream, so all must see it in the same order; a seeded run
    # must see the same order every time. Train applies its own execution options to each shard (not
    # the dataset's), so the order is asked for here.
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    split = "all" if config.data_sharding == "stream" else []
    return DataConfig(datasets_to_split=split, execution_options=options)


def read_history(output: str) -> list[dict]:
    text = storage.read_bytes(storage.join(output, "metrics.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
    figure.suptitle(title + (f" (dotted: resumed from a checkpoint at {resumes})" if resumes else ""))
    return png_bytes(figure)


@holds_lease("train")
def run_training(config: TrainConfig) -> TrainSummary:
    start = time.perf_counter()
    connect(config.ray_address)
    # The model is built on the workers only (a checkpoint or weights file is read there, not twice).
    print(f"train: {config.mode} on {config.model.name}, {config.steps} steps, global batch {config.batch_size} on "
          f"{config.workers} worker(s) ({'GPU' if config.use_gpu else 'CPU'}) -> {config.output}")
    result = make_trainer(config).fit()
    if result.error is not None:
        raise RuntimeError(f"train: the run failed: {result.error}") from result.error
    history = read_history(config.output)
    storage.write_bytes_atomic(storage.join(config.output, "training.png"),
                               plot_history(history, f"{config.mode} on {config.model.name}"))
    steps = [r for r in history if "loss" in r]
    seconds = time.perf_counter() - start
    summary = TrainSummary(
        output=config.output, mode=config.mode, steps=steps[-1]["step"], workers=config.workers,
        trainable_params=steps[-1]["trainable_params"], total_params=steps[-1]["total_params"],
        final_loss=steps[-1]["loss"], resumes=sum(r.get("event") == "resumed" for r in history),
        seconds=seconds, samples_per_s=sum(r["samples_per_s"] for r in steps[-5:]) / len(steps[-5:]),
    )
    storage.write_text_atomic(storage.join(config.output, "train.json"),
                              json.dumps(asdict(summary) | {"config": config.model_dump(mode="json")}, indent=1))
    return summary
