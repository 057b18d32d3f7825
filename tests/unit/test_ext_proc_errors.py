"""The 5xx stream (adapters/ext_proc_errors.py): what it replaces, what it leaves, what it
records. Through Envoy: tests/integration/test_inspect.py and test_gateway.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.adapters.common import struct
from extproc.adapters.ext_proc_errors import AUDITED_ERROR_BYTES, ErrorExchange, masked_head, warm
from extproc.inspect.pii import _scanner_for
from extproc.observe import Observer


class Recorder(Observer):
    def __init__(self) -> None:
        super().__init__()
        self.errors: list[tuple[dict[str, Any], str]] = []

    def upstream_error(self, fields: dict[str, Any], transport: str) -> None:
        self.errors.append((fields, transport))


def headers_message(
    status: str, meta: dict[str, str] | None, namespace: str = "envoy.filters.http.ext_proc"
) -> pb.ProcessingRequest:
    request = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=HeaderMap(
                headers=[
                    HeaderValue(key=":status", raw_value=status.encode()),
                    HeaderValue(key="content-length", raw_value=b"1234"),
                ]
            )
        )
    )
    if meta is not None:
        request.metadata_context.filter_metadata[namespace].CopyFrom(struct(meta))
    return request


def error_of(body: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(body)
    return doc


def test_a_5xx_body_is_replaced_once_and_recorded_masked() -> None:
    observer = Recorder()
    meta = {"decision_id": "d-1", "model": "chat", "version": "v2"}
    exchange = ErrorExchange(observer, headers_message("500", meta))
    headers = exchange.on_headers(end=False).response_headers.response
    assert not headers.HasField("body_mutation")
    assert "content-length" in headers.header_mutation.remove_headers
    set_headers = {h.header.key: h.header.raw_value for h in headers.header_mutation.set_headers}
    assert set_headers["content-type"] == b"application/json"
    assert set_headers["x-gateway-decision-id"] == b"d-1"
    first = exchange.on_chunk(b"Traceback: mail ops@example.com\n" + b"x" * 3000)
    body = first.response_body.response.body_mutation
    assert error_of(body.body)["error"] == {
        "code": "upstream_error",
        "message": "the model failed to answer",
        "decision_id": "d-1",
    }
    second = exchange.on_chunk(b"more of the trace")
    assert second.response_body.response.body_mutation.clear_body
    exchange.finished()
    ((fields, transport),) = observer.errors
    assert transport == "ext_proc"
    assert (fields["decision_id"], fields["model"], fields["version"]) == ("d-1", "chat", "v2")
    assert (fields["status"], fields["sanitised"], fields["bytes"]) == (500, True, 3049)
    assert fields["body_head"].startswith("Traceback: mail [EMAIL]\n")
    assert "ops@example.com" not in fields["body_head"]
    assert len(fields["body_head"]) <= AUDITED_ERROR_BYTES


def test_a_sanitised_5xx_keeps_only_harmless_upstream_headers() -> None:
    request = headers_message("500", {"decision_id": "d-5"})
    for key, value in [
        ("X-Powered-By", "Express"),
        ("set-cookie", "debug=1"),
        ("content-encoding", "gzip"),
        ("content-type", "text/html"),  # replaced, so not also removed
        ("date", "Sun, 22 Nov 2026 12:00:00 GMT"),
        ("retry-after", "3"),
        ("x-request-id", "r-1"),
        ("x-envoy-upstream-service-time", "4"),
    ]:
        request.response_headers.headers.headers.append(
            HeaderValue(key=key, raw_value=value.encode())
        )
    mutation = ErrorExchange(Recorder(), request).on_headers(end=False)
    removed = mutation.response_headers.response.header_mutation.remove_headers
    assert sorted(removed) == ["content-encoding", "content-length", "set-cookie", "x-powered-by"]


def test_a_5xx_without_body_gets_one_from_the_headers_answer() -> None:
    exchange = ErrorExchange(Recorder(), headers_message("503", {"decision_id": "d-2"}))
    common = exchange.on_headers(end=True).response_headers.response
    assert common.status == pb.CommonResponse.CONTINUE_AND_REPLACE
    assert error_of(common.body_mutation.body)["error"]["decision_id"] == "d-2"


@pytest.mark.parametrize(
    ("meta", "sanitised", "recorded"),
    [
        # The gateway's own answer (a denial): untouched and not recorded again.
        ({"decision_id": "d-3", "denied": "quota_store_unavailable"}, False, False),
        # The model's policy keeps upstream errors raw: untouched, but recorded.
        ({"decision_id": "d-4", "errors": "raw"}, False, True),
        # No decision metadata at all: sanitised (fail closed).
        (None, True, True),
    ],
)
def test_what_is_left_alone(meta: dict[str, str] | None, sanitised: bool, recorded: bool) -> None:
    observer = Recorder()
    exchange = ErrorExchange(observer, headers_message("502", meta))
    response = exchange.on_headers(end=False)
    assert exchange.sanitising is sanitised
    if sanitised:
        chunk = exchange.on_chunk(b"internal details")
        error = error_of(chunk.response_body.response.body_mutation.body)["error"]
        # No decision behind it: the gateway's failure, not the model's.
        assert error == {
            "code": "gateway_error",
            "message": "the request could not be completed",
            "decision_id": "",
        }
    else:
        assert not response.response_headers.HasField("response")
        # Its body is not wanted: Envoy is told to stop sending it.
        assert response.mode_override.response_body_mode == ProcessingMode.NONE
        untouched = exchange.on_chunk(b"internal details")
        assert not untouched.response_body.HasField("response")
    exchange.finished()
    assert len(observer.errors) == int(recorded)


def test_the_transport_comes_from_the_decision_filters_namespace() -> None:
    observer = Recorder()
    request = headers_message("500", {"decision_id": "d-5"}, "envoy.filters.http.ext_authz")
    exchange = ErrorExchange(observer, request)
    exchange.on_headers(end=True)
    exchange.finished()
    assert observer.errors[0][1] == "ext_authz"


def test_warm_compiles_the_masking_scanner_before_the_first_error() -> None:
    """The server calls warm() at start: the first 5xx then finds the scanner compiled."""
    _scanner_for.cache_clear()
    warm()
    compiled = _scanner_for.cache_info().misses
    assert compiled == 1
    assert masked_head(b"Traceback: mail ops@example.com") == "Traceback: mail [EMAIL]"
    assert _scanner_for.cache_info().misses == compiled  # found in the cache, not compiled
