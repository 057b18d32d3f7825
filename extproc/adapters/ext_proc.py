"""envoy.service.ext_proc.v3.ExternalProcessor: one stream per request, phases as messages.

Authentication, authorization and admission run at the request-headers message (or at the
request body, when the model or a cost estimate needs it); a denial is an immediate response.
Envoy is asked (mode_override) for the body only when the route needs it, and for the response
only when the request holds something the response decides: the status that decides a refund,
the latency an overload guard learns, the usage (in the streamed body) a cost quota settles to.
The stream's end frees whatever the request held.

RateLimit fields and inspection flags go out as dynamic metadata in RESPONSE_HEADERS_NAMESPACE
with the allow response, and Envoy's route config adds them to the response
(envoy/ext_proc.yaml): no response message is needed for them. The response side itself
(redaction, extraction defences, usage) is in ext_proc_response.py. A stream that starts at the
response headers is Envoy's separate stream for a 5xx answer (ext_proc_errors.py).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValueOption
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
from extproc.adapters.ext_proc_errors import ErrorExchange
from extproc.adapters.ext_proc_response import (
    ResponseFlow,
    header,
    headers_of,
    modes,
    on_response_headers,
)
from extproc.adapters.peer import peer_from_ext_proc
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny, NeedBody
from extproc.pipeline.run import DecisionCore
from extproc.pipeline.upstream import DECISION_ID, WORKER, allow_mutation, dynamic_metadata

METADATA_NAMESPACE = "envoy.filters.http.ext_proc"
# Its own namespace, so the per-request values can be appended to a cached allow response:
# protobuf merges maps key by key, and the decision's namespace is left whole.
RESPONSE_HEADERS_NAMESPACE = "gateway.response_headers"
FLAGS_HEADER = "x-gateway-flags"
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


# mode_override is only honoured on header responses: a request that may be admitted at its
# body must ask for the response headers already here.
_SEND_BODY = {
    watch: pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(),
        mode_override=modes(ProcessingMode.BUFFERED, response_headers=watch),
    )
    for watch in (False, True)
}
_WATCH_RESPONSE = modes(response_headers=True)
_PASS_THROUGH = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def immediate(deny: Deny, decision_id: str) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=HttpStatus(code=deny.status),
            headers=pb.HeaderMutation(
                set_headers=[header(k, v) for k, v in deny_headers(deny, decision_id)]
            ),
            body=deny.json_body(decision_id),
            details=f"extproc_{deny.code}",
        ),
        # For Envoy's access log, as with an allow: the record to look up is this one.
        dynamic_metadata=struct(
            {
                METADATA_NAMESPACE: {
                    "decision_id": decision_id,
                    "denied": deny.code,
                    "worker": WORKER,
                }
            }
        ),
    )


def _common(allow: Allow) -> pb.CommonResponse:
    mutation = allow_mutation(allow)
    return pb.CommonResponse(
        header_mutation=pb.HeaderMutation(
            set_headers=[header(k, v) for k, v in mutation.set],
            remove_headers=list(mutation.remove),
        ),
        # The route picks its cluster from a header we just set: route again.
        clear_route_cache=True,
    )


def _template(allow: Allow, phase: str, watch: bool) -> bytes:
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
        if watch:
            response.mode_override.CopyFrom(_WATCH_RESPONSE)
    else:
        response.request_body.response.CopyFrom(common)
    serialized: bytes = response.SerializeToString()
    return serialized


_TEMPLATES = {
    (phase, watch): TemplateCache(functools.partial(_template, phase=phase, watch=watch))
    for phase in ("request_headers", "request_body")
    for watch in (False, True)
}


def watches_response(allow: Allow) -> bool:
    """Envoy must send the response headers: a quota holds something until the end, or the
    output rules read the response."""
    admission = allow.admission
    return (admission is not None and admission.wants_end) or allow.output.watches_response


def allowed(allow: Allow, decision_id: str, phase: str) -> bytes:
    """The serialized allow response: the decision's cached bytes with this request's id, and
    a replacement body when the decision has one (appended: protobuf merges concatenated
    messages, so the cached part is never rebuilt)."""
    admission = allow.admission
    watch = watches_response(allow)
    out = fill_decision_id(_TEMPLATES[phase, watch].get(allow), decision_id)
    shown = dict(admission.headers) if admission is not None else {}
    if allow.flags:
        shown[FLAGS_HEADER] = ",".join(allow.flags)
    if shown:
        fields = struct({RESPONSE_HEADERS_NAMESPACE: shown})
        out += pb.ProcessingResponse(dynamic_metadata=fields).SerializeToString()
    if allow.body is not None and phase == "request_body":
        extra = pb.ProcessingResponse(
            request_body=pb.BodyResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(
                        set_headers=[header("content-length", str(len(allow.body)))],
                        # The replacement is the body as the gateway read it: identity.
                        remove_headers=["content-encoding"],
                    ),
                    body_mutation=pb.BodyMutation(body=allow.body),
                )
            )
        )
        out += extra.SerializeToString()
    return out


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
        admitted: Allow | None = None
        final: Allow | Deny | None = None
        flow: ResponseFlow | None = None
        errors: ErrorExchange | None = None
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("request")
                if errors is not None or (kind == "response_headers" and ctx is None):
                    # A stream of its own for a 5xx answer (Envoy's composite filter).
                    if errors is None:
                        errors = ErrorExchange(self._core.observer, request)
                        yield errors.on_headers(request.response_headers.end_of_stream)
                    elif kind == "response_body":
                        yield errors.on_chunk(request.response_body.body)
                    elif kind is not None:
                        yield _PASS_THROUGH[kind]
                elif kind == "request_headers":
                    ctx = context_from_headers(headers_of(request.request_headers))
                    # Attributes come on this message only; the context keeps them.
                    ctx.peer = peer_from_ext_proc(request)
                    decision = await self._core.on_headers(ctx)
                    if isinstance(decision, NeedBody):
                        if not request.request_headers.end_of_stream:
                            pending = decision
                            yield _SEND_BODY[decision.watch_response]
                            continue
                        decision = await self._core.on_body(ctx, decision, b"")
                    final = decision
                    if isinstance(decision, Allow):
                        admitted = decision
                    yield self._render(decision, ctx.decision_id, kind)
                elif kind == "request_body" and pending is not None and ctx is not None:
                    decision = await self._core.on_body(ctx, pending, request.request_body.body)
                    pending = None
                    final = decision
                    if isinstance(decision, Allow):
                        admitted = decision
                    yield self._render(decision, ctx.decision_id, kind)
                elif kind == "response_headers" and admitted is not None and ctx is not None:
                    ctx.trail.timeline.resume()
                    response, flow = on_response_headers(
                        admitted.admission, admitted.output, ctx.decision_id, ctx.trail,
                        request.response_headers,
                    )  # fmt: skip
                    admission = admitted.admission
                    ended = request.response_headers.end_of_stream
                    if flow is None and admission is not None and ended:
                        admission.close_soon()
                    ctx.trail.timeline.mark("respond")
                    yield response
                elif kind == "response_body" and flow is not None and ctx is not None:
                    ctx.trail.timeline.resume()
                    body = request.response_body
                    chunk = flow.on_chunk(body.body, body.end_of_stream)
                    ctx.trail.timeline.mark("respond")
                    yield chunk
                elif kind is not None:
                    yield _PASS_THROUGH[kind]
        finally:
            # However the exchange ended (done, client gone, Envoy reset): free what it held,
            # and record it.
            if admitted is not None and admitted.admission is not None:
                admitted.admission.close_soon()
            if ctx is not None:
                self._core.finished(ctx, final, "ext_proc")
            if errors is not None:
                errors.finished()

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
