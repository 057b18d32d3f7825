"""envoy.service.auth.v3.Authorization: one unary Check per request, body included if sent.

The same decision core as ext_proc; identity leaves as headers (overwrite) and as dynamic
metadata, which Envoy files under `envoy.filters.http.ext_authz` for later filters.

ext_authz never sees the response, so quotas that must know when a request ends (concurrency,
overload caps) cannot be enforced here: a request under them is refused (503) rather than let
through uncounted. Request and cost quotas work; a cost reservation is never settled or refunded.
"""

from __future__ import annotations

import logging

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.rpc import code_pb2, status_pb2

from extproc.adapters.common import (
    DECISION_ID_SLOT,
    TemplateCache,
    add_service,
    context_from_headers,
    deny_headers,
    fill_decision_id,
    serialize,
    struct,
)
from extproc.adapters.peer import peer_from_ext_authz
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny
from extproc.pipeline.run import DecisionCore
from extproc.pipeline.upstream import DECISION_ID, WORKER, allow_mutation, dynamic_metadata

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
log = logging.getLogger(__name__)
NEEDS_EXT_PROC = Deny(
    status=503,
    code="unavailable",
    message="this model cannot be served right now",
    phase="admit",
    reason="quota_needs_ext_proc",
    headers=(("retry-after", "60"),),
)


def _header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def context_of(request: pb.CheckRequest) -> RequestContext:
    http = request.attributes.request.http
    headers = dict(http.headers)  # already lower-case and comma-joined by Envoy
    headers[":method"] = http.method
    headers[":path"] = http.path
    headers[":authority"] = http.host
    headers[":scheme"] = http.scheme or "https"
    body = http.raw_body or (http.body.encode() if http.body else None)
    ctx = context_from_headers(headers, body)
    ctx.rewrites_body = False
    ctx.peer = peer_from_ext_authz(request)
    return ctx


def denied(deny: Deny, decision_id: str) -> pb.CheckResponse:
    code = code_pb2.UNAUTHENTICATED if deny.status == 401 else code_pb2.PERMISSION_DENIED
    return pb.CheckResponse(
        status=status_pb2.Status(code=code),
        denied_response=pb.DeniedHttpResponse(
            status=HttpStatus(code=deny.status),
            headers=[_header(k, v) for k, v in deny_headers(deny, decision_id)],
            body=deny.json_body(decision_id).decode(),
        ),
        dynamic_metadata=struct(
            {"decision_id": decision_id, "denied": deny.code, "worker": WORKER}
        ),
    )


def _ok_template(allow: Allow) -> bytes:
    mutation = allow_mutation(allow)
    slot = DECISION_ID_SLOT.decode()
    meta = {**dynamic_metadata(allow), "decision_id": slot}
    response = pb.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=pb.OkHttpResponse(
            headers=[_header(k, v) for k, v in (*mutation.set, (DECISION_ID, slot))],
            headers_to_remove=list(mutation.remove),
        ),
        dynamic_metadata=struct(meta),
    )
    serialized: bytes = response.SerializeToString()
    return serialized


_OK_TEMPLATES = TemplateCache(_ok_template)


def ok(allow: Allow, decision_id: str) -> bytes:
    """The serialized OK response: the decision's cached bytes with this request's id, plus
    this request's RateLimit fields (appended: protobuf merges concatenated messages)."""
    out = fill_decision_id(_OK_TEMPLATES.get(allow), decision_id)
    if allow.admission is not None and allow.admission.headers:
        extra = pb.CheckResponse(
            ok_response=pb.OkHttpResponse(
                response_headers_to_add=[_header(k, v) for k, v in allow.admission.headers]
            )
        )
        out += extra.SerializeToString()
    return out


class AuthorizationService(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Register with `add_to_server`: OK responses are returned pre-serialized."""

    def __init__(self, core: DecisionCore) -> None:
        self._core = core

    async def Check(
        self,
        request: pb.CheckRequest,
        context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse],
    ) -> pb.CheckResponse | bytes:
        ctx = context_of(request)
        decision: Allow | Deny | None = None
        try:
            decision = await self._core.decide(ctx)
            if isinstance(decision, Allow) and decision.admission is not None:
                admission = decision.admission
                if admission.needs_end:
                    await admission.finish()
                    log.error(
                        "policy %s has concurrency or overload quotas, which need the ext_proc "
                        "filter; refusing (decision %s)",
                        decision.policy,
                        ctx.decision_id,
                    )
                    decision = NEEDS_EXT_PROC
                else:
                    admission.close_soon()  # ext_authz never sees the exchange end
            if isinstance(decision, Deny):
                return denied(decision, ctx.decision_id)
            return ok(decision, ctx.decision_id)
        finally:
            # Cancelled (Envoy gave up, the client left) before deciding: recorded as such.
            self._core.finished(ctx, decision, "ext_authz")


def add_to_server(service: AuthorizationService, server: grpc.aio.Server) -> None:
    add_service(
        server,
        "envoy.service.auth.v3.Authorization",
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                service.Check,
                request_deserializer=pb.CheckRequest.FromString,
                response_serializer=serialize,
            )
        },
    )
