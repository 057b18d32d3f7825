"""The protobuf edges: Envoy's messages in, decisions out, nothing lost on the way."""

from __future__ import annotations

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.adapters import ext_authz, ext_proc
from extproc.adapters.common import context_from_headers, host_without_port, serialize
from extproc.authn.base import Identity
from extproc.pipeline.decision import Allow, unauthenticated


def allow(principal: str, tenant: str | None = "demo") -> Allow:
    identity = Identity(principal=principal, method="jwt", tenant=tenant)
    return Allow(identity, "chat", "chat", "v1", "chat-v1", ("authorization", "x-api-key"))


def test_duplicate_headers_are_joined_and_bad_bytes_do_not_crash() -> None:
    message = pb.HttpHeaders(
        headers=HeaderMap(
            headers=[
                HeaderValue(key="Authorization", raw_value=b"Bearer a"),
                HeaderValue(key="authorization", raw_value=b"Bearer b"),
                HeaderValue(key="x-bin", raw_value=b"\xff\xfe"),
                HeaderValue(key=":path", raw_value=b"/v1/x?y=1"),
            ]
        )
    )
    headers = ext_proc.headers_of(message)
    assert headers["authorization"] == "Bearer a,Bearer b"
    assert headers["x-bin"] == "\ufffd\ufffd"
    ctx = context_from_headers(headers)
    assert (ctx.path, ctx.query) == ("/v1/x", "y=1")


def test_host_without_port() -> None:
    assert host_without_port("API.example.com:8443") == "api.example.com"
    assert host_without_port("[::1]:8443") == "[::1]"
    assert host_without_port("example.com") == "example.com"


def _decision_ids(response: pb.ProcessingResponse) -> list[bytes]:
    options = response.request_headers.response.header_mutation.set_headers
    return [o.header.raw_value for o in options if o.header.key == "x-gateway-decision-id"]


ID1, ID2, ID3, ID9 = (f"{n:032x}" for n in (1, 2, 3, 9))


def _allowed(a: Allow, decision_id: str, phase: str) -> pb.ProcessingResponse:
    return pb.ProcessingResponse.FromString(ext_proc.allowed(a, decision_id, phase))


def test_cached_templates_are_patched_per_request_and_never_shared() -> None:
    first = _allowed(allow("alice"), ID1, "request_headers")
    second = _allowed(allow("alice"), ID2, "request_headers")
    other = _allowed(allow("bob", tenant=None), ID3, "request_headers")
    assert _decision_ids(first) == [ID1.encode()] and _decision_ids(second) == [ID2.encode()]
    meta = second.dynamic_metadata.fields[ext_proc.METADATA_NAMESPACE].struct_value.fields
    assert meta["decision_id"].string_value == ID2
    assert meta["principal"].string_value == "alice"
    mutation = other.request_headers.response.header_mutation
    values = {o.header.key: o.header.raw_value for o in mutation.set_headers}
    assert values["x-gateway-principal"] == b"bob"
    assert "x-gateway-tenant" in mutation.remove_headers
    assert {"authorization", "x-api-key"} <= set(mutation.remove_headers)
    assert other.request_headers.response.clear_route_cache


def test_body_phase_and_ext_authz_carry_the_same_facts() -> None:
    body = _allowed(allow("alice"), ID9, "request_body")
    assert body.request_body.response.clear_route_cache
    assert _decision_ids_of(body.request_body.response) == [ID9.encode()]
    check = CheckResponse.FromString(ext_authz.ok(allow("alice"), ID9))
    headers = {o.header.key: o.header.value for o in check.ok_response.headers}
    assert headers["x-gateway-decision-id"] == ID9
    assert headers["x-gateway-cluster"] == "chat-v1"
    assert check.dynamic_metadata.fields["decision_id"].string_value == ID9
    again = CheckResponse.FromString(ext_authz.ok(allow("alice"), ID1))
    assert again.dynamic_metadata.fields["decision_id"].string_value == ID1


def _decision_ids_of(common: pb.CommonResponse) -> list[bytes]:
    options = common.header_mutation.set_headers
    return [o.header.raw_value for o in options if o.header.key == "x-gateway-decision-id"]


def test_a_decision_id_of_another_length_is_refused_not_spliced() -> None:
    with pytest.raises(ValueError, match="32 characters"):
        ext_proc.allowed(allow("alice"), "short", "request_headers")


def test_serializer_passes_bytes_and_serializes_messages() -> None:
    assert serialize(b"abc") == b"abc"
    message = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    assert serialize(message) == message.SerializeToString()


def test_denials_render_json_and_challenge() -> None:
    deny = unauthenticated("missing_credentials", "credentials are required")
    response = ext_proc.immediate(deny, "d1")
    imm = response.immediate_response
    assert imm.status.code == 401
    headers = {o.header.key: o.header.raw_value for o in imm.headers.set_headers}
    assert headers["www-authenticate"] == b'Bearer realm="models"'
    assert headers["content-type"] == b"application/json"
    assert b'"decision_id":"d1"' in imm.body
    denied = ext_authz.denied(deny, "d1")
    assert denied.status.code == 16 and denied.denied_response.status.code == 401


@pytest.mark.parametrize("watch", [False, True])
def test_asking_for_the_body_restates_every_mode(watch: bool) -> None:
    mode = ext_proc._SEND_BODY[watch].mode_override
    assert mode.request_body_mode == ProcessingMode.BUFFERED
    # DEFAULT would mean SEND for the response phases: each must be explicit.
    expected = ProcessingMode.SEND if watch else ProcessingMode.SKIP
    assert mode.response_header_mode == expected  # routes with quotas watch the response
    assert mode.response_body_mode == ProcessingMode.NONE
    assert mode.request_trailer_mode == ProcessingMode.SKIP
    assert mode.response_trailer_mode == ProcessingMode.SKIP
