"""The runtime form of a policy's `input:` and `output:` sections, built once per load.

Scanners are compiled here (and cached across loads by their pattern set), JSON Schemas
checked, detectors loaded and hash keys read from the environment, so the request path only
runs what is already built. `InputPlan.needs_body` and `OutputPlan.watches_response` tell the
transport which of Envoy's phases a route needs: a route without body rules pays for none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.inspect.body import BodyLimits
from extproc.inspect.extraction import ExtractionRules, parse_path
from extproc.inspect.images import ImageRules
from extproc.inspect.injection import InjectionDetector, load_detector
from extproc.inspect.json_schema import BodySchema
from extproc.inspect.mask import MIN_KEY_BYTES, Masker
from extproc.inspect.pii import PiiScanner, scanner_for
from extproc.inspect.profiles import (
    ChatLimits,
    CompletionsLimits,
    EmbeddingsLimits,
    TensorLimits,
    TensorSpec,
)
from extproc.inspect.schema import Extraction, Input, Masking, Output, Sensitive

MAX_SCHEMA_FILE_BYTES = 1024 * 1024


class InspectCompileError(ValueError):
    """A policy's input or output section that cannot be built; `field` names where."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(message)
        self.field = field_path


@dataclass(frozen=True, slots=True)
class InjectionCheck:
    detector: InjectionDetector
    threshold: float
    action: str  # block | flag | log


@dataclass(frozen=True, slots=True)
class PiiCheck:
    scanner: PiiScanner  # every listed type, in one database
    masker: Masker
    block: frozenset[str]  # the rest of the scanner's types are masked


@dataclass(frozen=True, slots=True)
class InputPlan:
    limits: BodyLimits = field(default_factory=BodyLimits)
    # Anything beyond what the request headers decide: Envoy must send the body.
    needs_body: bool = False
    profile: str | None = None
    chat: ChatLimits = field(default_factory=ChatLimits)
    completions: CompletionsLimits = field(default_factory=CompletionsLimits)
    embeddings: EmbeddingsLimits = field(default_factory=EmbeddingsLimits)
    tensors: TensorLimits = field(default_factory=TensorLimits)
    schema: BodySchema | None = None
    input_types: frozenset[str] | None = None
    images: ImageRules = field(default_factory=ImageRules)
    injection: InjectionCheck | None = None
    pii: PiiCheck | None = None


@dataclass(frozen=True, slots=True)
class OutputPlan:
    redact: PiiCheck | None = None
    hold_back: int = 64
    max_hold: int = 4096
    extraction: ExtractionRules = field(
        default_factory=lambda: ExtractionRules(allow_logprobs=True)
    )
    sanitize_errors: bool = True

    @property
    def transforms_body(self) -> bool:
        """A successful response's body is read and may be rewritten."""
        return self.redact is not None or self.extraction.active()

    @property
    def watches_response(self) -> bool:
        """The decision's own stream must see the response. Not for sanitize_errors: Envoy
        opens a stream of its own for 5xx answers only (adapters/ext_proc_errors.py)."""
        return self.transforms_body


NO_INPUT = InputPlan()
NO_OUTPUT = OutputPlan(sanitize_errors=False)


def _masker(spec: Masking, environ: Mapping[str, str], where: str) -> Masker:
    key: bytes | None = None
    if spec.hash_key_env is not None:
        key = environ.get(spec.hash_key_env, "").encode()
        if len(key) < MIN_KEY_BYTES:
            raise InspectCompileError(
                f"{where}.hash_key_env",
                f"environment variable {spec.hash_key_env} must hold at least "
                f"{MIN_KEY_BYTES} bytes",
            )
    return Masker(spec.style, key)


def _pii(spec: Sensitive, environ: Mapping[str, str], where: str) -> PiiCheck:
    try:
        scanner = scanner_for([*spec.block, *spec.mask])
    except ValueError as exc:
        raise InspectCompileError(where, str(exc)) from None
    return PiiCheck(scanner, _masker(spec, environ, where), frozenset(spec.block))


def _schema(spec: Input, policy_dir: Path) -> BodySchema | None:
    source = spec.json_schema
    if source is None:
        return None
    where = "input.json_schema"
    document: Any = source.inline
    if source.file is not None:
        path = (policy_dir / source.file).resolve()
        try:
            raw = path.read_bytes()[: MAX_SCHEMA_FILE_BYTES + 1]
            if len(raw) > MAX_SCHEMA_FILE_BYTES:
                raise InspectCompileError(f"{where}.file", "the schema file is over 1 MiB")
            document = json.loads(raw)
        except OSError as exc:
            message = f"cannot read {path}: {exc.strerror}"
            raise InspectCompileError(f"{where}.file", message) from None
        except ValueError as exc:
            raise InspectCompileError(f"{where}.file", f"{path} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InspectCompileError(where, "a JSON Schema must be an object")
    try:
        return BodySchema(document)
    except ValueError as exc:
        raise InspectCompileError(where, str(exc)) from None


def compile_input(
    spec: Input, policy_dir: Path, environ: Mapping[str, str], explicit: bool
) -> InputPlan:
    """`explicit`: the policy has an `input:` section (its JSON checks then apply)."""
    limits = BodyLimits(
        max_body_bytes=spec.max_body_bytes,
        content_types=None if spec.content_types is None else frozenset(spec.content_types),
        encodings=frozenset(spec.encodings),
        max_decoded_bytes=spec.gzip.max_decoded_bytes,
        max_ratio=spec.gzip.max_ratio,
        max_depth=spec.json_limits.max_depth,
    )
    injection = None
    if spec.injection is not None:
        try:
            detector = load_detector(spec.injection.detector, spec.injection.options)
        except ValueError as exc:
            raise InspectCompileError("input.injection.detector", str(exc)) from None
        injection = InjectionCheck(detector, spec.injection.threshold, spec.injection.action)
    pii = None
    if spec.pii is not None:
        pii = _pii(spec.pii, environ, "input.pii")
    images = spec.images
    chat = spec.chat
    needs_body = explicit and (
        bool({"json_limits", "images"} & spec.model_fields_set)
        or bool(spec.encodings)
        or any(
            x is not None
            for x in (spec.profile, spec.json_schema, spec.input_types, spec.injection, spec.pii)
        )
    )
    plan = InputPlan(
        limits=limits,
        needs_body=needs_body,
        profile=spec.profile,
        chat=ChatLimits(
            max_messages=chat.max_messages,
            roles=frozenset(chat.roles),
            max_tokens=chat.max_tokens,
            max_n=chat.max_n,
            allow_tools=chat.allow_tools,
            max_tools=chat.max_tools,
        ),
        completions=CompletionsLimits(
            max_prompts=spec.completions.max_prompts,
            max_tokens=spec.completions.max_tokens,
            max_n=spec.completions.max_n,
        ),
        embeddings=EmbeddingsLimits(max_inputs=spec.embeddings.max_inputs),
        tensors=TensorLimits(
            inputs=tuple(
                TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in spec.tensors.inputs
            ),
            max_elements=spec.tensors.max_elements,
        ),
        schema=_schema(spec, policy_dir),
        input_types=None if spec.input_types is None else frozenset(spec.input_types),
        images=ImageRules(
            formats=frozenset(images.formats),
            max_bytes=images.max_bytes,
            max_width=images.max_width,
            max_height=images.max_height,
            max_pixels=images.max_pixels,
            allow_remote=images.allow_remote,
        ),
        injection=injection,
        pii=pii,
    )
    return plan


def compile_output(spec: Output, environ: Mapping[str, str]) -> OutputPlan:
    redact = None
    if spec.redact is not None:
        redact = _pii(spec.redact, environ, "output.redact")
    ex = spec.extraction or Extraction(allow_logprobs=True)  # absent: changes nothing
    for name, paths in (("score_fields", ex.score_fields), ("strip_fields", ex.strip_fields)):
        for i, path in enumerate(paths):
            try:
                parse_path(path)
            except ValueError as exc:
                raise InspectCompileError(f"output.extraction.{name}.{i}", str(exc)) from None
    return OutputPlan(
        redact=redact,
        hold_back=spec.streaming.hold_back_chars,
        max_hold=max(spec.streaming.max_hold_chars, spec.streaming.hold_back_chars * 2),
        extraction=ExtractionRules(
            score_fields=tuple(ex.score_fields),
            decimals=ex.decimals,
            clamp=ex.clamp,
            top_k=ex.top_k,
            allow_logprobs=ex.allow_logprobs,
            strip_fields=tuple(ex.strip_fields),
        ),
        sanitize_errors=spec.sanitize_errors,
    )
