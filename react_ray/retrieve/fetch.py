"""Fetching and resizing one image the way img2dataset does, with every failure given a reason.

Pure Python (urllib, PIL); the materialization stage runs it in threads inside Ray tasks.
"""

from __future__ import annotations

import io
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from PIL import Image

from react_ray.embed.decode import decode_image

RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5  # seconds, doubled after each retry
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000


def download(url: str, policy: FetchPolicy) -> tuple[bytes | None, str | None, str | None]:
    """-> (bytes, None, None) or (None, reason, message). Retries timeouts and 5xx with backoff."""
    delay = policy.backoff
    for attempt in range(policy.retries + 1):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "react-ray/0.1 (+img2dataset-compatible)"})
            with urllib.request.urlopen(request, timeout=policy.timeout) as response:
                data = response.read(policy.max_bytes + 1)
            if len(data) > policy.max_bytes:
                return None, "too_large", f"more than {policy.max_bytes:,} bytes"
            return data, None, None
        except urllib.error.HTTPError as error:
            reason, message = "http_error", f"HTTP {error.code}"
            if error.code not in RETRYABLE_STATUS:
                return None, reason, message
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as error:
            cause = getattr(error, "reason", error)
            reason = "timeout" if isinstance(cause, TimeoutError) or "timed out" in str(cause) else "network_error"
            message = f"{type(cause).__name__}: {cause}"
        if attempt < policy.retries:
            time.sleep(delay)
            delay *= 2
    return None, reason, f"{message} (after {policy.retries + 1} attempts)"


def resize(data: bytes, mode: str, size: int, only_if_bigger: bool, max_pixels: int, skip_reencode: bool = False
           ) -> tuple[bytes | None, str | None, str | None, tuple[int, int]]:
    """Decode safely and resize as img2dataset does: ``no``; ``keep_ratio`` (shortest side to
    ``size``); ``keep_ratio_largest`` (longest side to ``size``); ``center_crop`` (shortest side to
    ``size``, then the centred square). ``only_if_bigger``: never upscale. Re-encoded as JPEG, except
    a JPEG left as it was when ``skip_reencode`` (img2dataset's option of that name)."""
    check, reason, message = decode_image(data, 1, max_pixels)  # validates without a big resize
    if check is None:
        return None, reason, message, (0, 0)
    image = Image.open(io.BytesIO(data))
    source_format = image.format
    image = image.convert("RGB")
    side = {"keep_ratio": min, "keep_ratio_largest": max, "center_crop": min}.get(mode)
    changed = False
    if side is not None and (side(image.size) > size or not only_if_bigger):
        scale = size / side(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
        changed = True
    if mode == "center_crop" and image.width != image.height:
        square = min(image.size)
        left, top = (image.width - square) // 2, (image.height - square) // 2
        image = image.crop((left, top, left + square, top + square))
        changed = True
    if skip_reencode and not changed and source_format == "JPEG":
        return data, None, None, image.size
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), None, None, image.size
