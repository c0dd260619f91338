"""Fetching and resizing one image the way img2dataset does, with every failure given a reason.

Pure Python (http.client, PIL); the materialization stage runs it in threads inside Ray tasks and
the retrieval app for ``image_url`` queries, so a URL is treated as hostile: http(s) only; the
host is resolved once and every address checked (loopback, private, link-local, multicast and
reserved ones refused unless in ``allowed_networks``), and the connection goes to that checked
address (DNS cannot change between check and connect); each redirect is checked the same way;
one deadline bounds the whole fetch, retries included, even against a server that drips a byte
at a time; the body is capped; every error becomes a reason (never an exception, never an OS
message).
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from PIL import Image

from react_ray.fields import MAX_IMAGE_PIXELS
from react_ray.formats.decode import decode_image

RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
REDIRECTS = {301, 302, 303, 307, 308}
USER_AGENT = "react-ray/0.1 (+img2dataset-compatible)"


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 10.0  # per connect / read
    retries: int = 2
    backoff: float = 0.5  # seconds, doubled after each retry
    max_bytes: int = 20 * 2**20
    max_pixels: int = MAX_IMAGE_PIXELS
    deadline: float = 60.0  # seconds for the whole fetch, redirects and retries included
    max_redirects: int = 5
    allowed_networks: tuple[
        str, ...
    ] = ()  # non-public networks (CIDR) still allowed: a private mirror, tests


class _Refused(Exception):
    """A URL this fetcher will not follow; ``reason`` is the status reported."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _checked_address(host: str, port: int, allowed_networks: tuple[str, ...]) -> str:
    """The first resolved address of ``host``, after checking that none is off limits."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as error:
        raise _Refused("dns_error", f"cannot resolve the host ({type(error).__name__})") from None
    addresses = [info[4][0] for info in infos]
    allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        public = not (
            ip.is_private
            or ip.is_loopback
            or ip.is_link_local
            or ip.is_multicast
            or ip.is_reserved
            or ip.is_unspecified
        )
        if not public and not any(ip in network for network in allowed):
            raise _Refused("blocked_address", "the host resolves to a non-public address")
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address checked for ``host``, whatever DNS says later; Host header as
    usual."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address, self.tcp = address, None

    def connect(self):
        self.sock = self.tcp = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address, self.tcp = address, None

    def connect(self):
        self.tcp = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(self.tcp, server_hostname=self.host)


def _abort(connection: _PinnedHTTP | _PinnedHTTPS) -> None:
    """Unblock a thread stuck in recv on ``connection`` (the deadline passed). Its TCP socket, not
    ``connection.sock``: http.client hands a closing connection's socket over to the response."""
    sock = connection.tcp
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _get_once(url: str, policy: FetchPolicy, deadline: float) -> tuple[int, dict, bytes]:
    """One GET of ``url`` (no redirects followed) -> (status, headers, body up to max_bytes + 1)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise _Refused("bad_url", f"not a valid URL ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise _Refused(
            "unsupported_scheme",
            f"only http and https URLs are fetched, not {parts.scheme or 'none'}",
        )
    if not parts.hostname:
        raise _Refused("bad_url", "the URL has no host")
    port = port or (443 if parts.scheme == "https" else 80)
    address = _checked_address(parts.hostname, port, policy.allowed_networks)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline")
    kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    connection = kind(parts.hostname, port, address, min(policy.timeout, remaining))
    watchdog = threading.Timer(remaining, _abort, [connection])
    watchdog.start()
    try:
        path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~") + (
            "?" + urllib.parse.quote(parts.query, safe="=&%/:+,;@!$'()*-._~") if parts.query else ""
        )
        connection.request(
            "GET", path, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.8"}
        )
        response = connection.getresponse()
        chunks, size = [], 0
        while size <= policy.max_bytes:
            chunk = response.read1(min(65536, policy.max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        # the watchdog cut the connection: what came is not the whole body
        if time.monotonic() >= deadline:
            raise TimeoutError("deadline")
        # the server closed before its Content-Length
        if size <= policy.max_bytes and response.length:
            raise http.client.IncompleteRead(b"".join(chunks), response.length)
        return response.status, dict(response.getheaders()), b"".join(chunks)
    finally:
        watchdog.cancel()
        connection.close()


def download(url: str, policy: FetchPolicy) -> tuple[bytes | None, str | None, str | None]:
    """-> (bytes, None, None) or (None, reason, message). Retries timeouts and 5xx with backoff,
    follows up to ``max_redirects`` redirects (each checked), all within ``policy.deadline``."""
    deadline = time.monotonic() + policy.deadline
    delay, reason, message = policy.backoff, "network_error", ""
    for attempt in range(policy.retries + 1):
        target = url
        try:
            for _ in range(policy.max_redirects + 1):
                status, headers, data = _get_once(target, policy, deadline)
                location = {k.lower(): v for k, v in headers.items()}.get("location")
                if status not in REDIRECTS or not location:
                    break
                target = urllib.parse.urljoin(target, location)
            else:
                return None, "too_many_redirects", f"more than {policy.max_redirects} redirects"
            if status in REDIRECTS:
                return None, "http_error", f"HTTP {status} without a Location"
            if status == 200:
                if len(data) > policy.max_bytes:
                    return None, "too_large", f"more than {policy.max_bytes:,} bytes"
                return data, None, None
            reason, message = "http_error", f"HTTP {status}"
            if status not in RETRYABLE_STATUS:
                return None, reason, message
        except _Refused as refused:
            return None, refused.reason, str(refused)
        except TimeoutError:
            reason, message = (
                "timeout",
                f"no answer within {policy.timeout:g} s, or "
                f"the whole fetch past {policy.deadline:g} s",
            )
        except (
            http.client.HTTPException,
            ssl.SSLError,
            OSError,
            ValueError,
            UnicodeError,
        ) as error:
            if time.monotonic() >= deadline:
                reason, message = (
                    "timeout",
                    f"the whole fetch took longer than {policy.deadline:g} s",
                )
            else:
                reason, message = "network_error", type(error).__name__
        if attempt < policy.retries and time.monotonic() + delay < deadline:
            time.sleep(delay)
            delay *= 2
        else:
            break
    return None, reason, f"{message} ({attempt + 1} attempt{'s' if attempt else ''})"


def resize(
    data: bytes,
    mode: str,
    size: int,
    only_if_bigger: bool,
    max_pixels: int,
    skip_reencode: bool = False,
) -> tuple[bytes | None, str | None, str | None, tuple[int, int]]:
    """Decode safely and resize as img2dataset does: ``no``; ``keep_ratio`` (shortest side to
    ``size``); ``keep_ratio_largest`` (longest side to ``size``); ``center_crop`` (shortest side to
    ``size``, then the centred square). ``only_if_bigger``: never upscale. Re-encoded as JPEG,
    except
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
        resized = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if resized[0] * resized[1] > max_pixels:  # a thin strip's shortest side scaled up
            return (
                None,
                "oversize_image",
                f"{image.width}x{image.height} resizes to {resized[0]}x{resized[1]}",
                (0, 0),
            )
        image = image.resize(resized, Image.Resampling.BICUBIC)
        changed = True
    if mode == "center_crop" and image.width != image.height:
        square = min(image.size)
        left, top = (image.width - square) // 2, (image.height - square) // 2
        image = image.crop((left, top, left + square, top + square))
        changed = True
    if skip_reencode and not changed and source_format == "JPEG":
        return data, None, None, image.size
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="JPEG", quality=95)
    except (OSError, ValueError) as error:  # e.g. a side over JPEG's 65,535 pixels
        return None, "unencodable_image", f"{image.width}x{image.height} as JPEG: {error}", (0, 0)
    return buffer.getvalue(), None, None, image.size
