"""envoy.service.ext_proc.v3.ExternalProcessor: one stream per request, phases as messages.

Authentication, authorization and admission run at the request-headers message (or at the
request body, when the model or a cost estimate needs it); a denial is an immediate response.
Envoy is asked (mode_override) for the body only when the route needs it, and for the response
only when the request holds something the response decides: the status that decides a refund,
the latency an overload guard learns, the usage (in the streamed body) a cost quota settles to.
The stream's end frees whatever the request held.

RateLimit fields go out as dynamic metadata in RATELIMIT_NAMESPACE with the allow response, and
Envoy's route config adds them to the response (envoy/ext_proc.yaml): no response message is
needed for them, which for request quotas alone saves one message per request.
"""

from __future__ import annotations

import functools
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
from extproc.quota.admit import Admission
from extproc.quota.usage import SseUsageTracker, usage_from_json

METADATA_NAMESPACE = "envoy.filters.http.ext_proc"
# Its own namespace, so the per-request values can be appended to a cached allow response:
# protobuf merges maps key by key, and the decision's namespace is left whole.
RATELIMIT_NAMESPACE = "gateway.ratelimit"
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _modes(
    request_body: ProcessingMode.BodySendMode.ValueType = ProcessingMode.NONE,
    response_headers: bool = False,
    response_body: ProcessingMode.BodySendMode.ValueType = ProcessingMode.NONE,
) -> ProcessingMode:
    # An override must restate every mode: DEFAULT would mean "send" for header phases.
    return ProcessingMode(
        request_header_mode=ProcessingMode.SEND,
        response_header_mode=ProcessingMode.SEND if response_headers else ProcessingMode.SKIP,
        request_body_mode=request_body,
        response_body_mode=response_body,
        request_trailer_mode=ProcessingMode.SKIP,
        response_trailer_mode=ProcessingMode.SKIP,
    )


# mode_override is only honoured on header responses: a request that may be admitted at its
# body must ask for the response headers already here.
_SEND_BODY = {
    watch: pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(),
        mode_override=_modes(ProcessingMode.BUFFERED, response_headers=watch),
    )
    for watch in (False, True)
}
_WATCH_RESPONSE = _modes(response_headers=True)
_STREAM_RESPONSE_BODY = _modes(response_headers=True, response_body=ProcessingMode.STREAMED)
# A JSON response larger than this is not parsed for usage: the reservation stands.
MAX_JSON_USAGE_BODY = 1024 * 1024
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


def allowed(allow: Allow, decision_id: str, phase: str) -> bytes:
    """The serialized allow response: the decision's cached bytes with this request's id, and
    a replacement body when the decision has one (appended: protobuf merges concatenated
    messages, so the cached part is never rebuilt)."""
    admission = allow.admission
    watch = admission is not None and admission.wants_end
    out = fill_decision_id(_TEMPLATES[phase, watch].get(allow), decision_id)
    if admission is not None and admission.headers:
        fields = struct({RATELIMIT_NAMESPACE: dict(admission.headers)})
        out += pb.ProcessingResponse(dynamic_metadata=fields).SerializeToString()
    if allow.body is not None and phase == "request_body":
        extra = pb.ProcessingResponse(
            request_body=pb.BodyResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(
                        set_headers=[_header("content-length", str(len(allow.body)))]
                    ),
                    body_mutation=pb.BodyMutation(body=allow.body),
                )
            )
        )
        out += extra.SerializeToString()
    return out


class ResponseWatch:
    """Reads the usage a cost quota settles to from the streamed response body, forwarding
    every chunk (minus the usage event the gateway itself asked for)."""

    def __init__(self, admission: Admission, sse: bool) -> None:
        self.admission = admission
        self._sse = SseUsageTracker(strip_usage_chunk=admission.strip_usage) if sse else None
        self._json = bytearray()
        self._json_overflow = False

    def on_chunk(self, chunk: bytes, end: bool) -> pb.ProcessingResponse:
        forwarded: bytes | None = None
        usage = None
        if self._sse is not None:
            forwarded = self._sse.feed(chunk)
            if end:
                forwarded += self._sse.finish()
                usage = self._sse.usage
        else:
            if len(self._json) + len(chunk) > MAX_JSON_USAGE_BODY:
                self._json_overflow = True
                self._json.clear()
            elif not self._json_overflow:
                self._json += chunk
            if end and not self._json_overflow:
                usage = usage_from_json(bytes(self._json))
        if end:
            self.admission.close_soon(usage)
        common = pb.CommonResponse()
        if forwarded is not None and forwarded != chunk:
            common.body_mutation.body = forwarded
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))


def on_response_headers(
    admission: Admission, message: pb.HttpHeaders
) -> tuple[pb.ProcessingResponse, ResponseWatch | None]:
    headers = headers_of(message)
    try:
        status = int(headers.get(":status", "0"))
    except ValueError:
        status = 0
    admission.on_response(status)
    mutation = pb.HeaderMutation()
    response = pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation))
    )
    watch = None
    if admission.wants_usage and 200 <= status < 300 and not message.end_of_stream:
        sse = headers.get("content-type", "").startswith("text/event-stream")
        watch = ResponseWatch(admission, sse)
        response.mode_override.CopyFrom(_STREAM_RESPONSE_BODY)
        if sse and admission.strip_usage:
            mutation.remove_headers.append("content-length")  # the body shrinks
    return response, watch


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
        admission: Admission | None = None
        watch: ResponseWatch | None = None
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("request")
                if kind == "request_headers":
                    ctx = context_from_headers(headers_of(request.request_headers))
                    decision = await self._core.on_headers(ctx)
                    if isinstance(decision, NeedBody):
                        if not request.request_headers.end_of_stream:
                            pending = decision
                            yield _SEND_BODY[decision.watch_response]
                            continue
                        decision = await self._core.on_body(ctx, decision, b"")
                    if isinstance(decision, Allow):
                        admission = decision.admission
                    yield self._render(decision, ctx.decision_id, kind)
                elif kind == "request_body" and pending is not None and ctx is not None:
                    decision = await self._core.on_body(ctx, pending, request.request_body.body)
                    pending = None
                    if isinstance(decision, Allow):
                        admission = decision.admission
                    yield self._render(decision, ctx.decision_id, kind)
                elif kind == "response_headers" and admission is not None:
                    response, watch = on_response_headers(admission, request.response_headers)
                    if watch is None and request.response_headers.end_of_stream:
                        admission.close_soon()
                    yield response
                elif kind == "response_body" and watch is not None:
                    body = request.response_body
                    yield watch.on_chunk(body.body, body.end_of_stream)
                elif kind is not None:
                    yield _PASS_THROUGH[kind]
        finally:
            # However the exchange ended (done, client gone, Envoy reset): free what it held.
            if admission is not None:
                admission.close_soon()

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
