"""Safe image decoding on CPU workers: bytes -> uint8 RGB, or a reason why not.

Resizing follows open_clip's eval transform exactly (``shortest``: shortest side to S, centre
crop; ``squash``: to S x S; with the weights' interpolation), so embeddings match
``model.preprocess``; ``whole`` keeps the image for training crops (shorter side down to S). Pixels
travel as uint8 (4x smaller than
float32 in the object store); the embedder normalises them on its own device.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # we apply our own limit before decoding, with a counted reason


def _failure_reason(error: Exception) -> str:
    text = str(error).lower()
    return (
        "truncated_image" if "truncat" in text or "broken data stream" in text else "corrupt_image"
    )


RESIZE_MODES = ("shortest", "squash", "whole")
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def decode_image(
    data: bytes,
    size: int,
    max_pixels: int,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
) -> tuple[np.ndarray | None, str | None, str | None]:
    """-> (HxWx3 uint8 array, None, None) or (None, reason, message).

    Reasons: ``corrupt_image`` (not an image), ``truncated_image``, ``zero_size_image`` (no bytes
    or a 0-pixel side), ``oversize_image`` (more than ``max_pixels``, e.g. a decompression
    bomb; checked on the header, before any pixel is decoded).
    """
    if not data:
        return None, "zero_size_image", "0 bytes"
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # PIL raises several types for garbage
        return None, _failure_reason(error), f"{type(error).__name__}: {error}"
    width, height = image.size
    if width == 0 or height == 0:
        return None, "zero_size_image", f"{width}x{height}"
    if width * height > max_pixels:
        return None, "oversize_image", f"{width}x{height} > {max_pixels:,} pixels"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette/transparency notes: not errors
            image.load()
    except (OSError, SyntaxError, ValueError) as error:
        return None, _failure_reason(error), f"{type(error).__name__}: {error}"
    try:
        return _fit(image, size, max_pixels, resize_mode, _RESAMPLE[interpolation])
    except (
        OSError,
        SyntaxError,
        ValueError,
        MemoryError,
    ) as error:  # e.g. an odd mode that will not convert
        return None, "corrupt_image", f"{type(error).__name__}: {error}"


def _fit(image: Image.Image, size: int, max_pixels: int, resize_mode: str, resample):
    """The loaded image as RGB at the model's size (or whole, shorter side bounded), never larger
    than ``max_pixels`` on the way."""
    width, height = image.size
    # EXIF orientation is deliberately ignored: CLIP embeddings of LAION are computed that way.
    image = image.convert("RGB")
    if resize_mode == "squash":
        return np.asarray(image.resize((size, size), resample), dtype=np.uint8), None, None
    if resize_mode == "whole" and min(width, height) <= size:
        return np.asarray(image, dtype=np.uint8), None, None
    if width <= height:  # torchvision's Resize(int) arithmetic
        resized = (size, int(size * height / width))
    else:
        resized = (int(size * width / height), size)
    # a 1 x 100,000 strip would become 224 x 22.4M before the crop
    if resized[0] * resized[1] > max_pixels:
        return (
            None,
            "oversize_image",
            f"{width}x{height} resizes to {resized[0]}x{resized[1]} > {max_pixels:,} pixels",
        )
    image = image.resize(resized, resample)
    if resize_mode == "whole":
        return np.asarray(image, dtype=np.uint8), None, None
    left, top = int(round((resized[0] - size) / 2.0)), int(round((resized[1] - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8), None, None


def decode_batch(
    batch: dict,
    image_size: int,
    max_pixels: int,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
) -> dict:
    """Ray Data batch (dict of columns) -> same rows with ``pixels`` (N, S, S, 3) uint8 and no
    bytes."""
    n = len(batch["id"])
    pixels = np.zeros((n, image_size, image_size, 3), np.uint8)
    errors, messages = list(batch["error"]), list(batch["message"])
    for i in range(n):
        if errors[i]:
            continue
        array, reason, message = decode_image(
            batch["image"][i], image_size, max_pixels, resize_mode, interpolation
        )
        if array is None:
            errors[i], messages[i] = reason, message
        else:
            pixels[i] = array
    out = {k: v for k, v in batch.items() if k != "image"}
    return out | {
        "pixels": pixels,
        "error": np.array(errors, object),
        "message": np.array(messages, object),
    }
