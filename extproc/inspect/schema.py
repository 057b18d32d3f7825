"""What a model owner writes under `input:` and `output:` in a policy file.

Only described and validated here; `plan.py` builds the runtime form. Defaults are the safe
choice: without an `input:` section a body is still bounded (1 MiB, Envoy's own buffer limit)
and its encoding must be one the gateway can read, and without an `output:` section upstream
errors are still sanitised.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from extproc.inspect.images import PILLOW_MAX_PIXELS

EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]*$")]
MediaType = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9.+-]+/[a-z0-9.+-]+$", to_lower=True, max_length=127)
]
JsonPath = Annotated[str, StringConstraints(min_length=1, max_length=256)]
InputType = Literal["text", "image", "audio", "tensor"]
Profile = Literal["openai_chat", "openai_completions", "openai_embeddings", "oip"]
PiiType = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]
MaskStyle = Literal["label", "partial", "hash"]
NonEmptyRole = Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,32}$")]

MAX_BODY_BYTES = 16 * 1024 * 1024


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Gzip(Strict):
    max_decoded_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        le=MAX_BODY_BYTES,
        description="Decoded size of a gzip body, in bytes, at most; a body that decodes "
        "beyond it is refused with 415 unsupported_content_encoding.",
    )
    max_ratio: int = Field(
        default=100, ge=1, le=1000, description="Decoded size over encoded size, at most."
    )


class JsonLimits(Strict):
    max_depth: int = Field(default=64, ge=1, le=512, description="Nesting of objects and arrays.")


class ChatProfile(Strict):
    max_messages: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Entries in `messages`, at most; more is 422 too_many_messages.",
    )
    roles: list[NonEmptyRole] = Field(
        default_factory=lambda: ["system", "developer", "user", "assistant", "tool"],
        min_length=1,
        description="Roles a message may have; any other is 422 invalid_role.",
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="Upper bound for max_tokens / max_completion_tokens."
    )
    max_n: int = Field(
        default=1,
        ge=1,
        le=128,
        description="Upper bound for n (choices per request); above it: 422.",
    )
    allow_tools: bool = Field(
        default=True,
        description="Whether a request may offer the model tools (`tools`, or the older "
        "`functions`); when false, a non-empty list is 422 tools_not_allowed.",
    )
    max_tools: int = Field(
        default=64,
        ge=0,
        le=1024,
        description="Entries in `tools` (and in `functions`), at most; more is 422 too_many_tools.",
    )


class CompletionsProfile(Strict):
    max_prompts: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="Prompts in one request, at most (a string, or one list of token ids, is "
        "one prompt); more is 422 too_many_prompts.",
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Upper bound for max_tokens; above it: 422. No bound when absent.",
    )
    max_n: int = Field(
        default=1, ge=1, le=128, description="Upper bound for n and for best_of; above it: 422."
    )


class EmbeddingsProfile(Strict):
    max_inputs: int = Field(
        default=2048,
        ge=1,
        le=100_000,
        description="Items in `input`, at most (a string, or one list of token ids, is one); "
        "more is 422 too_many_inputs.",
    )


class TensorInput(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        description="The input's name. A request input not listed is 422 tensor_not_allowed; "
        "a listed one not sent is 422 missing_tensor."
    )
    datatype: Literal[
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
        "FP16", "FP32", "FP64", "BYTES",
    ] = Field(
        description="The datatype this input must be sent as; another is 422 tensor_type_mismatch."
    )  # fmt: skip
    shape: list[Annotated[int, Field(ge=-1)]] = Field(
        min_length=1, max_length=16, description="-1 means any size in that dimension."
    )


class TensorProfile(Strict):
    inputs: list[TensorInput] = Field(
        default_factory=list, description="The inputs the model takes; empty means any."
    )
    max_elements: int = Field(
        default=1_000_000,
        ge=1,
        le=100_000_000,
        description="Elements of all request inputs together (each the product of its shape), "
        "at most; more is 422 too_many_elements.",
    )


class JsonSchemaSource(Strict):
    """A JSON Schema for the whole body: a file beside the policy, or inline."""

    file: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = Field(
        default=None,
        description="JSON file holding the schema, relative to the policy file's directory; "
        "read when the policy loads, at most 1 MiB.",
    )
    inline: dict[str, Any] | None = Field(
        default=None, description="The schema itself, written in the policy."
    )

    @model_validator(mode="after")
    def _one(self) -> JsonSchemaSource:
        if (self.file is None) == (self.inline is None):
            raise ValueError("give exactly one of file, inline")
        return self


class Images(Strict):
    formats: list[Literal["png", "jpeg", "webp"]] = Field(
        default=["png", "jpeg", "webp"],
        min_length=1,
        description="Formats accepted, by the data: URL's media type; another is 415 "
        "unsupported_image_type. The data must be of the declared format (else 422 invalid_image).",
    )
    max_bytes: int = Field(
        default=5 * 1024 * 1024,
        ge=1,
        le=MAX_BODY_BYTES,
        description="Decoded size of one image, in bytes, at most; more is 413 image_too_large.",
    )
    max_width: int = Field(
        default=4096,
        ge=1,
        le=65_535,
        description="Width in pixels, as the image header declares, at most; more is 413 "
        "image_too_large.",
    )
    max_height: int = Field(
        default=4096,
        ge=1,
        le=65_535,
        description="Height in pixels, as the image header declares, at most; more is 413 "
        "image_too_large.",
    )
    max_pixels: int = Field(
        default=16_777_216,
        ge=1,
        le=PILLOW_MAX_PIXELS,
        description="Width x height, at most; more is 413 image_too_large.",
    )
    allow_remote: bool = Field(
        default=False,
        description="Accept http(s) image URLs, which the model server would fetch itself.",
    )


class Injection(Strict):
    action: Literal["block", "flag", "log"] = Field(
        default="block",
        description="block: refuse with 400; flag: let through, marked in the audit record "
        "and the x-gateway-flags response header; log: audit record only.",
    )
    threshold: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="The action applies when the detector's score (0 to 1) is at least this.",
    )
    detector: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(
        default="builtin", description='"builtin", or "package.module:factory".'
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the factory.")


class Masking(Strict):
    style: MaskStyle = Field(
        default="label",
        description="label: [EMAIL]; partial: keeps a safe part (last 4 digits, the email "
        "domain); hash: a keyed hash, the same for the same value.",
    )
    hash_key_env: EnvName | None = Field(
        default=None, description="Environment variable with the hash key (style: hash)."
    )

    @model_validator(mode="after")
    def _key(self) -> Masking:
        if (self.style == "hash") != (self.hash_key_env is not None):
            raise ValueError("style hash needs hash_key_env, and only it takes one")
        return self


class Sensitive(Masking):
    """Which PII and secret types to look for, and what each one does."""

    block: list[PiiType] = Field(
        default_factory=list, description="Types that refuse the request (or the response)."
    )
    mask: list[PiiType] = Field(
        default_factory=list, description="Types replaced in place, in the mask style."
    )

    @model_validator(mode="after")
    def _types(self) -> Sensitive:
        if not self.block and not self.mask:
            raise ValueError("list at least one type under block or mask")
        both = set(self.block) & set(self.mask)
        if both:
            raise ValueError(f"types both blocked and masked: {sorted(both)}")
        return self


class Input(Strict):
    """Checks on the request, in this order: size, media type, encoding, JSON, profile or
    schema, input types and images, then injection and PII scanning of the text fields."""

    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        le=MAX_BODY_BYTES,
        description="Request body size, in bytes as sent (before gzip decoding), at most; more "
        "is 413 body_too_large, before the body is sent when Content-Length declares it.",
    )
    content_types: list[MediaType] | None = Field(
        default=None, description="Accepted media types; any when absent."
    )
    encodings: list[Literal["gzip"]] = Field(
        default_factory=list, description="Content-Encoding accepted besides identity."
    )
    gzip: Gzip = Field(
        default=Gzip(), description="Caps on decoding a gzip body (when encodings has gzip)."
    )
    json_limits: JsonLimits = Field(
        default_factory=JsonLimits,
        alias="json",
        description="Limits on the JSON body. Setting this section makes the gateway parse "
        "every request body strictly: invalid JSON, duplicate keys or nesting over max_depth "
        "are 400.",
    )
    profile: Profile | None = Field(
        default=None,
        description="The API the body must follow (openai_chat, openai_completions, "
        "openai_embeddings; oip: Open Inference Protocol v2), with the limits of its section "
        "(chat, completions, embeddings, tensors). A malformed body is 400 invalid_request, a "
        "value out of bounds 422. Absent: the shape is not checked.",
    )
    chat: ChatProfile = Field(
        default=ChatProfile(),
        description="Limits for profile openai_chat; refused at load with another profile.",
    )
    completions: CompletionsProfile = Field(
        default=CompletionsProfile(),
        description="Limits for profile openai_completions; refused at load with another profile.",
    )
    embeddings: EmbeddingsProfile = Field(
        default=EmbeddingsProfile(),
        description="Limits for profile openai_embeddings; refused at load with another profile.",
    )
    tensors: TensorProfile = Field(
        default=TensorProfile(),
        description="Limits for profile oip; refused at load with another profile.",
    )
    json_schema: JsonSchemaSource | None = Field(
        default=None,
        description="A JSON Schema the whole body must match, checked after the profile; a "
        "mismatch is 422 schema_violation. Its $refs must stay inside the schema.",
    )
    input_types: list[InputType] | None = Field(
        default=None, description="Input types this model takes; any when absent."
    )
    images: Images = Field(
        default=Images(),
        description="Images in chat messages (image_url parts): inline data: URLs are checked "
        "for format and size; http(s) URLs are 422 unless allow_remote. Checked in every "
        "inspected body (one of encodings, json, profile, json_schema, input_types, injection, "
        "pii or this section set).",
    )
    injection: Injection | None = Field(
        default=None,
        description="Prompt-injection detection over the text fields: message contents "
        "(openai_chat), `prompt` (openai_completions), `input` (openai_embeddings), else every "
        "string in the body. Not checked when absent.",
    )
    pii: Sensitive | None = Field(
        default=None,
        description="PII and secrets in the text fields (as for injection): block refuses the "
        "request (400 sensitive_data), mask rewrites it before it is sent on. Not scanned when "
        "absent.",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _limits_of_the_profile(self) -> Input:
        # A profile's limits without that profile would be silently unused: say so at load.
        for section, profile in _PROFILE_SECTIONS.items():
            if section in self.model_fields_set and self.profile != profile:
                raise ValueError(f"{section} applies only with profile: {profile}")
        return self


# Each profile's section of limits, by the profile that reads it.
_PROFILE_SECTIONS = {
    "chat": "openai_chat",
    "completions": "openai_completions",
    "embeddings": "openai_embeddings",
    "tensors": "oip",
}


class Streaming(Strict):
    hold_back_chars: int = Field(
        default=64, ge=16, le=4096,
        description="Text held back so a value split across events is still caught.",
    )  # fmt: skip
    max_hold_chars: int = Field(
        default=4096, ge=64, le=65_536,
        description="Characters held back at most, waiting for a run without whitespace to "
        "end; a longer run is let out but for its last hold_back_chars, so a value in it may "
        "be only partly masked. Raised to at least twice hold_back_chars, and to fit the "
        "longest value the scanner can find.",
    )  # fmt: skip


class Extraction(Strict):
    score_fields: list[JsonPath] = Field(
        default_factory=list, description='Paths of scores, e.g. "outputs.*.data".'
    )
    decimals: int | None = Field(
        default=None,
        ge=0,
        le=6,
        description="Round scores (at score_fields) to this many decimal places; not rounded "
        "when absent.",
    )
    clamp: tuple[float, float] | None = Field(
        default=None,
        description="[low, high]: scores are moved into this range, e.g. [0.01, 0.99] so that "
        "none is exactly 0 or 1; not clamped when absent.",
    )
    top_k: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Keep the k highest scores of each list (of each row, for an OIP output "
        "with a shape): other numbers become 0.0, other scored objects are removed. All kept "
        "when absent.",
    )
    allow_logprobs: bool = Field(
        default=False,
        description="Keep OpenAI log-probabilities (logprobs, top_logprobs, prompt_logprobs); "
        "when false they are set to null.",
    )
    strip_fields: list[JsonPath] = Field(
        default_factory=list,
        description='Paths of fields removed from responses, e.g. "debug" (debug data, '
        "internal ids).",
    )

    @model_validator(mode="after")
    def _clamp(self) -> Extraction:
        if self.clamp is not None and not 0.0 <= self.clamp[0] < self.clamp[1] <= 1.0:
            raise ValueError("clamp needs 0 <= low < high <= 1")
        return self


class Output(Strict):
    redact: Sensitive | None = Field(
        default=None,
        description="PII and secrets in answers: masked, or (block) the answer is withheld "
        "(502; a stream ends with an error event).",
    )
    streaming: Streaming = Field(
        default=Streaming(), description="How redact holds back streamed text to mask it."
    )
    extraction: Extraction | None = Field(
        default=None,
        description="Model-extraction defences; when present, logprobs are removed unless "
        "allow_logprobs.",
    )
    sanitize_errors: bool = Field(
        default=True,
        description="Replace upstream 5xx bodies with a generic JSON error that carries the "
        "decision id; the original goes to the audit record only.",
    )
