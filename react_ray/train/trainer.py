"""Stage 4 on Ray Train: a ``TorchTrainer`` over the training shards, fault tolerant and resumable.

The run directory (``config.output``, local or ``s3://``) is Ray Train's ``storage_path/name``:
checkpoints land there every ``checkpoint_every`` steps; a worker that dies is replaced and
the group resumes from the last checkpoint (``FailureConfig``); running the same job again
resumes too. At the end the run holds ``model.pt`` (REACT format, bare fp16 state_dict) and
``metrics.jsonl``; the job (``react_ray.jobs.train``) adds ``training.png`` and ``train.json``.
"""

from __future__ import annotations

import json
import posixpath

from react_ray.config import TrainConfig
from react_ray.formats import storage
from react_ray.ray_utils import LOG_LEVEL
from react_ray.train.data import training_dataset
from react_ray.train.loop import train_worker


def _run_config(config: TrainConfig):
    import pyarrow.fs
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    output = config.output.rstrip("/")
    filesystem = None
    # through fsspec, so S3 endpoints/credentials work as everywhere else
    if storage.is_remote(output):
        fs, path = storage.filesystem(output)
        filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
        parent, name = posixpath.split(path)
    else:
        parent, name = posixpath.split(storage.local_path(output))
    return RunConfig(
        name=name,
        storage_path=parent,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        logging_config=ray.LoggingConfig(log_level=LOG_LEVEL),  # Train's own notices: its log files
    )


def make_trainer(config: TrainConfig):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = config.worker.train_resources()
    return TorchTrainer(
        train_worker,
        train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.worker.num_gpus > 0,
            resources_per_worker=resources,
        ),
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
