"""ext_proc's response side: what one admitted request does with its model's answer.

At the response headers the request decides, once, how to read the body:
- a body the output rules read: JSON whole (BUFFERED: Envoy holds the headers, so
  Content-Length is set to the new length), event streams and text as they stream (STREAMED:
  Content-Length removed, the body goes out chunked);
- a body only a cost quota reads (usage): streamed, unchanged but for the usage event the
  gateway itself asked for;
- anything else is not watched at all.

Upstream 5xx answers are sanitised on a stream of their own (ext_proc_errors.py), which Envoy
opens only for them; by the time this side sees one, it is the gateway's JSON error.
"""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3.http_status_pb2 import HttpStatus

from extproc.audit.trail import Trail
from extproc.inspect.plan import OutputPlan
from extproc.inspect.response import (
    DECODABLE,
    Blocked,
    Decoder,
    SseTransformer,
    TextTransformer,
    body_kind,
    error_event,
    transform_json,
)
from extproc.pipeline.decision import Deny
from extproc.pipeline.upstream import DECISION_ID
from extproc.quota.admit import Admission
from extproc.quota.usage import SseUsageTracker, usage_from_json

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# A JSON response larger than this is not parsed for usage: the reservation stands.
MAX_JSON_USAGE_BODY = 1024 * 1024
BLOCKED_MESSAGE = "the response was withheld by policy"


def modes(
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


_STREAMED = modes(response_headers=True, response_body=ProcessingMode.STREAMED)
_BUFFERED = modes(response_headers=True, response_body=ProcessingMode.BUFFERED)


def header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name, raw_value=value.encode()), append_action=_OVERWRITE
    )


def error_json(code: str, message: str, decision_id: str) -> bytes:
    # The same JSON error shape as every denial.
    return Deny(502, code, message, "internal").json_body(decision_id)


def headers_of(message: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in message.headers.headers:
        raw = h.raw_value
        value = raw.decode("utf-8", "replace") if raw else h.value
        key = h.key.lower()
        previous = out.get(key)
        out[key] = value if previous is None else f"{previous},{value}"
    return out


class ResponseFlow:
    """One response's body, chunk by chunk: decoded, read for usage, rewritten, forwarded."""

    def __init__(
        self,
        admission: Admission | None,
        output: OutputPlan,
        decision_id: str,
        trail: Trail,
        kind: str | None,
        encoding: str | None,
        status: int,
        buffered: bool,
    ) -> None:
        self._admission = admission
        self._output = output
        self._decision_id = decision_id
        self._trail = trail
        self._kind = kind
        self._status = status
        self.buffered = buffered
        self._decoder = Decoder(encoding) if encoding is not None else None
        transform = output.transforms_body
        wants_usage = admission is not None and admission.wants_usage and 200 <= status < 300
        self._sse_usage = (
            SseUsageTracker(strip_usage_chunk=admission.strip_usage)
            if wants_usage and admission is not None and kind == "sse"
            else None
        )
        self._json_usage = wants_usage and kind != "sse"
        tally = trail.response_redactions
        self._sse = SseTransformer(output, tally) if transform and kind == "sse" else None
        self._text = TextTransformer(output, tally) if transform and kind == "text" else None
        self._json = transform and kind == "json"
        self._strip_usage = admission is not None and admission.strip_usage
        self._held = bytearray()
        self._overflow = False
        self._ended = False
        self._usage: dict[str, int] | None = None

    @property
    def rewrites(self) -> bool:
        """The body leaving may differ from the body arriving (Content-Length cannot stay)."""
        strips = self._sse_usage is not None and self._strip_usage
        transforms = self._sse or self._text or self._json
        return bool(self._decoder or transforms or strips)

    def on_chunk(self, chunk: bytes, end: bool) -> pb.ProcessingResponse:
        if self._ended:
            out: bytes | None = b""  # after a final error event: nothing more goes out
        else:
            try:
                out = self._process(chunk, end)
            except Blocked:
                out = self._blocked()
        common = pb.CommonResponse()
        if self.buffered:
            if out is not None and (out != chunk or self._ended):
                common.body_mutation.body = out
                common.header_mutation.set_headers.append(header("content-length", str(len(out))))
                if self._ended:
                    common.header_mutation.set_headers.extend(
                        [
                            header("content-type", "application/json"),
                            header(DECISION_ID, self._decision_id),
                            header(":status", "502"),
                        ]
                    )
        elif out is not None and out != chunk:
            common.body_mutation.body = out
        if end and self._admission is not None:
            self._admission.close_soon(self._usage)
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))

    def _process(self, chunk: bytes, end: bool) -> bytes | None:
        """What to send instead of `chunk` (None: the chunk unchanged)."""
        data = self._decoder.feed(chunk, end) if self._decoder is not None else chunk
        if self._sse_usage is not None:
            forwarded = self._sse_usage.feed(data)
            if end:
                forwarded += self._sse_usage.finish()
                self._usage = self._sse_usage.usage
            data = forwarded
        if self._sse is not None:
            return self._sse.feed(data, end)
        if self._text is not None:
            return self._text.feed(data, end)
        if self._json or self._json_usage:
            return self._whole_json(data, end)
        return data if self._decoder is not None or data != chunk else None

    def _whole_json(self, data: bytes, end: bool) -> bytes | None:
        if self.buffered:  # Envoy sends it whole, once
            body = bytes(data)
        else:
            if len(self._held) + len(data) > MAX_JSON_USAGE_BODY:
                self._overflow = True
                self._held.clear()
            elif not self._overflow:
                self._held += data
            if not end:
                return None if self._decoder is None else data
            body = bytes(self._held)
        if self._json_usage and not self._overflow:
            self._usage = usage_from_json(body)
        if not self._json:
            return None if self._decoder is None else data
        return transform_json(body, self._output, self._trail.response_redactions)

    def _blocked(self) -> bytes:
        self._ended = True
        self._trail.event("response_blocked", {"kind": self._kind or "bytes"})
        if self.buffered:
            return error_json("response_blocked", BLOCKED_MESSAGE, self._decision_id)
        if self._kind == "sse":
            return error_event(error_json("response_blocked", BLOCKED_MESSAGE, self._decision_id))
        return b""


def on_response_headers(
    admission: Admission | None,
    output: OutputPlan,
    decision_id: str,
    trail: Trail,
    message: pb.HttpHeaders,
) -> tuple[pb.ProcessingResponse, ResponseFlow | None]:
    headers = headers_of(message)
    try:
        status = int(headers.get(":status", "0"))
    except ValueError:
        status = 0
    trail.response_status = status
    if admission is not None:
        admission.on_response(status)
    response = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    # A reference into the message (a message passed to a constructor would be copied).
    mutation = response.response_headers.response.header_mutation
    end = message.end_of_stream
    kind = body_kind(headers.get("content-type", ""))
    transform = output.transforms_body and kind is not None
    usage = admission is not None and admission.wants_usage and 200 <= status < 300
    if end or not (transform or usage):
        return response, None
    encoding = headers.get("content-encoding", "").strip().lower() or None
    if encoding == "identity":
        encoding = None
    if not transform:
        encoding = None  # usage alone: what cannot be read leaves the reservation standing
    elif encoding is not None and encoding not in DECODABLE:
        # Never passed on unread: a body the detectors cannot decode is refused.
        trail.event("response_blocked", {"reason": "content_encoding"})
        if admission is not None:
            admission.close_soon()
        body = error_json("response_blocked", BLOCKED_MESSAGE, decision_id)
        return _immediate(502, body, decision_id), None
    buffered = transform and kind == "json"
    flow = ResponseFlow(admission, output, decision_id, trail, kind, encoding, status, buffered)
    response.mode_override.CopyFrom(_BUFFERED if buffered else _STREAMED)
    if encoding is not None:
        mutation.remove_headers.append("content-encoding")
    if flow.rewrites and not buffered:
        mutation.remove_headers.append("content-length")  # the body changes length
    return response, flow


def _immediate(status: int, body: bytes, decision_id: str) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=HttpStatus(code=status),
            headers=pb.HeaderMutation(
                set_headers=[
                    header("content-type", "application/json"),
                    header("cache-control", "no-store"),
                    header(DECISION_ID, decision_id),
                ]
            ),
            body=body,
            details="extproc_response_replaced",
        )
    )
