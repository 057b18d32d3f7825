"""Bounded HTTP calls to identity providers, shared by the remote key sources and introspection.

- `new_client`: an httpx client that never follows redirects (the configured URL is the trust
  anchor, a redirect could point anywhere).
- `read_bounded`: one exchange bounded in total time and in body size; the body is streamed and
  counted, so a huge, endless or compressed response cannot exhaust memory.
- `Refresher`: when one remote document is fetched: at most one fetch in flight, a TTL after a
  success, a cooldown after a failure, and callers that wait only briefly.
- `describe`: a log-safe account of a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from urllib.parse import urlsplit

import httpx

logger = logging.getLogger(__name__)


class FetchError(Exception):
    """A fetch failed for a reason worth one log line (never carrying response content)."""


class StatusError(FetchError):
    """The server answered with a status other than 200."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP status {status}")
        self.status = status


def new_client(
    timeout_seconds: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, timeout=timeout_seconds, follow_redirects=False)


async def read_bounded(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    max_bytes: int,
    timeout_seconds: float,
    headers: Mapping[str, str],
    form: Mapping[str, str] | None = None,
) -> bytes:
    """The body of a 200 answer. Raises FetchError, TimeoutError or an httpx error otherwise."""
    # httpx timeouts are per operation; a server dripping bytes needs an overall bound.
    async with (
        asyncio.timeout(timeout_seconds),
        client.stream(method, url, headers=headers, data=form) as response,
    ):
        if response.status_code != 200:
            raise StatusError(response.status_code)
        # Counting decoded bytes would not bound a compression bomb's single chunk.
        if response.headers.get("content-encoding", "identity").lower() != "identity":
            raise FetchError("compressed response refused")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise FetchError(f"response declares {declared} bytes, over {max_bytes}")
        return await _read_capped(response.aiter_bytes(), max_bytes)


async def _read_capped(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise FetchError(f"response exceeds {max_bytes} bytes")
    return bytes(body)


def describe(exc: BaseException) -> str:
    """A log-safe description of a fetch failure (our messages and httpx's carry no content)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def require_https(url: str, what: str) -> None:
    """Refuse anything but https, except plain http to a loopback host (local tests, sidecars).

    Also refuses credentials in the URL, which would end up in logs.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{what} must be an https URL: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what} must not carry credentials in the URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(f"{what} must use https (plain http only to a loopback host): {url!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Refresher:
    """Schedules the fetches of one remote document.

    `fetch` stores what it fetched and returns True, or logs why it failed and returns False
    (an exception counts as a failure too). After a success the next fetch is due after `ttl`,
    after a failure after `cooldown`, so a broken provider is not asked on every request.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[bool]],
        *,
        ttl_seconds: float,
        cooldown_seconds: float,
        request_wait_seconds: float,
        clock: Callable[[], float],
        what: str,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl_seconds
        self._cooldown = cooldown_seconds
        self._request_wait = request_wait_seconds
        self._clock = clock
        self._what = what
        # When the stored copy is due, or after a failure when we may try again.
        self._next_fetch_at = -math.inf
        self._last_started = -math.inf
        self._inflight: asyncio.Task[None] | None = None

    def due(self) -> bool:
        return self._clock() >= self._next_fetch_at

    def since_last_start(self) -> float:
        """Seconds since the last fetch of any kind started."""
        return self._clock() - self._last_started

    def start(self) -> asyncio.Task[None]:
        """Start a fetch unless one is in flight; either way, the fetch in flight."""
        if self._inflight is None:
            self._inflight = asyncio.get_running_loop().create_task(self._run())
        return self._inflight

    async def refresh(self) -> None:
        """Fetch now, or join the fetch in flight, and wait for it to end."""
        # shield: one caller giving up (cancelled request) must not cancel everyone's fetch.
        await asyncio.shield(self.start())

    async def refresh_briefly(self) -> None:
        """Join the fetch for at most request_wait_seconds; it continues in the background."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.start()), self._request_wait)

    async def settled(self) -> None:
        """Wait for the fetch in flight, if any; never starts one."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)

    async def aclose(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            await asyncio.gather(self._inflight, return_exceptions=True)
            self._inflight = None

    async def _run(self) -> None:
        self._last_started = self._clock()
        try:
            ok = await self._fetch()
        except Exception:  # a bug in a fetch must not break the schedule
            logger.exception("fetching %s failed unexpectedly", self._what)
            ok = False
        finally:
            self._inflight = None
        self._next_fetch_at = self._clock() + (self._ttl if ok else self._cooldown)
