"""Upstream 5xx answers, sanitised on an ext_proc stream of their own.

Envoy's composite filter (`gateway.sanitize_5xx` in envoy/ext_proc.yaml and envoy/ext_authz.yaml)
opens this stream only when a response's status is 5xx, so answers that succeed cost no message
at all. The stream starts at the response headers; which decision the answer belongs to comes
from the dynamic metadata the decision filter left (decision id, model, and `errors: raw` when
the model's policy keeps upstream errors as they are).

A sanitised answer keeps its status; its headers say JSON, the upstream's own headers go (the
`x-powered-by` or `set-cookie` of a server in debug mode say as much as its traceback), and its
body becomes the generic JSON error with the decision id. The upstream's own words (the first
AUDITED_ERROR_BYTES, PII masked) go to the audit record only. Answers the gateway itself wrote
(a denial carries `denied` in its metadata) pass untouched. Missing metadata means sanitise:
nothing the gateway cannot account for leaves as it came.
"""

from __future__ import annotations

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.adapters.ext_proc_response import error_json, header, headers_of, modes
from extproc.inspect.mask import Masker
from extproc.inspect.pii import PII_TYPES, scanner_for
from extproc.observe import Observer
from extproc.pipeline.upstream import DECISION_ID

# Where the decision filters leave their dynamic metadata (Envoy forwards these namespaces).
DECISION_NAMESPACES = ("envoy.filters.http.ext_proc", "envoy.filters.http.ext_authz")
# Of an upstream error, this much goes to the audit record (PII masked).
AUDITED_ERROR_BYTES = 2048
_LABELS = Masker("label")
# Of an upstream's headers, what a sanitised answer keeps. Envoy's own (x-envoy-*) are not the
# upstream's, and ext_proc may not change them by default anyway; the ones set below stay too.
KEPT_UPSTREAM_HEADERS = frozenset({"date", "retry-after", "x-request-id"})
# Told on the headers of an answer left as it is: its body need not come here.
_BODY_NOT_WANTED = modes(response_headers=True)


def sanitised_error(decision_id: str) -> bytes:
    if not decision_id:
        # No decision was made (Envoy answered for the gateway: a decision timeout, say).
        return error_json("gateway_error", "the request could not be completed", "")
    return error_json("upstream_error", "the model failed to answer", decision_id)


def decision_metadata(request: pb.ProcessingRequest) -> tuple[str, dict[str, str]]:
    """Which decision filter decided this request ("ext_proc", "ext_authz", or "" when none
    left metadata), and the string fields it left."""
    namespaces = request.metadata_context.filter_metadata
    for namespace in DECISION_NAMESPACES:
        if namespace in namespaces:
            fields = namespaces[namespace].fields
            strings = {
                key: value.string_value
                for key, value in fields.items()
                if value.WhichOneof("kind") == "string_value"
            }
            return namespace.rpartition(".")[2], strings
    return "", {}


def warm() -> None:
    """Compile the scanner masked_head uses (about 0.2 s) at start, not on the loop at the
    first 5xx."""
    scanner_for(PII_TYPES)


def masked_head(body: bytes) -> str:
    """The start of an upstream error as the audit record may hold it: every PII type masked."""
    head = body[:AUDITED_ERROR_BYTES].decode("utf-8", "replace")
    findings = scanner_for(PII_TYPES).scan(head)
    return _LABELS.apply(head, findings) if findings else head


class ErrorExchange:
    """One 5xx answer: its headers, then (when sanitised) its body chunk by chunk."""

    def __init__(self, observer: Observer, request: pb.ProcessingRequest) -> None:
        self._observer = observer
        self.transport, self._meta = decision_metadata(request)
        self.decision_id = self._meta.get("decision_id", "")
        headers = headers_of(request.response_headers)
        self._upstream_headers = sorted(headers)
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        self.sanitising = self.status >= 500 and not (
            "denied" in self._meta or self._meta.get("errors") == "raw"
        )
        self._replaced = False
        self._head = bytearray()
        self._bytes = 0

    def on_headers(self, end: bool) -> pb.ProcessingResponse:
        if not self.sanitising:
            return pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(), mode_override=_BODY_NOT_WANTED
            )
        body = sanitised_error(self.decision_id)
        set_headers = [
            header("content-type", "application/json"),
            header("cache-control", "no-store"),
            header(DECISION_ID, self.decision_id),
        ]
        kept = KEPT_UPSTREAM_HEADERS | {h.header.key for h in set_headers}  # set, not removed
        # Among them content-length and content-encoding: the body changes length (Envoy sends
        # it chunked) and is sent as written.
        removed = [
            name
            for name in self._upstream_headers
            if not name.startswith((":", "x-envoy-")) and name not in kept
        ]
        common = pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=set_headers, remove_headers=removed)
        )
        if end:
            # No body follows: this answer carries one.
            common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
            common.body_mutation.body = body
            self._replaced = True
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))

    def on_chunk(self, chunk: bytes) -> pb.ProcessingResponse:
        if not self.sanitising:
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        self._bytes += len(chunk)
        room = AUDITED_ERROR_BYTES - len(self._head)
        if room > 0:
            self._head += chunk[:room]
        mutation = pb.BodyMutation()
        if self._replaced:
            mutation.clear_body = True
        else:
            mutation.body = sanitised_error(self.decision_id)
            self._replaced = True
        return pb.ProcessingResponse(
            response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation))
        )

    def finished(self) -> None:
        """Record an upstream error (sanitised or not) once the exchange ends, however it ends;
        the gateway's own answers have their decision record already."""
        if "denied" in self._meta:
            return
        self._observer.upstream_error(
            {
                "decision_id": self.decision_id,
                "model": self._meta.get("model", ""),
                "version": self._meta.get("version", ""),
                "status": self.status,
                "sanitised": self.sanitising,
                "bytes": self._bytes,
                "body_head": masked_head(bytes(self._head)),
            },
            self.transport or "unknown",
        )
