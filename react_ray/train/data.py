"""Training data on Ray Data: webdataset shards -> augmented image tensors + caption tokens.

```
shards --read (CPU tasks)--> records --decode (safe, to image_size)--> uint8 pixels [cache]
    --augment + tokenize (CPU tasks, or the workers themselves: augment_in_worker; fresh
      randomness every epoch)--> {"image", "text"} batches
```

The materialized training set and a raw corpus read the same way (``KEY.jpg`` + ``KEY.txt``).
Records that cannot train (bad image bytes, empty caption) are logged with key and reason and
left out; the materialize stage has already counted them for its own shards.
"""

from __future__ import annotations

import logging
from functools import cache

import numpy as np
import open_clip
import ray
from PIL import Image

from react_ray.config import AugmentConfig, TrainConfig
from react_ray.embed.decode import decode_image
from react_ray.embed.readers import list_input_shards, read_blocks, shard_items
from react_ray.models.factory import get_tokenizer, register_tiny_models

log = logging.getLogger(__name__)


def model_image_size(model_name: str) -> int:
    register_tiny_models()
    return int(open_clip.get_model_config(model_name)["vision_cfg"]["image_size"])


@cache
def _transform(model_name: str, augment_json: str):
    """PIL image -> normalised tensor: timm's train transform (REACT's recipe) or the eval one."""
    augment = AugmentConfig.model_validate_json(augment_json)
    register_tiny_models()
    size = model_image_size(model_name)
    cfg = open_clip.get_model_config(model_name).get("preprocess_cfg", {})
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    if not augment.enabled:
        return open_clip.image_transform(size, is_train=False, mean=mean, std=std)
    from timm.data import create_transform

    # No flips (captions say left/right), no colour jitter (captions name colours): as open_clip does.
    return create_transform(
        input_size=(3, size, size), is_training=True, scale=augment.scale, hflip=0.0, color_jitter=None,
        auto_augment=augment.auto_augment, re_prob=augment.re_prob, re_mode="pixel", interpolation="bicubic",
        mean=mean, std=std,
    )


def decode_for_training(batch: dict, image_size: int, max_pixels: int) -> dict:
    """Records -> ``pixels`` (uint8, square, open_clip eval resize) + ``caption``; bad records logged."""
    pixels, captions = [], []
    for kind, error, key, image, caption in zip(batch["kind"], batch["error"], batch["key"], batch["image"],
                                                batch["caption"]):
        if kind != "record":
            continue
        if error:
            log.warning("training sample %s left out: %s", key, error)
            continue
        array, reason, message = decode_image(image, image_size, max_pixels)
        if array is None:
            log.warning("training sample %s left out: %s (%s)", key, reason, message)
            continue
        pixels.append(array)
        captions.append(caption)
    return {"pixels": np.array(pixels, np.uint8).reshape(-1, image_size, image_size, 3),
            "caption": np.array(captions, dtype=object)}


def decode_and_augment(batch: dict, image_size: int, max_pixels: int, model_name: str, augment_json: str) -> dict:
    return augment_and_tokenize(decode_for_training(batch, image_size, max_pixels), model_name, augment_json)


def augment_and_tokenize(batch: dict, model_name: str, augment_json: str) -> dict:
    transform = _transform(model_name, augment_json)
    size = model_image_size(model_name)
    images = [transform(Image.fromarray(p)).numpy() for p in batch["pixels"]]
    tokens = get_tokenizer(model_name)(list(batch["caption"]))
    return {"image": np.array(images, np.float32).reshape(-1, 3, size, size), "text": tokens.numpy()}


def training_dataset(config: TrainConfig) -> ray.data.Dataset:
    """The stream of training batches for ``config.data`` (webdataset shards, local or s3://)."""
    shards = list_input_shards(config.data, "webdataset")
    size = model_image_size(config.model.name)
    cpu_task = {"num_cpus": config.decode_num_cpus}
    dataset = ray.data.from_items(shard_items(shards), override_num_blocks=len(shards))
    if config.data_sharding == "stream":
        dataset = dataset.randomize_block_order(seed=config.seed)
    decode = {"image_size": size, "max_pixels": config.max_image_pixels}
    augment = {"model_name": config.model.name, "augment_json": config.augment.model_dump_json()}
    dataset.context.enable_progress_bars = False  # the training loop prints its own progress
    if config.seed is not None:  # blocks in input order (a cached set keeps the order it was built in)
        dataset.context.execution_options.preserve_order = True
    read = {"source": 0, "block_rows": 256}
    if not config.cache_decoded and not config.augment_in_worker:  # one task reads, decodes and augments a shard
        return dataset.map_batches(read_blocks, batch_size=1, fn_kwargs=read | {
            "then": decode_and_augment, **decode, **augment}, **cpu_task)
    decoded = dataset.map_batches(read_blocks, batch_size=1, fn_kwargs=read | {"then": decode_for_training, **decode},
                                  **cpu_task)
    if config.cache_decoded:
        decoded = decoded.materialize()
    if config.augment_in_worker:  # the workers call augment_and_tokenize on each batch
        return decoded
    return decoded.map_batches(augment_and_tokenize, batch_size=256, fn_kwargs=augment, **cpu_task)
