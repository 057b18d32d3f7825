"""OpenID Connect Discovery 1.0: find an issuer's JWKS from its discovery document.

`DiscoveredJwks(issuer)` is a KeySource for JwtAuthenticator. It fetches
`{issuer}/.well-known/openid-configuration` (a terminating `/` of the issuer removed first,
section 4), requires the document's `issuer` to be exactly the configured one (section 4.3:
otherwise another issuer's document could hand us its keys), and serves keys from a RemoteJwks
for the document's `jwks_uri`.

- The document is fetched again after a long TTL (an hour by default); a failed or refused
  fetch keeps the last good `jwks_uri` and is retried after a cooldown, as RemoteJwks does.
- A changed `jwks_uri` is fetched before it replaces the old one, so a broken new location
  does not take verification down while the old keys still work.
- https only (plain http to loopback hosts, for tests and sidecars), bounded size and time,
  no redirects.

Configure JwtIssuer.issuer with the same string: the token's `iss` must match it exactly too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from extproc.authn.http_fetch import (
    Refresher,
    describe,
    new_client,
    read_bounded,
    require_https,
)
from extproc.authn.jwks import RemoteJwks, VerificationKey

logger = logging.getLogger(__name__)

WELL_KNOWN_PATH = "/.well-known/openid-configuration"
_REQUEST_HEADERS = {"accept": "application/json", "accept-encoding": "identity"}


class DiscoveryError(Exception):
    """The discovery document is unusable; the message is safe to log."""


def discovery_url(issuer: str) -> str:
    """Where an issuer's discovery document lives (OIDC Discovery 1.0, section 4)."""
    return issuer.removesuffix("/") + WELL_KNOWN_PATH


def jwks_uri_from(document: bytes, issuer: str) -> str:
    """The `jwks_uri` of a discovery document that names exactly `issuer`."""
    try:
        parsed = json.loads(document)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise DiscoveryError("the discovery document is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise DiscoveryError("the discovery document is not a JSON object")
    if parsed.get("issuer") != issuer:
        # Not quoted back: the document is not ours to echo into logs at length.
        raise DiscoveryError("the document's issuer is not the configured issuer")
    jwks_uri = parsed.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri:
        raise DiscoveryError("the discovery document has no jwks_uri")
    try:
        require_https(jwks_uri, "jwks_uri")
    except ValueError as exc:
        raise DiscoveryError(str(exc)) from None
    return jwks_uri


class DiscoveredJwks:
    """Keys of an OpenID provider, located through its discovery document.

    The HTTP clients are created lazily inside the running loop; the source belongs to it.
    """

    def __init__(
        self,
        issuer: str,
        *,
        discovery_ttl_seconds: float = 3600,
        refetch_cooldown_seconds: float = 30,
        max_bytes: int = 64 * 1024,
        timeout_seconds: float = 2.0,
        request_wait_seconds: float = 0.15,
        jwks_ttl_seconds: float = 300,
        jwks_max_bytes: int = 256 * 1024,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        _check_issuer(issuer)
        if discovery_ttl_seconds <= 0 or refetch_cooldown_seconds < 0 or max_bytes <= 0:
            raise ValueError("discovery ttl and max_bytes must be positive, cooldown non-negative")
        if timeout_seconds <= 0 or request_wait_seconds <= 0:
            raise ValueError("discovery timeout and request wait must be positive")
        self.issuer = issuer
        self.url = discovery_url(issuer)
        self._max_bytes = max_bytes
        self._timeout = timeout_seconds
        self._clock = clock
        self._transport = transport
        if jwks_ttl_seconds <= 0 or jwks_max_bytes <= 0:
            raise ValueError("JWKS ttl and max_bytes must be positive")
        # Settings of each RemoteJwks we create; the cooldown is shared with discovery.
        self._jwks_ttl = jwks_ttl_seconds
        self._jwks_max_bytes = jwks_max_bytes
        self._cooldown = refetch_cooldown_seconds
        self._request_wait = request_wait_seconds
        self._client: httpx.AsyncClient | None = None
        self._jwks: RemoteJwks | None = None
        # The previous JWKS source, kept until the next change so that a request already
        # waiting on it is not cut off by closing it under its feet.
        self._retired: RemoteJwks | None = None
        self._refresher = Refresher(
            self._discover,
            ttl_seconds=discovery_ttl_seconds,
            cooldown_seconds=refetch_cooldown_seconds,
            request_wait_seconds=request_wait_seconds,
            clock=clock,
            what=f"OIDC discovery {self.url}",
        )

    @property
    def jwks_uri(self) -> str | None:
        """The JWKS location in use, once discovered."""
        return self._jwks.url if self._jwks is not None else None

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey | None:
        if self._refresher.due():
            if self._jwks is None:
                await self._refresher.refresh_briefly()
            else:
                self._refresher.start()  # keep serving the known jwks_uri meanwhile
        jwks = self._jwks
        return await jwks.key_for(kid, alg) if jwks is not None else None

    async def warm(self) -> bool:
        """Fetch the discovery document and the keys now; True when keys are available."""
        await self._refresher.refresh()
        jwks = self._jwks
        if jwks is None:
            return False
        return jwks.has_keys or await jwks.warm()

    async def fetch_settled(self) -> None:
        """Wait for a discovery fetch in flight (and the key fetch it started), if any."""
        await self._refresher.settled()

    async def aclose(self) -> None:
        await self._refresher.aclose()
        for source in (self._jwks, self._retired):
            if source is not None:
                await source.aclose()
        self._jwks = self._retired = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _discover(self) -> bool:
        if self._client is None:
            self._client = new_client(self._timeout, self._transport)
        try:
            document = await read_bounded(
                self._client,
                "GET",
                self.url,
                max_bytes=self._max_bytes,
                timeout_seconds=self._timeout,
                headers=_REQUEST_HEADERS,
            )
            jwks_uri = jwks_uri_from(document, self.issuer)
        except Exception as exc:  # any failure keeps the last good jwks_uri
            kept = f"keeping {self.jwks_uri}" if self._jwks is not None else "no keys yet"
            logger.warning("OIDC discovery from %s failed (%s); %s", self.url, describe(exc), kept)
            return False
        if self._jwks is not None and self._jwks.url == jwks_uri:
            return True
        return await self._switch_to(jwks_uri)

    async def _switch_to(self, jwks_uri: str) -> bool:
        candidate = RemoteJwks(
            jwks_uri,
            ttl_seconds=self._jwks_ttl,
            refetch_cooldown_seconds=self._cooldown,
            max_bytes=self._jwks_max_bytes,
            timeout_seconds=self._timeout,
            request_wait_seconds=self._request_wait,
            clock=self._clock,
            transport=self._transport,
        )
        current = self._jwks
        if not await candidate.warm() and current is not None:
            logger.warning(
                "OIDC discovery for %s: new jwks_uri %s has no usable keys yet; keeping %s",
                self.issuer,
                jwks_uri,
                current.url,
            )
            await candidate.aclose()
            return False
        if self._retired is not None:
            await self._retired.aclose()
        self._jwks, self._retired = candidate, current
        logger.info("OIDC discovery for %s: keys from %s", self.issuer, jwks_uri)
        return True


def _check_issuer(issuer: str) -> None:
    """An issuer identifier is an https URL without query or fragment (OIDC Core 1.0, 2)."""
    if not isinstance(issuer, str) or not issuer:
        raise ValueError("OIDC issuer must be a non-empty string")
    require_https(issuer, "OIDC issuer")
    parts = urlsplit(issuer)
    if parts.query or parts.fragment or "?" in issuer or "#" in issuer:
        raise ValueError(f"OIDC issuer must not have a query or fragment: {issuer!r}")
