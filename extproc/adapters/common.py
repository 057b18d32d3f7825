"""What both Envoy adapters share: header decoding, denial rendering, metadata structs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from google.protobuf.struct_pb2 import Struct

from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny
from extproc.pipeline.upstream import template_key

JSON_CONTENT_TYPE = "application/json"


def host_without_port(authority: str) -> str:
    authority = authority.strip().lower()
    if authority.startswith("["):  # IPv6 literal
        return authority.partition("]")[0] + "]"
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def join_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-case names; repeated headers joined by commas, as ext_authz delivers them."""
    out: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def context_from_headers(headers: Mapping[str, str], body: bytes | None = None) -> RequestContext:
    path, query = RequestContext.split_path(headers.get(":path", ""))
    forwarded = headers.get("x-forwarded-for", "")
    return RequestContext(
        method=headers.get(":method", ""),
        path=path,
        query=query,
        host=host_without_port(headers.get(":authority", headers.get("host", ""))),
        headers=headers,
        # With use_remote_address, Envoy appends the real peer as the last entry.
        source_address=forwarded.rsplit(",", 1)[-1].strip(),
        scheme=headers.get(":scheme", "https"),
        body=body,
    )


def deny_headers(deny: Deny, decision_id: str) -> list[tuple[str, str]]:
    return [
        ("content-type", JSON_CONTENT_TYPE),
        ("x-gateway-decision-id", decision_id),
        ("cache-control", "no-store"),
        *deny.headers,
    ]


def struct(values: Mapping[str, Any]) -> Struct:
    out = Struct()
    out.update(values)
    return out


M = TypeVar("M")


class TemplateCache(Generic[M]):
    """Allow responses built once per distinct decision, then copied and patched per request.

    Building a response with its header options and metadata struct costs about 25 us in
    Python; copying a prebuilt one costs about 3 us. Bounded: cleared when full.
    """

    def __init__(self, build: Callable[[Allow], M], max_entries: int = 4096) -> None:
        self._build = build
        self._max = max_entries
        self._entries: dict[tuple[object, ...], M] = {}

    def get(self, allow: Allow) -> M:
        key = template_key(allow)
        found = self._entries.get(key)
        if found is None:
            if len(self._entries) >= self._max:
                self._entries.clear()
            found = self._entries[key] = self._build(allow)
        return found
