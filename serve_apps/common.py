"""What both Serve apps share: request limits, image decoding with precise 4xx errors, timeouts."""

from __future__ import annotations

import asyncio
import base64
import binascii

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from react_ray.embed.decode import decode_image


def limit_request_size(app: FastAPI, default_max_bytes: int = 16 * 2**20) -> None:
    """Refuse bodies over ``app.state.max_request_bytes`` with 413 before reading them."""
    app.state.max_request_bytes = default_max_bytes

    @app.middleware("http")
    async def _limit(request: Request, call_next):
        length = request.headers.get("content-length")
        max_bytes = app.state.max_request_bytes
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return JSONResponse(status_code=413, content={
                "detail": f"request body is {int(length):,} bytes; the limit is {max_bytes:,}"})
        return await call_next(request)


def decode_base64_image(text: str, what: str, resize: dict, max_pixels: int) -> np.ndarray:
    """Base64 image -> square uint8 pixels for the model, or a 400 naming ``what`` and the reason."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise HTTPException(400, f"{what}: invalid base64 ({error})") from None
    return decode_image_bytes(data, what, resize, max_pixels)


def decode_image_bytes(data: bytes, what: str, resize: dict, max_pixels: int) -> np.ndarray:
    """``resize``: the model's ``ClipModel.decode_args`` (size, resize mode, interpolation)."""
    pixels, reason, message = decode_image(data, max_pixels=max_pixels, **resize)
    if pixels is None:
        raise HTTPException(400, f"{what}: {reason} ({message})")
    return pixels


async def within(seconds: float, awaitable, what: str):
    """Await with a per-request deadline; a 504 says which step ran out of time."""
    try:
        return await asyncio.wait_for(awaitable, timeout=seconds)
    except asyncio.TimeoutError:
        raise HTTPException(504, f"{what} took longer than {seconds}s") from None
