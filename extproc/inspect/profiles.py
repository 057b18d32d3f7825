"""Built-in request profiles: the shape an OpenAI-compatible or Open Inference Protocol (KServe
v2) request body must have, what kinds of input it carries, and where its text is.

Statuses: a body of the wrong structure (a missing field, a string where a list belongs) is
400 `invalid_request`; well-formed values out of bounds are 422, `invalid_field` or a more
specific code (`too_many_messages`, `tensor_shape_mismatch`, ...). A body whose walk would visit
more than MAX_WALK_ITEMS list items is 413 `too_many_items`. Every Violation names its field.

Every walk is bounded: by the configured limits (messages, prompts, tensor elements), and by
MAX_WALK_ITEMS overall. `input_types` and `image_urls` visit a subset of what `check_chat`
visits, so after `check_chat` passed they see the whole body.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from extproc.inspect.violation import Violation, quoted

InputType = Literal["text", "image", "audio", "tensor"]

CHAT = "openai_chat"
COMPLETIONS = "openai_completions"
EMBEDDINGS = "openai_embeddings"
OIP = "oip"
PROFILES = frozenset({CHAT, COMPLETIONS, EMBEDDINGS, OIP})

# List items (messages, parts, tools, prompts, token ids, tensor inputs and nested lists) one
# check visits. A 128k-token prompt sent as token ids fits.
MAX_WALK_ITEMS = 200_000
# Strings `text_fields` returns, and values it visits, for a whole document.
MAX_TEXT_FIELDS = 10_000
MAX_TEXT_WALK = 200_000
MAX_TENSOR_RANK = 32

_PART_TYPES: dict[str, InputType] = {"text": "text", "image_url": "image", "input_audio": "audio"}
_PROMPT_FORMS = "must be a string, a list of strings, a list of token ids or a list of those"

# Element kind and inclusive bounds of each OIP datatype.
_INT_BOUNDS = {
    **{f"INT{bits}": (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) for bits in (8, 16, 32, 64)},
    **{f"UINT{bits}": (0, 2**bits - 1) for bits in (8, 16, 32, 64)},
}
_FLOAT_MAX = {"FP16": 65504.0, "FP32": 3.4028234663852886e38, "FP64": sys.float_info.max}
DATATYPES = frozenset({"BOOL", "BYTES", *_INT_BOUNDS, *_FLOAT_MAX})
_KINDS: dict[str, tuple[type, ...]] = {
    "BOOL": (bool,),
    "BYTES": (str,),
    **{name: (int,) for name in _INT_BOUNDS},
    **{name: (int, float) for name in _FLOAT_MAX},
}
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


# --- limits ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatLimits:
    max_messages: int = 256
    roles: frozenset[str] = frozenset({"system", "developer", "user", "assistant", "tool"})
    max_tokens: int | None = None  # upper bound for max_tokens / max_completion_tokens
    max_n: int = 1
    allow_tools: bool = True
    max_tools: int = 64


@dataclass(frozen=True, slots=True)
class CompletionsLimits:
    max_prompts: int = 16
    max_tokens: int | None = None
    max_n: int = 1  # also bounds best_of: each is a completion generated


@dataclass(frozen=True, slots=True)
class EmbeddingsLimits:
    max_inputs: int = 2048


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input a model takes. -1 in `shape`: any size in that dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorLimits:
    """`inputs` empty: any name, datatype and shape, still checked for consistency. Otherwise
    every request input must be one of these, and all of these must be sent.
    `max_elements` bounds the elements of all inputs together."""

    inputs: tuple[TensorSpec, ...] = ()
    max_elements: int = 1_000_000


# --- helpers ---------------------------------------------------------------------------------


def child_path(prefix: str, key: str | int) -> str:
    """`prefix` extended by an object key or list index: `messages[2].content`."""
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    if _PLAIN_KEY.fullmatch(key):
        return f"{prefix}.{key}" if prefix else key
    return f"{prefix}[{quoted(key)}]"  # client-chosen keys are quoted, and capped


def field_path(parts: Iterable[str | int]) -> str:
    path = ""
    for part in parts:
        path = child_path(path, part)
    return path


def _malformed(field: str, message: str) -> Violation:
    return Violation(400, "invalid_request", field, message)


def _invalid(field: str, message: str, code: str = "invalid_field") -> Violation:
    return Violation(422, code, field, message)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value)


class _Budget:
    """List items one walk may still visit."""

    __slots__ = ("left",)

    def __init__(self, items: int) -> None:
        self.left = items

    def spend(self, items: int) -> bool:
        self.left -= items
        return self.left >= 0


def _too_many_items(field: str) -> Violation:
    return Violation(
        413, "too_many_items", field, f"the body has more than {MAX_WALK_ITEMS} items to inspect"
    )


def _required(doc: dict[str, Any], key: str, path: str, kind: type, what: str) -> Violation | None:
    value = doc.get(key)
    field = child_path(path, key)
    if value is None:
        return _malformed(field, "is required")
    if not isinstance(value, kind):
        return _malformed(field, f"must be {what}")
    return None


def _model(doc: dict[str, Any]) -> Violation | None:
    problem = _required(doc, "model", "", str, "a string")
    if problem is None and not doc["model"]:
        return _invalid("model", "must not be empty")
    return problem


def _int_field(doc: dict[str, Any], key: str, low: int, high: int | None) -> Violation | None:
    """An optional integer; null counts as absent (some clients send every field)."""
    value = doc.get(key)
    if value is None:
        return None
    if not _is_int(value):
        return _malformed(key, "must be an integer")
    if value < low:
        return _invalid(key, f"must be at least {low}")
    if high is not None and value > high:
        return _invalid(key, f"must be at most {high}")
    return None


def _number_field(doc: dict[str, Any], key: str, low: float, high: float) -> Violation | None:
    value = doc.get(key)
    if value is None:
        return None
    if not _is_number(value):
        return _malformed(key, "must be a number")
    if not low <= value <= high:
        return _invalid(key, f"must be between {low:g} and {high:g}")
    return None


def _bool_field(doc: dict[str, Any], key: str) -> Violation | None:
    value = doc.get(key)
    if value is None or isinstance(value, bool):
        return None
    return _malformed(key, "must be true or false")


def _sampling(doc: dict[str, Any]) -> Violation | None:
    return (
        _number_field(doc, "temperature", 0, 2)
        or _number_field(doc, "top_p", 0, 1)
        or _bool_field(doc, "stream")
    )


# --- OpenAI chat completions -----------------------------------------------------------------


def check_chat(doc: object, limits: ChatLimits) -> Violation | None:
    """An OpenAI-compatible chat completions request.

    Top-level fields not checked here are allowed: OpenAI adds fields often, and refusing the
    unknown would break clients on every release (a policy's JSON Schema can be stricter).
    """
    if not isinstance(doc, dict):
        return _malformed("", "the body must be a JSON object")
    budget = _Budget(MAX_WALK_ITEMS)
    return (
        _model(doc)
        or _messages(doc, limits, budget)
        or _int_field(doc, "max_tokens", 1, limits.max_tokens)
        or _int_field(doc, "max_completion_tokens", 1, limits.max_tokens)
        or _int_field(doc, "n", 1, limits.max_n)
        or _sampling(doc)
        or _tools(doc, limits, budget)
    )


def _messages(doc: dict[str, Any], limits: ChatLimits, budget: _Budget) -> Violation | None:
    messages = doc.get("messages")
    if messages is None:
        return _malformed("messages", "is required")
    if not isinstance(messages, list):
        return _malformed("messages", "must be a list")
    if not messages:
        return _invalid("messages", "must not be empty")
    if len(messages) > limits.max_messages:
        return _invalid(
            "messages",
            f"has {len(messages)} messages; at most {limits.max_messages} allowed",
            "too_many_messages",
        )
    if not budget.spend(len(messages)):
        return _too_many_items("messages")
    for at, message in enumerate(messages):
        problem = _message(message, f"messages[{at}]", limits, budget)
        if problem is not None:
            return problem
    return None


def _message(message: object, path: str, limits: ChatLimits, budget: _Budget) -> Violation | None:
    if not isinstance(message, dict):
        return _malformed(path, "must be an object")
    problem = _required(message, "role", path, str, "a string")
    if problem is not None:
        return problem
    role = message["role"]
    if role not in limits.roles:
        allowed = ", ".join(sorted(limits.roles))
        return _invalid(
            f"{path}.role",
            f"role {quoted(role)} is not allowed (allowed: {allowed})",
            "invalid_role",
        )
    if role == "tool":
        problem = _required(message, "tool_call_id", path, str, "a string")
        if problem is not None:
            return problem
    content = message.get("content")
    if content is None:
        # An assistant turn that only called tools has no content.
        return None if role == "assistant" else _malformed(f"{path}.content", "is required")
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return _malformed(f"{path}.content", "must be a string or a list of content parts")
    if not content:
        return _invalid(f"{path}.content", "must not be empty")
    if not budget.spend(len(content)):
        return _too_many_items(f"{path}.content")
    for at, part in enumerate(content):
        problem = _part(part, f"{path}.content[{at}]", role)
        if problem is not None:
            return problem
    return None


def _part(part: object, path: str, role: str) -> Violation | None:
    if not isinstance(part, dict):
        return _malformed(path, "must be an object")
    problem = _required(part, "type", path, str, "a string")
    if problem is not None:
        return problem
    kind = part["type"]
    if kind == "text":
        return _required(part, "text", path, str, "a string")
    if kind == "image_url":
        return _required(part, "image_url", path, dict, "an object") or _required(
            part["image_url"], "url", f"{path}.image_url", str, "a string"
        )
    if kind == "input_audio":
        audio_path = f"{path}.input_audio"
        return (
            _required(part, "input_audio", path, dict, "an object")
            or _required(part["input_audio"], "data", audio_path, str, "a string")
            or _required(part["input_audio"], "format", audio_path, str, "a string")
        )
    if kind == "refusal" and role == "assistant":
        return _required(part, "refusal", path, str, "a string")
    return _invalid(
        f"{path}.type",
        f"content parts of type {quoted(kind)} are not accepted",
        "unsupported_content_type",
    )


def _tools(doc: dict[str, Any], limits: ChatLimits, budget: _Budget) -> Violation | None:
    # `functions` is the deprecated form of `tools`; both offer the model tools.
    for key in ("tools", "functions"):
        tools = doc.get(key)
        if tools is None:
            continue
        if not isinstance(tools, list):
            return _malformed(key, "must be a list")
        if tools and not limits.allow_tools:  # an empty list offers nothing
            return _invalid(key, "tools are not allowed on this route", "tools_not_allowed")
        if len(tools) > limits.max_tools:
            return _invalid(
                key, f"has {len(tools)} tools; at most {limits.max_tools} allowed", "too_many_tools"
            )
        if not budget.spend(len(tools)):
            return _too_many_items(key)
        for at, tool in enumerate(tools):
            problem = _tool(tool, f"{key}[{at}]", wrapped=key == "tools")
            if problem is not None:
                return problem
    return None


def _tool(tool: object, path: str, *, wrapped: bool) -> Violation | None:
    """`{"type": "function", "function": {...}}`, or a bare function for `functions`."""
    if not isinstance(tool, dict):
        return _malformed(path, "must be an object")
    if wrapped:
        problem = _required(tool, "type", path, str, "a string")
        if problem is not None:
            return problem
        if tool["type"] != "function":
            return _invalid(
                f"{path}.type", f"tools of type {quoted(tool['type'])} are not accepted"
            )
        problem = _required(tool, "function", path, dict, "an object")
        if problem is not None:
            return problem
        function: dict[str, Any] = tool["function"]
        path = f"{path}.function"
    else:
        function = tool
    problem = _required(function, "name", path, str, "a string")
    if problem is not None:
        return problem
    if not function["name"]:
        return _invalid(f"{path}.name", "must not be empty")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        return _malformed(f"{path}.parameters", "must be an object")
    return None


# --- OpenAI completions and embeddings -------------------------------------------------------


def check_completions(doc: object, limits: CompletionsLimits) -> Violation | None:
    """An OpenAI-compatible (legacy) completions request; unknown fields are allowed."""
    if not isinstance(doc, dict):
        return _malformed("", "the body must be a JSON object")
    budget = _Budget(MAX_WALK_ITEMS)
    return (
        _model(doc)
        or _prompts(doc, "prompt", limits.max_prompts, "too_many_prompts", budget)
        or _int_field(doc, "max_tokens", 1, limits.max_tokens)
        or _int_field(doc, "n", 1, limits.max_n)
        or _int_field(doc, "best_of", 1, limits.max_n)
        or _sampling(doc)
    )


def check_embeddings(doc: object, limits: EmbeddingsLimits) -> Violation | None:
    """An OpenAI-compatible embeddings request; unknown fields are allowed."""
    if not isinstance(doc, dict):
        return _malformed("", "the body must be a JSON object")
    budget = _Budget(MAX_WALK_ITEMS)
    problem = _model(doc) or _prompts(
        doc, "input", limits.max_inputs, "too_many_inputs", budget, allow_empty=False
    )
    if problem is not None:
        return problem
    encoding = doc.get("encoding_format")
    if encoding is not None and not isinstance(encoding, str):
        return _malformed("encoding_format", "must be a string")
    if encoding not in (None, "float", "base64"):
        return _invalid("encoding_format", "must be float or base64")
    return _int_field(doc, "dimensions", 1, None)


def _prompts(
    doc: dict[str, Any],
    key: str,
    max_items: int,
    code: str,
    budget: _Budget,
    *,
    allow_empty: bool = True,
) -> Violation | None:
    """Text or token ids: a string, strings, token ids, or lists of token ids."""
    value = doc.get(key)
    if value is None:
        return _malformed(key, "is required")
    if isinstance(value, str):
        return None if value or allow_empty else _invalid(key, "must not be empty")
    if not isinstance(value, list):
        return _malformed(key, _PROMPT_FORMS)
    if not value:
        return _invalid(key, "must not be empty")
    if not budget.spend(len(value)):
        return _too_many_items(key)
    kinds = set(map(type, value))
    if kinds == {int}:
        return _token_ids(value, key)  # a single prompt
    if len(value) > max_items:
        return _invalid(key, f"has {len(value)} items; at most {max_items} allowed", code)
    if kinds == {str}:
        if not allow_empty and not all(value):
            return _invalid(child_path(key, value.index("")), "must not be empty")
        return None
    if kinds != {list}:
        return _malformed(key, _PROMPT_FORMS)
    for at, item in enumerate(value):
        path = child_path(key, at)
        if not item:
            return _invalid(path, "must not be empty")
        if not budget.spend(len(item)):
            return _too_many_items(path)
        if set(map(type, item)) != {int}:
            return _malformed(path, "must be a list of token ids")
        problem = _token_ids(item, path)
        if problem is not None:
            return problem
    return None


def _token_ids(ids: list[int], path: str) -> Violation | None:
    if min(ids) < 0:
        return _invalid(path, "token ids must not be negative")
    return None


# --- Open Inference Protocol (KServe v2) -----------------------------------------------------


def check_tensors(doc: object, limits: TensorLimits) -> Violation | None:
    """An Open Inference Protocol (KServe v2) inference request (`inputs`, JSON data only)."""
    if not isinstance(doc, dict):
        return _malformed("", "the body must be a JSON object")
    inputs = doc.get("inputs")
    if inputs is None:
        return _malformed("inputs", "is required")
    if not isinstance(inputs, list):
        return _malformed("inputs", "must be a list")
    if not inputs:
        return _invalid("inputs", "must not be empty")
    for key, kind, what in (
        ("id", str, "a string"),
        ("parameters", dict, "an object"),
        ("outputs", list, "a list"),
    ):
        value = doc.get(key)
        if value is not None and not isinstance(value, kind):
            return _malformed(key, f"must be {what}")
    budget = _Budget(MAX_WALK_ITEMS)
    if not budget.spend(len(inputs)):
        return _too_many_items("inputs")
    specs = {spec.name: spec for spec in limits.inputs}
    seen: set[str] = set()
    elements = 0
    for at, tensor in enumerate(inputs):
        path = f"inputs[{at}]"
        problem = _tensor_header(tensor, path, specs, seen)
        if problem is not None:
            return problem
        shape: list[int] = tensor["shape"]
        count = math.prod(shape)
        elements += count
        if elements > limits.max_elements:
            return _invalid(
                f"{path}.shape",
                f"the inputs have more than {limits.max_elements} elements",
                "too_many_elements",
            )
        problem = _tensor_data(tensor, path, shape, count, budget)
        if problem is not None:
            return problem
    missing = sorted(specs.keys() - seen)
    if missing:
        return _invalid("inputs", f"input {quoted(missing[0])} is required", "missing_tensor")
    return None


def _tensor_header(
    tensor: object, path: str, specs: dict[str, TensorSpec], seen: set[str]
) -> Violation | None:
    """Name, datatype and shape of one input, against each other and the configured specs."""
    if not isinstance(tensor, dict):
        return _malformed(path, "must be an object")
    problem = (
        _required(tensor, "name", path, str, "a string")
        or _required(tensor, "datatype", path, str, "a string")
        or _required(tensor, "shape", path, list, "a list")
    )
    if problem is not None:
        return problem
    name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
    parameters = tensor.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        return _malformed(f"{path}.parameters", "must be an object")
    if name in seen:
        return _invalid(f"{path}.name", f"input {quoted(name)} is sent twice")
    seen.add(name)
    if datatype not in DATATYPES:
        return _invalid(f"{path}.datatype", f"unknown datatype {quoted(datatype)}")
    if len(shape) > MAX_TENSOR_RANK:
        return _invalid(f"{path}.shape", f"at most {MAX_TENSOR_RANK} dimensions allowed")
    for at, dim in enumerate(shape):
        if not _is_int(dim):
            return _malformed(f"{path}.shape[{at}]", "must be an integer")
        if dim < 0:
            return _invalid(f"{path}.shape[{at}]", "must not be negative")
    if not specs:
        return None
    spec = specs.get(name)
    if spec is None:
        return _invalid(
            f"{path}.name",
            f"input {quoted(name)} is not one this model takes",
            "tensor_not_allowed",
        )
    if datatype != spec.datatype:
        return _invalid(
            f"{path}.datatype",
            f"input {quoted(name)} must be {spec.datatype}",
            "tensor_type_mismatch",
        )
    if len(shape) != len(spec.shape) or any(
        want not in (-1, dim) for want, dim in zip(spec.shape, shape, strict=True)
    ):
        wanted = "[" + ", ".join("*" if dim == -1 else str(dim) for dim in spec.shape) + "]"
        return _invalid(
            f"{path}.shape",
            f"input {quoted(name)} must have shape {wanted}",
            "tensor_shape_mismatch",
        )
    return None


def _tensor_data(
    tensor: dict[str, Any], path: str, shape: list[int], count: int, budget: _Budget
) -> Violation | None:
    """`data`: flat in row-major order, or nested exactly as `shape` says."""
    data = tensor.get("data")
    path = f"{path}.data"
    if data is None:
        return _malformed(path, "is required")
    if not isinstance(data, list):
        return _malformed(path, "must be a list")
    datatype: str = tensor["datatype"]
    if len(shape) > 1 and data and isinstance(data[0], list):
        return _nested(data, shape, 0, path, datatype, budget)
    if len(data) != count:
        return _invalid(
            path,
            f"shape {shape} has {count} elements but data has {len(data)}",
            "tensor_shape_mismatch",
        )
    return _elements(data, path, datatype)


def _nested(
    data: object, shape: list[int], depth: int, path: str, datatype: str, budget: _Budget
) -> Violation | None:
    if not isinstance(data, list) or len(data) != shape[depth]:
        return _invalid(
            path, f"must be a list of {shape[depth]} items, as shape says", "tensor_shape_mismatch"
        )
    if not budget.spend(1):
        return _too_many_items(path)
    if depth == len(shape) - 1:
        return _elements(data, path, datatype)
    for at, item in enumerate(data):
        problem = _nested(item, shape, depth + 1, f"{path}[{at}]", datatype, budget)
        if problem is not None:
            return problem
    return None


def _elements(values: list[Any], path: str, datatype: str) -> Violation | None:
    """Leaf values of one datatype; the type scan runs at C speed (tensors are large)."""
    kinds = _KINDS[datatype]
    if not set(map(type, values)).issubset(kinds):
        at = next(at for at, value in enumerate(values) if type(value) not in kinds)
        return _invalid(
            f"{path}[{at}]", f"must be {_describe(datatype)} ({datatype})", "tensor_type_mismatch"
        )
    if not values:
        return None
    low: float
    high: float
    if datatype in _INT_BOUNDS:
        low, high = _INT_BOUNDS[datatype]
    elif datatype in _FLOAT_MAX:
        high = _FLOAT_MAX[datatype]
        low = -high
    else:
        return None
    if low <= min(values) and max(values) <= high:
        return None
    at = next(at for at, value in enumerate(values) if not low <= value <= high)
    return _invalid(f"{path}[{at}]", f"is out of range for {datatype}", "tensor_type_mismatch")


def _describe(datatype: str) -> str:
    if datatype == "BOOL":
        return "true or false"
    if datatype == "BYTES":
        return "a string"
    return "an integer" if datatype in _INT_BOUNDS else "a number"


# --- what a request carries ------------------------------------------------------------------


def input_types(doc: object) -> frozenset[InputType]:
    """The kinds of input in a request: chat content parts (text, image_url, input_audio), OIP
    inputs (tensor), completions prompts and embeddings inputs (text).

    Fails closed: a chat body too large to walk counts as carrying every chat input type.
    """
    if not isinstance(doc, dict):
        return frozenset()
    found: set[InputType] = set()
    messages = doc.get("messages")
    if isinstance(messages, list):
        budget = _Budget(MAX_WALK_ITEMS)
        if not budget.spend(len(messages)):
            return frozenset({"text", "image", "audio"})
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                found.add("text")
            elif isinstance(content, list):
                if not budget.spend(len(content)):
                    return frozenset({"text", "image", "audio"})
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if isinstance(kind, str) and kind in _PART_TYPES:
                        found.add(_PART_TYPES[kind])
    if doc.get("prompt") is not None or doc.get("input") is not None:
        found.add("text")
    if isinstance(doc.get("inputs"), list):
        found.add("tensor")
    return frozenset(found)


def image_urls(doc: object) -> list[tuple[str, str]]:
    """(field path, url) of every image in a chat request, in order. Call after `check_chat`:
    the walk stops after MAX_WALK_ITEMS items, which `check_chat` refuses."""
    found: list[tuple[str, str]] = []
    messages = doc.get("messages") if isinstance(doc, dict) else None
    if not isinstance(messages, list):
        return found
    budget = _Budget(MAX_WALK_ITEMS)
    if not budget.spend(len(messages)):
        return found
    for at, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        if not budget.spend(len(content)):
            return found
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            path = f"messages[{at}].content[{index}].image_url"
            image = part.get("image_url")
            if isinstance(image, dict) and isinstance(image.get("url"), str):
                found.append((f"{path}.url", image["url"]))
            elif isinstance(image, str):  # a form some servers accept
                found.append((path, image))
    return found


# --- text, for scanning and masking ----------------------------------------------------------


@dataclass(slots=True)
class TextField:
    """A string in a request and where it sits: `container[key]` is `text`."""

    path: str
    container: dict[str, Any] | list[Any]
    key: str | int
    text: str

    def replace(self, text: str) -> None:
        """Put `text` in the document in place of this field's string (e.g. masked PII)."""
        if isinstance(self.container, list):
            if isinstance(self.key, int):
                self.container[self.key] = text
        elif isinstance(self.key, str):
            self.container[self.key] = text
        self.text = text


def text_fields(doc: object, profile: str | None) -> list[TextField] | Violation:
    """The strings of a request that a scanner should read: message contents and text parts
    (openai_chat), prompts (openai_completions), inputs (openai_embeddings), or, for None, oip
    or any other profile, every string value in the document (keys excluded).

    Fails closed: a document with more than MAX_TEXT_FIELDS strings, or more than MAX_TEXT_WALK
    values to visit, is a 413 `too_many_text_fields` rather than a partial list.
    """
    found = _Texts()
    if profile == CHAT and isinstance(doc, dict):
        messages = doc.get("messages")
        if isinstance(messages, list) and found.spend(len(messages)):
            for at, message in enumerate(messages):
                if isinstance(message, dict):
                    found.chat_message(message, f"messages[{at}]")
    elif profile in (COMPLETIONS, EMBEDDINGS) and isinstance(doc, dict):
        key = "prompt" if profile == COMPLETIONS else "input"
        value = doc.get(key)
        if isinstance(value, str):
            found.add(TextField(key, doc, key, value))
        elif isinstance(value, list):
            found.strings(value, key)
    elif isinstance(doc, dict | list):
        # Also an OpenAI profile's body that is not an object: the checks refuse it anyway.
        found.everything(doc, "")
    if found.overflow:
        return Violation(
            413,
            "too_many_text_fields",
            "",
            f"the body has more than {MAX_TEXT_FIELDS} strings, or {MAX_TEXT_WALK} values, "
            "to inspect",
        )
    return found.fields


class _Texts:
    """Strings found so far, and how many more values the walk may visit."""

    __slots__ = ("fields", "left", "overflow")

    def __init__(self) -> None:
        self.fields: list[TextField] = []
        self.left = MAX_TEXT_WALK
        self.overflow = False

    def spend(self, values: int) -> bool:
        self.left -= values
        self.overflow = self.overflow or self.left < 0
        return not self.overflow

    def add(self, field: TextField) -> bool:
        self.fields.append(field)
        self.overflow = self.overflow or len(self.fields) > MAX_TEXT_FIELDS
        return not self.overflow

    def chat_message(self, message: dict[str, Any], path: str) -> None:
        content = message.get("content")
        if isinstance(content, str):
            self.add(TextField(f"{path}.content", message, "content", content))
        elif isinstance(content, list) and self.spend(len(content)):
            for at, part in enumerate(content):
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str) and part.get("type") == "text":
                    field = TextField(f"{path}.content[{at}].text", part, "text", text)
                    if not self.add(field):
                        return

    def strings(self, values: list[Any], path: str) -> None:
        if not self.spend(len(values)):
            return
        for at, value in enumerate(values):
            if isinstance(value, str) and not self.add(
                TextField(f"{path}[{at}]", values, at, value)
            ):
                return

    def everything(self, node: dict[str, Any] | list[Any], path: str) -> None:
        """Every string value, depth first in document order."""
        items: Iterable[tuple[str | int, Any]]
        if isinstance(node, list):
            if not set(map(type, node)) & {str, dict, list}:
                self.spend(1)  # numbers and such (tensor data): nothing to find, one C scan
                return
            items = enumerate(node)
        else:
            items = node.items()
        for key, value in items:
            if not self.spend(1):
                return
            if isinstance(value, str):
                if not self.add(TextField(child_path(path, key), node, key, value)):
                    return
            elif isinstance(value, dict | list):
                self.everything(value, child_path(path, key))
                if self.overflow:
                    return
