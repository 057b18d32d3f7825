"""The ``chat`` demo pod: OpenAI-compatible chat completions that echo the last user message.

Answers come back whole or as server-sent events (``"stream": true``), with token usage counted
as whitespace-separated words so tests can predict it.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import cast

from extproc.demo.pod_server import (
    App,
    HttpError,
    PodKind,
    Request,
    Response,
    json_bytes,
    json_object,
)

# Small on purpose: a value in the echo (a secret, a name) then spans several SSE events, which is
# exactly what a streaming response scanner has to cope with.
STREAM_CHUNK_CHARS = 4
DEMO_STATUS_HEADER = "x-demo-status"  # answer with this 4xx/5xx status instead
DEMO_DELAY_HEADER = "x-demo-delay-ms"  # pause between streamed events
MAX_DEMO_DELAY_MS = 5000


def count_tokens(text: str) -> int:
    """Deterministic token estimate: whitespace-separated words."""
    return len(text.split())


@dataclass(frozen=True, slots=True)
class _ChatRequest:
    model: str
    messages: tuple[tuple[str, str], ...]  # (role, text)
    stream: bool
    include_usage: bool
    max_tokens: int | None


def _message_text(index: int, message: object) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise HttpError(400, f"{where} must be an object")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise HttpError(400, f"{where}.role must be a non-empty string")
    content = message.get("content")
    if content is None:  # assistant turns that only carry tool calls
        return role, ""
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):
        return role, _parts_text(where, content)
    raise HttpError(400, f"{where}.content must be a string or a list of content parts")


def _parts_text(where: str, parts: list[object]) -> str:
    texts: list[str] = []
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise HttpError(400, f"{where}.content[{index}] must be an object with a type")
        if part["type"] != "text":
            continue  # images, audio: nothing to echo
        text = part.get("text")
        if not isinstance(text, str):
            raise HttpError(400, f"{where}.content[{index}].text must be a string")
        texts.append(text)
    return " ".join(texts)


def _optional_bool(doc: dict[str, object], key: str) -> bool:
    value = doc.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HttpError(400, f"{key} must be a boolean")
    return value


def _max_tokens(doc: dict[str, object]) -> int | None:
    # Newer clients send max_completion_tokens; both mean the same here.
    for key in ("max_completion_tokens", "max_tokens"):
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HttpError(400, f"{key} must be a positive integer")
        return value
    return None


def _parse_chat(doc: dict[str, object], default_model: str) -> _ChatRequest:
    model = doc.get("model", default_model)
    if not isinstance(model, str) or not model:
        raise HttpError(400, "model must be a non-empty string")
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages must be a non-empty list")
    options = doc.get("stream_options") or {}
    if not isinstance(options, dict):
        raise HttpError(400, "stream_options must be an object")
    return _ChatRequest(
        model=model,
        messages=tuple(_message_text(i, m) for i, m in enumerate(messages)),
        stream=_optional_bool(doc, "stream"),
        include_usage=_optional_bool(cast(dict[str, object], options), "include_usage"),
        max_tokens=_max_tokens(doc),
    )


def _echo(chat: _ChatRequest) -> tuple[str, str]:
    """The answer and its finish_reason: the last user message, cut to max_tokens words."""
    user_texts = [text for role, text in chat.messages if role == "user"]
    text = user_texts[-1] if user_texts else ""
    words = text.split()
    if chat.max_tokens is None or len(words) <= chat.max_tokens:
        return text, "stop"
    return " ".join(words[: chat.max_tokens]), "length"


def _sse(payload: object) -> bytes:
    return b"data: " + json_bytes(payload) + b"\n\n"


class ChatApp(App):
    kind: PodKind = "chat"

    def __init__(self, name: str, version: str) -> None:
        super().__init__(name, version)
        self.created = int(time.time())
        self.route("POST", r"/v1/chat/completions", self._completions)
        self.route("GET", r"/v1/models", self._models)

    def error_body(self, err: HttpError) -> bytes:
        # OpenAI's error shape, so SDK clients surface the message.
        kind = "server_error" if err.status >= 500 else "invalid_request_error"
        return json_bytes(
            {"error": {"message": err.message, "type": kind, "param": None, "code": None}}
        )

    def _models(self, _req: Request, _m: re.Match[str]) -> Response:
        model = {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "extproc-demo",
        }
        return self.ok({"object": "list", "data": [model]})

    def _completions(self, req: Request, _m: re.Match[str]) -> Response:
        # Demo knobs (a model that fails or streams slowly) for quota tests and demos.
        status = req.headers.get(DEMO_STATUS_HEADER, "")
        if status.isdigit() and 400 <= int(status) <= 599:
            raise HttpError(int(status), "failing as asked by x-demo-status")
        delay = req.headers.get(DEMO_DELAY_HEADER, "")
        delay_s = min(int(delay), MAX_DEMO_DELAY_MS) / 1000 if delay.isdigit() else 0.0
        chat = _parse_chat(json_object(req.body), self.name)
        echo, finish = _echo(chat)
        prompt = sum(count_tokens(text) for _, text in chat.messages)
        completion = count_tokens(echo)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        head: dict[str, object] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",  # _events overrides it in place, keeping key order
            "created": int(time.time()),
            "model": chat.model,
            "system_fingerprint": f"{self.name}-{self.version}",
        }
        if chat.stream:
            events = self._events(head, echo, finish, usage if chat.include_usage else None)
            return Response(
                200, content_type="text/event-stream", stream=events, chunk_delay_s=delay_s
            )
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": echo},
            "finish_reason": finish,
        }
        return self.ok({**head, "choices": [choice], "usage": usage})

    @staticmethod
    def _events(
        head: dict[str, object], echo: str, finish: str, usage: dict[str, int] | None
    ) -> tuple[bytes, ...]:
        """Chunk events as OpenAI sends them; ``usage`` is None unless the client asked."""
        base = {**head, "object": "chat.completion.chunk"}
        if usage is not None:
            base["usage"] = None  # OpenAI marks every content chunk this way under include_usage

        def event(delta: dict[str, str], finish_reason: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return _sse({**base, "choices": [choice]})

        events = [event({"role": "assistant", "content": ""}, None)]
        events += [
            event({"content": echo[i : i + STREAM_CHUNK_CHARS]}, None)
            for i in range(0, len(echo), STREAM_CHUNK_CHARS)
        ]
        events.append(event({}, finish))
        if usage is not None:
            events.append(_sse({**base, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return tuple(events)
