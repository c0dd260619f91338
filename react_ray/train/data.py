"""Training data on Ray Data: webdataset shards -> augmented image tensors + caption tokens.

```
shards --read (CPU tasks)--> records
    --decode (safe; whole image, shorter side bounded)--> uint8 pixels [cache]
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
import ray
from PIL import Image

from react_ray.config import AugmentConfig, ModelConfig, TrainConfig
from react_ray.formats.decode import decode_image
from react_ray.formats.readers import list_input_shards, read_blocks, shard_items
from react_ray.models.factory import eval_transform, get_tokenizer, image_preprocess, image_size

log = logging.getLogger(__name__)


@cache
def _transform(model_json: str, augment_json: str):
    """PIL image -> normalised tensor: timm's train transform with REACT's aug-cfg (on the whole
    decoded image), or the eval one; mean, std and size are the weights' (``image_preprocess``)."""
    augment = AugmentConfig.model_validate_json(augment_json)
    model = ModelConfig.model_validate_json(model_json)
    if not augment.enabled:
        return eval_transform(model)
    from timm.data import create_transform

    preprocess = image_preprocess(model)
    size = image_size(model.name)
    transform = create_transform(
        input_size=(3, size, size),
        is_training=True,
        scale=augment.scale,
        ratio=augment.ratio,
        hflip=augment.hflip,
        color_jitter=augment.color_jitter,
        auto_augment=augment.auto_augment,
        interpolation=augment.interpolation,
        re_prob=augment.re_prob,
        re_mode="pixel",
        re_count=augment.re_count,
        mean=tuple(preprocess.mean),
        std=tuple(preprocess.std),
    )
    return posterize_keeping_zero_bits(transform)


def _posterize(img, bits_to_keep: int, **_):
    """PIL's posterize as REACT's training saw it: keeping 0 bits gives a black image."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    return (
        ImageOps.posterize(img, bits_to_keep) if bits_to_keep > 0 else Image.new(img.mode, img.size)
    )


def posterize_keeping_zero_bits(transform):
    """timm's RandAugment asks for 0 bits when a sampled magnitude reaches 10 (m9 + mstd0.5 does,
    2% of draws), which recent Pillow (13 here) refuses with a ValueError that ends the training
    read task; older Pillow returned black, as REACT's runs had. Give the posterize ops that."""
    from timm.data.auto_augment import RandAugment

    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return transform


def decode_args(config: TrainConfig) -> dict:
    """How training decodes: the whole image (shorter side bounded) for augmentation crops, else
    the weights' eval resize to the model's square."""
    if config.augment.enabled:
        return {"size": config.augment.decode_short_side, "resize_mode": "whole"}
    preprocess = image_preprocess(config.model)
    return {
        "size": image_size(config.model.name),
        "resize_mode": preprocess.resize_mode,
        "interpolation": preprocess.interpolation,
    }


def _pixel_column(arrays: list[np.ndarray]) -> np.ndarray:
    """One (N, H, W, 3) array when all images share a shape, else N arrays (Ray Data: ragged
    tensors)."""
    if len({a.shape for a in arrays}) <= 1:
        return np.array(arrays, np.uint8).reshape(
            len(arrays), *(arrays[0].shape if arrays else (0, 0, 3))
        )
    column = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        column[i] = array
    return column


def decode_for_training(batch: dict, decode: dict, max_pixels: int) -> dict:
    """Records -> ``pixels`` (uint8, as ``decode_args`` says) + ``caption``; bad records logged."""
    pixels, captions = [], []
    for error, key, image, caption in zip(
        batch["error"], batch["key"], batch["image"], batch["caption"]
    ):
        if error:
            log.warning("training sample %s left out: %s", key, error)
            continue
        array, reason, message = decode_image(image, max_pixels=max_pixels, **decode)
        if array is None:
            log.warning("training sample %s left out: %s (%s)", key, reason, message)
            continue
        pixels.append(array)
        captions.append(caption)
    return {"pixels": _pixel_column(pixels), "caption": np.array(captions, dtype=object)}


def decode_and_augment(
    batch: dict, decode: dict, max_pixels: int, model_json: str, augment_json: str
) -> dict:
    return augment_and_tokenize(
        decode_for_training(batch, decode, max_pixels), model_json, augment_json
    )


def augment_and_tokenize(batch: dict, model_json: str, augment_json: str) -> dict:
    transform = _transform(model_json, augment_json)
    name = ModelConfig.model_validate_json(model_json).name
    size = image_size(name)
    images = [transform(Image.fromarray(p)).numpy() for p in batch["pixels"]]
    tokens = get_tokenizer(name)(list(batch["caption"]))
    return {
        "image": np.array(images, np.float32).reshape(-1, 3, size, size),
        "text": tokens.numpy(),
    }


def training_dataset(config: TrainConfig) -> ray.data.Dataset:
    """The stream of training batches for ``config.data`` (webdataset shards, local or s3://)."""
    shards = list_input_shards(config.data, "webdataset")
    cpu_task = config.decode.ray_options()
    dataset = ray.data.from_items(shard_items(shards), override_num_blocks=len(shards))
    if config.data_sharding == "stream":
        dataset = dataset.randomize_block_order(seed=config.seed)
    decode = {"decode": decode_args(config), "max_pixels": config.max_image_pixels}
    augment = {
        "model_json": config.model.model_dump_json(),
        "augment_json": config.augment.model_dump_json(),
    }
    dataset.context.enable_progress_bars = False  # the training loop prints its own progress
    # blocks in input order (a cached set keeps the order it was built in)
    if config.seed is not None:
        dataset.context.execution_options.preserve_order = True
    read = {"source": 0, "block_rows": 256}
    # one task reads, decodes and augments a shard
    if not config.cache_decoded and not config.augment_in_worker:
        return dataset.map_batches(
            read_blocks,
            batch_size=1,
            fn_kwargs=read | {"then": decode_and_augment, **decode, **augment},
            **cpu_task,
        )
    decoded = dataset.map_batches(
        read_blocks,
        batch_size=1,
        fn_kwargs=read | {"then": decode_for_training, **decode},
        **cpu_task,
    )
    if config.cache_decoded:
        decoded = decoded.materialize()
    if config.augment_in_worker:  # the workers call augment_and_tokenize on each batch
        return decoded
    return decoded.map_batches(augment_and_tokenize, batch_size=256, fn_kwargs=augment, **cpu_task)
