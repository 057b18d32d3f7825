"""envoy.service.ext_proc.v3.ExternalProcessor: one stream per request, phases as messages.

Authentication and authorization run at the request-headers message; a denial is an immediate
response. The request body is asked for (mode_override) only when the route needs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3.http_status_pb2 import HttpStatus

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
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny, NeedBody
from extproc.pipeline.run import DecisionCore
from extproc.pipeline.upstream import DECISION_ID, allow_mutation, dynamic_metadata

METADATA_NAMESPACE = "envoy.filters.http.ext_proc"
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# Asking for the body must restate every mode: DEFAULT would mean "send" for header phases.
_SEND_BODY = pb.ProcessingResponse(
    request_headers=pb.HeadersResponse(),
    mode_override=ProcessingMode(
        request_header_mode=ProcessingMode.SEND,
        response_header_mode=ProcessingMode.SKIP,
        request_body_mode=ProcessingMode.BUFFERED,
        response_body_mode=ProcessingMode.NONE,
        request_trailer_mode=ProcessingMode.SKIP,
        response_trailer_mode=ProcessingMode.SKIP,
    ),
)
_PASS_THROUGH = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def _header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name, raw_value=value.encode()), append_action=_OVERWRITE
    )


def headers_of(message: pb.HttpHeaders) -> dict[str, str]:
    """Envoy's header list as a dict; repeats joined by commas, as ext_authz delivers them.

    This runs for every request, so it is a plain loop (measured faster than the generic join).
    Names are lower-cased anyway: two spellings of Authorization must still be joined, never
    one of them picked. Header bytes that are not UTF-8 must not crash the decision: they are
    replaced, and then fail any comparison.
    """
    out: dict[str, str] = {}
    for h in message.headers.headers:
        raw = h.raw_value
        value = raw.decode("utf-8", "replace") if raw else h.value
        key = h.key.lower()
        previous = out.get(key)
        out[key] = value if previous is None else f"{previous},{value}"
    return out


def immediate(deny: Deny, decision_id: str) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=HttpStatus(code=deny.status),
            headers=pb.HeaderMutation(
                set_headers=[_header(k, v) for k, v in deny_headers(deny, decision_id)]
            ),
            body=deny.json_body(decision_id),
            details=f"extproc_{deny.code}",
        )
    )


def _common(allow: Allow) -> pb.CommonResponse:
    mutation = allow_mutation(allow)
    return pb.CommonResponse(
        header_mutation=pb.HeaderMutation(
            set_headers=[_header(k, v) for k, v in mutation.set],
            remove_headers=list(mutation.remove),
        ),
        # The route picks its cluster from a header we just set: route again.
        clear_route_cache=True,
    )


def _template(allow: Allow, phase: str) -> bytes:
    common = _common(allow)
    option = common.header_mutation.set_headers.add()
    option.header.key = DECISION_ID
    option.header.raw_value = DECISION_ID_SLOT
    option.append_action = _OVERWRITE
    meta = dynamic_metadata(allow)
    meta["decision_id"] = DECISION_ID_SLOT.decode()
    response = pb.ProcessingResponse(dynamic_metadata=struct({METADATA_NAMESPACE: meta}))
    if phase == "request_headers":
        response.request_headers.response.CopyFrom(common)
    else:
        response.request_body.response.CopyFrom(common)
    serialized: bytes = response.SerializeToString()
    return serialized


_TEMPLATES = {
    "request_headers": TemplateCache(lambda allow: _template(allow, "request_headers")),
    "request_body": TemplateCache(lambda allow: _template(allow, "request_body")),
}


def allowed(allow: Allow, decision_id: str, phase: str) -> bytes:
    """The serialized allow response: the decision's cached bytes with this request's id."""
    return fill_decision_id(_TEMPLATES[phase].get(allow), decision_id)


class ExternalProcessorService(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Register with `add_to_server` (not the generated function): allow responses are
    yielded pre-serialized, which the generated serializer would not accept."""

    def __init__(self, core: DecisionCore) -> None:
        self._core = core

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse | bytes]:
        ctx: RequestContext | None = None
        pending: NeedBody | None = None
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                ctx = context_from_headers(headers_of(request.request_headers))
                decision = await self._core.on_headers(ctx)
                if isinstance(decision, NeedBody):
                    if not request.request_headers.end_of_stream:
                        pending = decision
                        yield _SEND_BODY
                        continue
                    decision = await self._core.on_body(ctx, decision, b"")
                yield self._render(decision, ctx.decision_id, kind)
            elif kind == "request_body" and pending is not None and ctx is not None:
                decision = await self._core.on_body(ctx, pending, request.request_body.body)
                pending = None
                yield self._render(decision, ctx.decision_id, kind)
            elif kind is not None:
                yield _PASS_THROUGH[kind]

    @staticmethod
    def _render(
        decision: Allow | Deny, decision_id: str, phase: str
    ) -> pb.ProcessingResponse | bytes:
        if isinstance(decision, Deny):
            return immediate(decision, decision_id)
        return allowed(decision, decision_id, phase)


def add_to_server(service: ExternalProcessorService, server: grpc.aio.Server) -> None:
    add_service(
        server,
        "envoy.service.ext_proc.v3.ExternalProcessor",
        {
            "Process": grpc.stream_stream_rpc_method_handler(
                service.Process,
                request_deserializer=pb.ProcessingRequest.FromString,
                response_serializer=serialize,
            )
        },
    )
