"""Training benchmark: the Ray Train stage against a plain single-process PyTorch loop.

python jobs/bench_train.py [--model react-mini --steps 60 --batch 64 --cpus 2 --repeats 2]

Prints, measured side by side in one run on the same cores, model and data (generated shards):
- Ray Train steady samples/s / plain loop samples/s (goal >= 0.9), the two in turns ``--repeats``
  times, each turn's ratio and their median; the plain loop reads the same
  shards, decodes and augments in-process and runs the same optimizer step (``Stepper``);
- the model-step ceiling on pre-decoded tensors;
- gated-image vs locked-text step time and trainable-parameter fraction.
With ``--gpu``: samples/s per GPU (AMP fp16) for ``--model`` in gated-image mode.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from react_ray.config import CorpusConfig, GenerateConfig, ModelConfig, TrainConfig
from react_ray.formats.readers import list_input_shards, read_shard
from react_ray.jobs.train import run_training
from react_ray.models import get_tokenizer, image_size
from react_ray.ray_utils import start_local
from react_ray.synthetic.corpus import generate_corpus
from react_ray.train.data import _transform, decode_args, decode_for_training
from react_ray.train.loop import Stepper, build_for_training, make_optimizer
from react_ray.train.trainer import read_history


def _plain_batches(config: TrainConfig):
    """The same records, decoded and augmented in this process, batch after batch, pass after
    pass."""
    transform = _transform(config.model.model_dump_json(), config.augment.model_dump_json())
    tokenizer = get_tokenizer(config.model.name)
    from PIL import Image

    while True:
        images, captions = [], []
        for shard in list_input_shards(config.data, "webdataset"):
            for block in read_shard(shard):
                columns = {k: [r[k] for r in block] for k in block[0]}
                decoded = decode_for_training(columns, decode_args(config), config.max_image_pixels)
                for pixels, caption in zip(decoded["pixels"], decoded["caption"]):
                    images.append(transform(Image.fromarray(pixels)))
                    captions.append(caption)
                    if len(images) == config.batch_size:
                        yield torch.stack(images), tokenizer(captions)
                        images, captions = [], []


def plain_loop(config: TrainConfig, device: str = "cpu") -> float:
    """Steady samples/s of a bare loop (first 20% of steps excluded as warm-up)."""
    clip, _ = build_for_training(config, device)
    stepper = Stepper(clip.model, make_optimizer(clip.model, config), config, torch.device(device))
    batches = _plain_batches(config)
    warm = max(1, config.steps // 5)
    for step in range(config.steps):
        if step == warm:
            start = time.perf_counter()
        images, texts = next(batches)
        stepper(images.to(device), texts.to(device), step)
    return (config.steps - warm) * config.batch_size / (time.perf_counter() - start)


def ceiling(config: TrainConfig, steps: int, device: str = "cpu") -> float:
    """Model step only, on one pre-made batch: samples/s with no data work at all."""
    clip, _ = build_for_training(config, device)
    stepper = Stepper(clip.model, make_optimizer(clip.model, config), config, torch.device(device))
    size = image_size(config.model.name)
    images = torch.randn(config.batch_size, 3, size, size, device=device)
    texts = get_tokenizer(config.model.name)(
        [f"a photo of thing {i}" for i in range(config.batch_size)]
    ).to(device)
    for step in range(3):
        stepper(images, texts, step)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        stepper(images, texts, step)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * config.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="react-mini")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="plain loop / Ray Train turns")
    parser.add_argument(
        "--gpu", action="store_true", help="only the per-GPU AMP figure (needs CUDA)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.cpus)
    if args.gpu:
        config = TrainConfig(
            data="unused",
            output="unused",
            model=ModelConfig(name=args.model),
            mode="gated-image",
            batch_size=args.batch,
            worker={"num_gpus": 1},
            precision="fp16",
            grad_checkpointing=True,
        )
        print(
            f"{args.model} gated-image, fp16 AMP, batch "
            f"{args.batch}: {ceiling(config, args.steps, 'cuda'):.0f} "
            "samples/s per GPU (model step, pre-made batch)"
        )
        return
    root = tempfile.mkdtemp(prefix="bench-train-")
    generate_corpus(
        GenerateConfig(
            output=f"{root}/corpus",
            corpus=CorpusConfig(num_shards=4, samples_per_shard=500, formats=["webdataset"]),
        ),
        progress=False,
    )
    common = dict(
        data=f"{root}/corpus/webdataset",
        model=ModelConfig(name=args.model),
        steps=args.steps,
        batch_size=args.batch,
        threads=args.cpus,
        worker={"num_cpus": 1},
        decode={"num_cpus": 0.5},
        cache_decoded=True,
        log_every=5,
        checkpoint_every=args.steps,
        grad_checkpointing=False,
        augment={
            "scale": (0.8, 1.0),
            "hflip": 0.0,
            "color_jitter": None,
            "auto_augment": None,
            "re_prob": 0.0,
            "decode_short_side": 32,
        },
    )
    rows = []
    for mode in ("gated-image", "locked-text"):
        config = TrainConfig(output=f"{root}/plain-{mode}", mode=mode, **common)
        clip, trainable = build_for_training(config)
        params = dict(clip.model.named_parameters())
        share = sum(params[n].numel() for n in trainable) / sum(p.numel() for p in params.values())
        rows.append((mode, share, plain_loop(config), ceiling(config, 20)))
    import ray

    # This machine's speed drifts by a fifth from minute to minute, so the plain loop and Ray Train
    # run in turns and each turn gives its own ratios. Ray is down while the plain loop runs.
    turns = []
    for turn in range(args.repeats):
        plain = plain_loop(TrainConfig(output=f"{root}/plain-{turn}", mode="gated-image", **common))
        start_local(args.cpus)
        rates = []
        for in_worker in (False, True):
            config = TrainConfig(
                output=f"{root}/ray-{turn}-{int(in_worker)}",
                mode="gated-image",
                augment_in_worker=in_worker,
                **common,
            )
            run_training(config)
            history = [r for r in read_history(config.output) if "loss" in r]
            rates.append(
                float(np.mean([r["samples_per_s"] for r in history if r["step"] > args.steps // 5]))
            )
        ray.shutdown()
        turns.append((plain, *rates))
    print(f"\nmodel {args.model}, global batch {args.batch}, {args.steps} steps, {args.cpus} CPUs")
    print(f"{'mode':12} {'trainable':>9} {'plain loop/s':>12} {'ceiling/s':>10}")
    for mode, share, plain, top in rows:
        print(f"{mode:12} {share:9.1%} {plain:12.1f} {top:10.1f}")
    print(f"gated-image / locked-text plain step time: {rows[1][2] / rows[0][2]:.2f}")
    print(
        f"{'turn':>4} {'plain loop/s':>12} {'Ray Train/s':>11} {'ratio':>5} "
        f"{'augment_in_worker/s':>19} {'ratio':>5}"
    )
    for i, (plain, tasks, worker) in enumerate(turns):
        print(
            f"{i + 1:>4} {plain:12.1f} {tasks:11.1f} "
            f"{tasks / plain:5.2f} {worker:19.1f} {worker / plain:5.2f}"
        )
    for column, where in ((1, "in Ray Data tasks"), (2, "in the worker (augment_in_worker)")):
        ratio = float(np.median([t[column] / t[0] for t in turns]))
        print(
            f"Ray Train gated-image, augmenting {where}: median ratio to the plain loop "
            f"{ratio:.2f} (goal >= 0.9); to the model-step ceiling "
            f"{float(np.median([t[column] for t in turns])) / rows[0][3]:.2f}"
        )


if __name__ == "__main__":
    main()
