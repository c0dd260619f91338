"""What both Serve apps share: the request guard (body size, tokens, origins), image decoding
with precise 4xx errors off the event loop, timeouts, and safe prompt templates."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import os
import urllib.parse
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse, Response

from react_ray.config import AccessConfig
from react_ray.formats.decode import decode_image

# Reachable without a token: probes, the search page and the API's own description.
OPEN_PATHS = {"/healthz", "/readyz", "/", "/docs", "/openapi.json"}


@dataclass
class Guard:
    """What the guard enforces; each app's ingress sets ``app.state.guard`` when it starts."""

    max_request_bytes: int = 16 * 2**20
    admin_token: str | None = None
    api_token: str | None = None
    cors_origins: list[str] = field(default_factory=list)


def read_tokens(access: AccessConfig) -> dict:
    """The tokens from the environment where the app is built (the driver, or Serve's
    controller)."""
    return {
        "admin_token": os.environ.get(access.admin_token_env) or None,
        "api_token": os.environ.get(access.api_token_env) or None,
    }


class _GuardMiddleware:
    """Pure ASGI: refuses before the app reads anything, and counts streamed (chunked) bodies
    too."""

    def __init__(self, app, api: FastAPI):
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        guard: Guard = getattr(self.api.state, "guard", Guard())
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal, cors = self._check(scope, headers, guard)
        if refusal is not None:
            return await refusal(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > guard.max_request_bytes:
                raise HTTPException(
                    413, f"request body is over the limit of {guard.max_request_bytes:,} bytes"
                )
            return message

        async def send_with_cors(message):
            if cors and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        await self.app(scope, limited_receive, send_with_cors)

    @staticmethod
    def _path(scope) -> str:
        path, root = scope["path"], scope.get("root_path", "")
        return (path[len(root) :] or "/") if root and path.startswith(root) else path

    def _check(self, scope, headers: dict, guard: Guard):
        """-> (a refusal response or None, CORS headers to add)."""
        path, method = self._path(scope), scope["method"]
        origin, cors = headers.get("origin"), []
        # Same origin (the search page): the Origin's host is the Host asked for, whatever TLS did
        # in front.
        if origin is not None and urllib.parse.urlsplit(origin).netloc != headers.get("host", ""):
            # a browser on another site: no simple-request CSRF either
            if origin not in guard.cors_origins:
                return JSONResponse(
                    {"detail": f"origin {origin} is not allowed (access.cors_origins)"}, 403
                ), []
            cors = [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"vary", b"Origin"),
            ]
            if method == "OPTIONS":  # preflight
                return Response(
                    status_code=204,
                    headers={
                        "access-control-allow-origin": origin,
                        "access-control-allow-methods": "GET, POST",
                        "access-control-allow-headers": (
                            "authorization, content-type, serve_multiplexed_model_id"
                        ),
                        "access-control-max-age": "600",
                        "vary": "Origin",
                    },
                ), []
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > guard.max_request_bytes:
            return JSONResponse(
                {
                    "detail": f"request body is {int(length):,} bytes; the limit is "
                    f"{guard.max_request_bytes:,}"
                },
                413,
            ), []
        if path.startswith("/admin/"):
            if guard.admin_token is None:
                return JSONResponse(
                    {
                        "detail": "admin routes are off: set the admin token's environment "
                        "variable (access.admin_token_env) where the app is built"
                    },
                    403,
                ), []
            return _token_refusal(headers, guard.admin_token), cors
        if path not in OPEN_PATHS and guard.api_token is not None:
            return _token_refusal(headers, guard.api_token), cors
        return None, cors


def _token_refusal(headers: dict, token: str):
    given = headers.get("authorization", "")
    if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode()):
        return None
    return JSONResponse(
        {"detail": "a valid bearer token is required (Authorization: Bearer ...)"},
        401,
        headers={"www-authenticate": "Bearer"},
    )


def guard_requests(app: FastAPI) -> None:
    app.add_middleware(_GuardMiddleware, api=app)
    app.add_exception_handler(RequestValidationError, _validation_error)


async def _validation_error(request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without echoing the input: a value such as 1e400 (inf) cannot be written as
    JSON (FastAPI's own handler then fails with a 500), and a huge one should not travel back."""
    return JSONResponse(
        {
            "detail": [
                {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                for e in error.errors()
            ]
        },
        422,
    )


def decode_base64_image(text: str, what: str, resize: dict, max_pixels: int) -> np.ndarray:
    """Base64 image -> uint8 pixels for the model, or a 400 naming ``what`` and the reason."""
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
