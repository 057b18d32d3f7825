"""The shared quota store: Valkey (or Redis), one server or a Cluster, shared by every replica.

One take() or adjust() is one script call (EVALSHA, and EVAL once after a NOSCRIPT) and so one
round trip; the scripts (lua/take.lua, lua/adjust.lua) read the time with TIME, check every take
before applying any, and give every key they write a TTL. Each counter is one key: a string (the
GCRA arrival time), a hash (a window's index and counts) or a sorted set (slots scored by lease
end), so a script touches only the keys it is given.

Failures never wait long: sockets have small connect and read timeouts, redis-py does not retry,
and each call has an overall time budget. Any failure surfaces as StoreError, whose message names
the kind of failure and never a key.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from extproc.quota.store import Algorithm, Counter, Outcome, Receipt, StoreError, Take, Verdict

__all__ = ["ValkeyStore"]

DEFAULT_CONNECT_TIMEOUT = 0.1  # seconds
DEFAULT_READ_TIMEOUT = 0.1
DEFAULT_MAX_CONNECTIONS = 64

_ALGORITHM_CODES = {
    Algorithm.GCRA: 1,
    Algorithm.SLIDING_WINDOW: 2,
    Algorithm.FIXED_WINDOW: 3,
    Algorithm.CONCURRENCY: 4,
}
_SINGLE_SCHEMES = {"redis": "redis", "valkey": "redis", "rediss": "rediss", "valkeys": "rediss"}
_CLUSTER_SCHEMES = {
    "redis+cluster": "redis",
    "valkey+cluster": "redis",
    "rediss+cluster": "rediss",
    "valkeys+cluster": "rediss",
}


@dataclass(frozen=True, slots=True)
class _Script:
    source: bytes
    sha: str

    @classmethod
    def load(cls, name: str) -> _Script:
        source = files("extproc.quota").joinpath("lua", name).read_bytes()
        return cls(source, hashlib.sha1(source, usedforsecurity=False).hexdigest())


_TAKE = _Script.load("take.lua")
_ADJUST = _Script.load("adjust.lua")


class ValkeyStore:
    """QuotaStore on a redis-py asyncio client, `Redis` or `RedisCluster`.

    `timeout` bounds a whole call (waiting for a connection, connecting, a NOSCRIPT reload and
    the reply); `max_connections` bounds the calls in flight, which wait within that budget.
    Build one with `from_url`, which also sets the socket timeouts and turns retries off.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        timeout: float = DEFAULT_CONNECT_TIMEOUT + DEFAULT_READ_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_connections)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        timeout: float | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        **client_options: Any,
    ) -> ValkeyStore:
        """A store for `url`:

        - `valkey://host:port/db` or `redis://...` (`valkeys://`, `rediss://` for TLS): one server;
        - `valkey+cluster://host:port` or `redis+cluster://...` (`valkeys+cluster://`,
          `rediss+cluster://`): a Cluster, discovered from that node;
        - `unix:///path/to/socket`: one server on a Unix socket.

        User, password and query options are redis-py's. `timeout` defaults to connect_timeout
        + read_timeout; `client_options` go to the redis-py client as they are.
        """
        scheme, rest = _split_scheme(url)
        options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": read_timeout,
            "max_connections": max_connections,
            **client_options,
        }
        client: Redis | RedisCluster
        if scheme in _CLUSTER_SCHEMES:
            # retry=0: no second attempt (and no cluster re-discovery loop) inside one call;
            # the next call finds the new topology.
            client = RedisCluster.from_url(
                _CLUSTER_SCHEMES[scheme] + rest, retry=Retry(NoBackoff(), 0), **options
            )
        elif scheme in _SINGLE_SCHEMES or scheme == "unix":
            client = Redis.from_url(
                _SINGLE_SCHEMES.get(scheme, scheme) + rest,
                retry=Retry(NoBackoff(), 0),
                **options,
            )
        else:
            raise ValueError(f"unsupported quota store URL scheme {scheme!r}")
        budget = connect_timeout + read_timeout if timeout is None else timeout
        return cls(client, timeout=budget, max_connections=max_connections)

    async def take(self, takes: Sequence[Take], request_id: str) -> Outcome:
        if not takes:
            return Outcome(True, (), ())
        keys: list[str] = []
        args: list[str | int] = [request_id]
        for take in takes:
            counter = take.counter
            if counter.limit < 1 or counter.window_ms < 1 or take.amount < 0:
                raise ValueError("a counter needs limit >= 1 and window_ms >= 1, an amount >= 0")
            if take.up_to and counter.algorithm is Algorithm.CONCURRENCY:
                raise ValueError("up_to is for window algorithms, not concurrency")
            keys.append(counter.key)
            args += (*_counter_args(counter), take.amount, take.up_to)
        reply = await self._run(_TAKE, keys, args)
        try:
            return _outcome(takes, request_id, reply)
        except (TypeError, ValueError, IndexError) as exc:
            raise StoreError("valkey: unexpected reply to the take script") from exc

    async def adjust(self, adjustments: Sequence[tuple[Receipt, int]]) -> None:
        if not adjustments:
            return
        keys: list[str] = []
        args: list[str | int] = []
        for receipt, delta in adjustments:
            counter = receipt.counter
            keys.append(counter.key)
            args += (
                *_counter_args(counter),
                receipt.amount,
                receipt.ref,
                delta,
            )
        await self._run(_ADJUST, keys, args)

    async def connect(self, timeout: float = 5.0) -> None:
        """Optional, at startup: discover a Cluster's nodes and load both scripts on every
        primary, so the first requests do not pay for it (redis-py's Cluster discovery also
        holds the event loop for tens of milliseconds). Raises StoreError."""
        try:
            async with asyncio.timeout(timeout):
                if isinstance(self._client, RedisCluster):
                    await self._client.initialize()
                for script in (_TAKE, _ADJUST):
                    await self._client.execute_command("SCRIPT LOAD", script.source)
        except TimeoutError:
            raise StoreError(f"valkey: not connected within {timeout:.1f} s") from None
        except (RedisError, RedisClusterException, OSError) as exc:
            raise _store_error(exc) from None

    async def close(self) -> None:
        await self._client.aclose()

    async def _run(self, script: _Script, keys: list[str], args: list[str | int]) -> Any:
        try:
            async with asyncio.timeout(self._timeout), self._slots:
                if isinstance(self._client, RedisCluster):
                    # Discover the topology first (a no-op once known): redis-py routes a
                    # command it gets before that to a random node, and the MOVED replies of
                    # many such calls at once make it close connections under each other.
                    await self._client.initialize()
                try:
                    return await self._client.execute_command(
                        "EVALSHA", script.sha, len(keys), *keys, *args
                    )
                except NoScriptError:
                    # A new or restarted server: EVAL runs it and caches it for the EVALSHAs.
                    return await self._client.execute_command(
                        "EVAL", script.source, len(keys), *keys, *args
                    )
        except TimeoutError:
            raise StoreError(f"valkey: no answer within {self._timeout * 1000:.0f} ms") from None
        except (RedisError, RedisClusterException, OSError) as exc:
            # `from None`: some redis-py messages quote the command, and so the keys.
            raise _store_error(exc) from None


def _counter_args(counter: Counter) -> tuple[int, int, int, int]:
    """How both scripts read a counter from ARGV."""
    return (_ALGORITHM_CODES[counter.algorithm], counter.limit, counter.window_ms, counter.burst)


def _split_scheme(url: str) -> tuple[str, str]:
    """("valkey+cluster", "://host:port") from the URL, scheme lower-cased."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ValueError("a quota store URL needs a scheme, such as valkey://host:port")
    return scheme.lower(), separator + rest


def _store_error(exc: BaseException) -> StoreError:
    """The kind of failure, without its details: the class, and a reply's error code."""
    kind = type(exc).__name__
    if isinstance(exc, ResponseError) and exc.args:
        code = str(exc.args[0]).split(" ", 1)[0]
        if code.isupper() and code.isalpha():
            kind = f"{kind} {code}"
    return StoreError(f"valkey: {kind}")


def _outcome(takes: Sequence[Take], request_id: str, reply: list[int]) -> Outcome:
    if len(reply) != 1 + 6 * len(takes):
        raise ValueError("reply length")
    admitted = reply[0] == 1
    verdicts: list[Verdict] = []
    receipts: list[Receipt] = []
    for index, take in enumerate(takes):
        allowed, remaining, reset, retry, window, granted = reply[1 + index * 6 : 7 + index * 6]
        counter = take.counter
        verdicts.append(Verdict(allowed == 1, counter.limit, remaining, reset, retry))
        if admitted:
            if counter.algorithm is Algorithm.CONCURRENCY:
                ref = request_id
            elif counter.algorithm is Algorithm.GCRA:
                ref = ""
            else:
                ref = str(window)
            receipts.append(Receipt(counter, granted, ref))
    return Outcome(admitted, tuple(verdicts), tuple(receipts))
