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
    max_decoded_bytes: int = Field(default=1024 * 1024, ge=1, le=MAX_BODY_BYTES)
    max_ratio: int = Field(
        default=100, ge=1, le=1000, description="Decoded size over encoded size, at most."
    )


class JsonLimits(Strict):
    max_depth: int = Field(default=64, ge=1, le=512, description="Nesting of objects and arrays.")


class ChatProfile(Strict):
    max_messages: int = Field(default=256, ge=1, le=10_000)
    roles: list[NonEmptyRole] = Field(
        default_factory=lambda: ["system", "developer", "user", "assistant", "tool"],
        min_length=1,
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="Upper bound for max_tokens / max_completion_tokens."
    )
    max_n: int = Field(default=1, ge=1, le=128)
    allow_tools: bool = True
    max_tools: int = Field(default=64, ge=0, le=1024)


class CompletionsProfile(Strict):
    max_prompts: int = Field(default=16, ge=1, le=4096)
    max_tokens: int | None = Field(default=None, ge=1)
    max_n: int = Field(default=1, ge=1, le=128)


class EmbeddingsProfile(Strict):
    max_inputs: int = Field(default=2048, ge=1, le=100_000)


class TensorInput(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    datatype: Literal[
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
        "FP16", "FP32", "FP64", "BYTES",
    ]  # fmt: skip
    shape: list[Annotated[int, Field(ge=-1)]] = Field(
        min_length=1, max_length=16, description="-1 means any size in that dimension."
    )


class TensorProfile(Strict):
    inputs: list[TensorInput] = Field(
        default_factory=list, description="The inputs the model takes; empty means any."
    )
    max_elements: int = Field(default=1_000_000, ge=1, le=100_000_000)


class JsonSchemaSource(Strict):
    """A JSON Schema for the whole body: a file beside the policy, or inline."""

    file: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    inline: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> JsonSchemaSource:
        if (self.file is None) == (self.inline is None):
            raise ValueError("give exactly one of file, inline")
        return self


class Images(Strict):
    formats: list[Literal["png", "jpeg", "webp"]] = Field(
        default=["png", "jpeg", "webp"], min_length=1
    )
    max_bytes: int = Field(default=5 * 1024 * 1024, ge=1, le=MAX_BODY_BYTES)
    max_width: int = Field(default=4096, ge=1, le=65_535)
    max_height: int = Field(default=4096, ge=1, le=65_535)
    max_pixels: int = Field(default=16_777_216, ge=1, le=PILLOW_MAX_PIXELS)
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
    threshold: float = Field(default=0.5, gt=0.0, le=1.0)
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

    max_body_bytes: int = Field(default=1024 * 1024, ge=1, le=MAX_BODY_BYTES)
    content_types: list[MediaType] | None = Field(
        default=None, description="Accepted media types; any when absent."
    )
    encodings: list[Literal["gzip"]] = Field(
        default_factory=list, description="Content-Encoding accepted besides identity."
    )
    gzip: Gzip = Gzip()
    json_limits: JsonLimits = Field(default_factory=JsonLimits, alias="json")
    profile: Profile | None = None
    chat: ChatProfile = ChatProfile()
    completions: CompletionsProfile = CompletionsProfile()
    embeddings: EmbeddingsProfile = EmbeddingsProfile()
    tensors: TensorProfile = TensorProfile()
    json_schema: JsonSchemaSource | None = None
    input_types: list[InputType] | None = Field(
        default=None, description="Input types this model takes; any when absent."
    )
    images: Images = Images()
    injection: Injection | None = None
    pii: Sensitive | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Streaming(Strict):
    hold_back_chars: int = Field(
        default=64, ge=16, le=4096,
        description="Text held back so a value split across events is still caught.",
    )  # fmt: skip
    max_hold_chars: int = Field(default=4096, ge=64, le=65_536)


class Extraction(Strict):
    score_fields: list[JsonPath] = Field(
        default_factory=list, description='Paths of scores, e.g. "outputs.*.data".'
    )
    decimals: int | None = Field(default=None, ge=0, le=6)
    clamp: tuple[float, float] | None = None
    top_k: int | None = Field(default=None, ge=1, le=1000)
    allow_logprobs: bool = False
    strip_fields: list[JsonPath] = Field(default_factory=list)

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
    streaming: Streaming = Streaming()
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
