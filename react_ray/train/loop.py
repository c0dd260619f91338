"""The per-worker training loop: REACT's recipe on one Ray Train worker (or a plain process).

Model, optimizer and schedule are built the same way whether the loop runs under Ray Train
or in a bare single-process benchmark, so their throughputs compare like for like.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from react_ray.config import ModelConfig, TrainConfig
from react_ray.formats import storage
from react_ray.models import (
    apply_tuning_mode,
    autocast,
    build_model,
    export_react_checkpoint,
    gate_values,
    no_weight_decay,
    react_gated_layers,
)
from react_ray.models.factory import ClipModel
from react_ray.models.gated import set_gated_grad_checkpointing
from react_ray.train.data import augment_and_tokenize
from react_ray.train.loss import clip_loss

MAX_LOGIT_SCALE = math.log(100)


def training_spec(config: TrainConfig) -> ModelConfig:
    """gated-image needs gated blocks: REACT's K unless the config (or a gated checkpoint) says."""
    if config.mode == "gated-image" and config.model.gated_layers is None:
        return config.model.model_copy(
            update={"gated_layers": react_gated_layers(config.model.name)}
        )
    return config.model


def build_for_training(
    config: TrainConfig, device: torch.device | str = "cpu"
) -> tuple[ClipModel, list[str]]:
    clip = build_model(training_spec(config), device=device)
    trainable = apply_tuning_mode(clip.model, config.mode)
    if config.grad_checkpointing:
        if config.mode == "gated-image":
            set_gated_grad_checkpointing(clip.model)
        else:
            clip.model.set_grad_checkpointing(True)
    clip.model.train()
    return clip, trainable


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable set; no weight decay on biases, norms, gates and logit_scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    optim = config.optim
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=optim.peak_lr(config.mode),
        betas=optim.betas,
        eps=optim.eps,
    )


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine to ``min_lr_ratio`` x peak at the last step."""
    peak, warmup = config.optim.peak_lr(config.mode), config.optim.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    floor = config.optim.min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Stepper:
    """One optimizer step of the symmetric CLIP loss, with AMP on GPU and the logit-scale clamp."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        device: torch.device,
    ):
        self.model, self.optimizer, self.config, self.device = model, optimizer, config, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    def __call__(self, images: torch.Tensor, texts: torch.Tensor, step: int) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.config)
        with autocast(self.device, self.config.precision):
            image_features, text_features, logit_scale = self.model(images, texts)[:3]
        loss = clip_loss(image_features.float(), text_features.float(), logit_scale.float())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            _unwrap(self.model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return loss.detach()


@dataclass
class RunState:
    """What a checkpoint restores besides weights: the step and the metric history."""

    step: int = 0
    history: list[dict] = field(default_factory=list)


def save_checkpoint(
    directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState
) -> None:
    """Trainable weights only (the base comes from the model spec), optimizer, step, history."""
    model = _unwrap(model)
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(trainable, os.path.join(directory, "trainable.pt"))
    torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump({"step": state.step, "history": state.history}, f)


def load_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> RunState:
    model = _unwrap(model)
    trainable = torch.load(
        os.path.join(directory, "trainable.pt"), map_location="cpu", weights_only=True
    )
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != expected:
        raise ValueError(
            f"checkpoint {directory} holds {len(trainable)} trainable tensors, this run trains "
            f"{len(expected)}: was it written with another model or mode?"
        )
    model.load_state_dict(trainable, strict=False)
    optimizer.load_state_dict(
        torch.load(os.path.join(directory, "optimizer.pt"), map_location="cpu", weights_only=True)
    )
    with open(os.path.join(directory, "state.json")) as f:
        saved = json.load(f)
    return RunState(step=saved["step"], history=saved["history"])


def _mean_across_workers(value: torch.Tensor) -> float:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def step_metrics(
    model: nn.Module, loss: torch.Tensor, step: int, config: TrainConfig, samples_per_s: float
) -> dict:
    model = _unwrap(model)
    gates = gate_values(model)
    params = list(model.parameters())
    return {
        "step": step,
        "loss": _mean_across_workers(loss),
        "lr": lr_at(step - 1, config),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "samples_per_s": samples_per_s,
        "gate_mean": sum(abs(v) for v in gates.values()) / len(gates) if gates else 0.0,
        **{f"gate/{k}": v for k, v in gates.items()},
    }


def _batches(config: TrainConfig, rank: int, world: int, device: torch.device):
    """Endless (image, text) batches for this worker from the Ray Data shard, pass after pass."""
    import ray.train

    source, per_worker = ray.train.get_dataset_shard("train"), config.batch_size // world
    # every worker reads the same ordered stream and takes its part
    slicing = config.data_sharding == "slice"
    size, shuffle = (
        (config.batch_size, None) if slicing else (per_worker, config.shuffle_buffer or None)
    )
    part = slice(rank * per_worker, (rank + 1) * per_worker) if slicing else slice(None)

    def batches(shuffle_seed: int | None):
        # Ray Data brings decoded pixels; this worker augments its part
        if config.augment_in_worker:
            for batch in source.iter_batches(
                batch_size=size,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=shuffle,
                local_shuffle_seed=shuffle_seed,
            ):
                mine = augment_and_tokenize(
                    {k: v[part] for k, v in batch.items()},
                    config.model.model_dump_json(),
                    config.augment.model_dump_json(),
                )
                yield (
                    torch.from_numpy(mine["image"]).to(device),
                    torch.from_numpy(mine["text"]).to(device),
                )
        else:
            for batch in source.iter_torch_batches(
                batch_size=size,
                drop_last=True,
                local_shuffle_buffer_size=shuffle,
                local_shuffle_seed=shuffle_seed,
                device=device,
                dtypes={"image": torch.float32, "text": torch.long},
            ):
                yield batch["image"][part], batch["text"][part]

    for epoch in itertools.count():
        produced = 0
        seed = None if config.seed is None else config.seed * 1_000_003 + epoch * world + rank
        for images, texts in batches(seed):
            produced += 1
            yield images, texts
        if not produced:
            raise ValueError(
                f"train: {config.data} yields fewer than {size} samples per worker, not one batch; "
                "lower batch_size or add data"
            )


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators (timm's augmentations draw from the first and
    last)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_worker(config_data: dict) -> None:
    """Ray Train's per-worker function: build, restore, train to ``steps``, checkpoint, export."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(config_data)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config.threads or max(1, int(config.worker.num_cpus)))
    # in-worker augmentation and any other draw (build_model fixes the init)
    if config.seed is not None:
        seed_everything(config.seed + rank)
    clip, _ = build_for_training(config)
    model = ray.train.torch.prepare_model(clip.model)
    optimizer = make_optimizer(model, config)
    state = RunState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory, model, optimizer)
        state.history.append({"event": "resumed", "step": state.step, "time": time.time()})
    stepper = Stepper(model, optimizer, config, device)
    batches = _batches(config, rank, world, device)
    last_time, last_step = time.perf_counter(), state.step
    while state.step < config.steps:
        images, texts = next(batches)
        loss = stepper(images, texts, state.step)
        state.step += 1
        checkpoint_now = state.step % config.checkpoint_every == 0 or state.step == config.steps
        if state.step % config.log_every and not checkpoint_now:
            continue
        now = time.perf_counter()
        rate = (state.step - last_step) * config.batch_size / (now - last_time)
        metrics = step_metrics(model, loss, state.step, config, rate)
        last_time, last_step = now, state.step
        state.history.append(metrics)
        # not print(): Ray Train patches it to log too, and the driver would show it twice
        if rank == 0:
            sys.stdout.write(
                f"step {state.step}/{config.steps}  loss {metrics['loss']:.4f}  lr "
                f"{metrics['lr']:.2e}  logit scale {metrics['logit_scale']:.1f}  gates "
                f"{metrics['gate_mean']:.3f}  {rate:.0f} samples/s\n"
            )
            sys.stdout.flush()
        # Ray Train only hears of checkpoints: V2 holds a worker's report until the controller polls
        # it (every 2 s), so a report per logged step stalls the loop. The steps' metrics live in
        # the run's history (checkpointed with it, metrics.jsonl at the end).
        if not checkpoint_now:
            continue
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(directory, model, optimizer, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
    if rank == 0:
        export_react_checkpoint(
            _unwrap(model), storage.join(config.output, "model.pt"), config.model
        )
        metrics_text = "".join(json.dumps(row) + "\n" for row in state.history)
        storage.write_text_atomic(storage.join(config.output, "metrics.jsonl"), metrics_text)
