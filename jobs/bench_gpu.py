"""GPU check without Ray (for a lent GPU box where only torch is installed): per-GPU rates.

python jobs/bench_gpu.py [--shards 16 --rows 1000 --workers 14]

1. Embedding end to end from webdataset shards: our reader + safe decode (224 px, open_clip's
   resize) in a pool of CPU processes, feeding fp16-autocast image + text towers on one GPU, for
   ViT-B-32 and ViT-L-14 (random weights). Also the model-only ceiling on a pre-made batch.
   Published clip-retrieval figures: ~2,500 images/s per A100 on B/32, ~312/s on L/14.
2. Training: REACT gated-image and locked-text steps (fp16 AMP, gradient checkpointing on the
   gated blocks) on ViT-B-32, samples/s per GPU.

It runs the same library code as the Ray stages (readers, decode, model factory, the training
``Stepper``); only Ray's scheduling is replaced by a process pool.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from multiprocessing import Pool, shared_memory

import numpy as np
import torch

from react_ray.config import CorpusConfig, ModelConfig, TrainConfig
from react_ray.formats.decode import decode_image
from react_ray.formats.readers import list_input_shards, read_shard
from react_ray.models import build_model
from react_ray.synthetic.corpus import write_shard
from react_ray.train.loop import Stepper, build_for_training, make_optimizer

PUBLISHED = {"ViT-B-32": 2500, "ViT-L-14": 312}


def _decode_shard(args) -> tuple[str, tuple, list[str]]:
    """Decode one shard into a shared-memory block (no pickling of pixels through a pipe)."""
    shard, size = args
    pixels, captions = [], []
    for block in read_shard(shard):
        for record in block:
            if record["error"]:
                continue
            array, _, _ = decode_image(record["image"], size, 40_000_000)
            if array is not None:
                pixels.append(array)
                captions.append(record["caption"])
    stacked = np.stack(pixels)
    block = shared_memory.SharedMemory(create=True, size=stacked.nbytes)
    np.ndarray(stacked.shape, np.uint8, buffer=block.buf)[:] = stacked
    block.close()
    return block.name, stacked.shape, captions


@torch.no_grad()
def embed_end_to_end(name: str, shards, workers: int, batch: int) -> tuple[float, float, int]:
    clip = build_model(ModelConfig(name=name), device="cuda")
    mean = torch.tensor(
        getattr(clip.model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073),
        device="cuda",
    )
    std = torch.tensor(
        getattr(clip.model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711),
        device="cuda",
    )
    size = clip.image_size

    def forward(pixels: np.ndarray, captions: list[str]) -> None:
        images = (
            torch.from_numpy(pixels).cuda(non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        )
        images = (images - mean[:, None, None]) / std[:, None, None]
        tokens = clip.tokenizer(captions).cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16):
            clip.model.encode_image(images, normalize=True)
            clip.model.encode_text(tokens, normalize=True)

    warm = np.zeros((batch, size, size, 3), np.uint8)
    for _ in range(3):
        forward(warm, ["warm up"] * batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        forward(warm, ["a photo of a red star on a striped background"] * batch)
    torch.cuda.synchronize()
    ceiling = 10 * batch / (time.perf_counter() - start)
    count = 0
    with Pool(workers) as pool:
        start = time.perf_counter()
        for name, shape, captions in pool.imap_unordered(
            _decode_shard, [(s, size) for s in shards]
        ):
            block = shared_memory.SharedMemory(name=name)
            pixels = np.ndarray(shape, np.uint8, buffer=block.buf)
            for i in range(0, len(pixels), batch):
                forward(pixels[i : i + batch], captions[i : i + batch])
            torch.cuda.synchronize()  # the block's pages are read by the copies above
            count += len(pixels)
            del pixels
            block.close()
            block.unlink()
        torch.cuda.synchronize()
        end_to_end = count / (time.perf_counter() - start)
    return end_to_end, ceiling, count


def train_rate(mode: str, name: str, batch: int, steps: int) -> tuple[float, float]:
    config = TrainConfig(
        data="-",
        output="-",
        model=ModelConfig(name=name),
        mode=mode,
        batch_size=batch,
        worker={"num_gpus": 1},
        precision="fp16",
        grad_checkpointing=True,
        steps=steps,
    )
    clip, trainable = build_for_training(config, "cuda")
    params = dict(clip.model.named_parameters())
    share = sum(params[n].numel() for n in trainable) / sum(p.numel() for p in params.values())
    stepper = Stepper(clip.model, make_optimizer(clip.model, config), config, torch.device("cuda"))
    images = torch.randn(batch, 3, clip.image_size, clip.image_size, device="cuda")
    texts = clip.tokenizer([f"a photo of thing number {i}" for i in range(batch)]).cuda()
    for step in range(3):
        stepper(images, texts, step)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        stepper(images, texts, step)
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start), share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args()
    print(
        f"GPU: {torch.cuda.get_device_name(0)}, torch "
        f"{torch.__version__}, {args.workers} decode processes"
    )
    root = tempfile.mkdtemp(prefix="bench-gpu-")
    corpus = CorpusConfig(
        num_shards=args.shards, samples_per_shard=args.rows, image_size=256, formats=["webdataset"]
    )
    start = time.perf_counter()
    with Pool(args.workers) as pool:
        pool.starmap(write_shard, [(root, corpus, i) for i in range(args.shards)])
    shards = list_input_shards(f"{root}/webdataset", "webdataset")
    print(
        f"generated {args.shards * args.rows} pairs of 256 px JPEGs in "
        f"{time.perf_counter() - start:.1f}s"
    )
    for name in ("ViT-B-32", "ViT-L-14"):
        rate, ceiling, count = embed_end_to_end(name, shards, args.workers, args.batch)
        print(
            f"embed {name} fp16: {rate:,.0f} pairs/s end to end from shards ({count} pairs), "
            "model-only ceiling "
            f"{ceiling:,.0f}/s; clip-retrieval published ~{PUBLISHED[name]:,}/s per A100",
            flush=True,
        )
    for mode in ("gated-image", "locked-text"):
        rate, share = train_rate(mode, "ViT-B-32", args.train_batch, args.train_steps)
        print(
            f"train ViT-B-32 {mode} fp16 AMP, batch {args.train_batch}: {rate:,.0f} samples/s per "
            f"GPU ({share:.1%} of parameters trainable), peak memory "
            f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
