"""The inspect phase on a parsed request body: profile or schema, input types and images, then
prompt injection and PII in the text fields. Each step returns a Violation or lets the body on.

The order puts cheap structural checks first, so a malformed body never reaches a scanner, and
PII last, since masking rewrites the text the injection detector must see as the client sent it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from extproc.inspect.images import check_image_url
from extproc.inspect.plan import InputPlan
from extproc.inspect.profiles import (
    check_chat,
    check_completions,
    check_embeddings,
    check_tensors,
    image_urls,
    input_types,
    text_fields,
)
from extproc.inspect.violation import Violation

log = logging.getLogger(__name__)

FLAG_INJECTION = "prompt-injection"


@dataclass(slots=True)
class Inspected:
    """What inspection found in a body it let through."""

    input_types: frozenset[str] = frozenset()
    # The body was rewritten (PII masked): it must be re-serialised and sent instead.
    changed: bool = False
    # Shown to the client (x-gateway-flags) and recorded.
    flags: tuple[str, ...] = ()
    # For the audit record only: what was found, never the values.
    notes: dict[str, object] = field(default_factory=dict)


def _profile(plan: InputPlan, doc: object) -> Violation | None:
    if plan.profile == "openai_chat":
        return check_chat(doc, plan.chat)
    if plan.profile == "openai_completions":
        return check_completions(doc, plan.completions)
    if plan.profile == "openai_embeddings":
        return check_embeddings(doc, plan.embeddings)
    if plan.profile == "oip":
        return check_tensors(doc, plan.tensors)
    return None


def inspect_request(plan: InputPlan, doc: object) -> Inspected | Violation:
    violation = _profile(plan, doc)
    if violation is None and plan.schema is not None:
        violation = plan.schema.check(doc)
    if violation is not None:
        return violation
    result = Inspected(input_types=frozenset(input_types(doc)))
    if plan.input_types is not None:
        refused = result.input_types - plan.input_types
        if refused:
            allowed = ", ".join(sorted(plan.input_types)) or "none"
            return Violation(
                422, "input_type_not_allowed", "",
                f"this model does not take {', '.join(sorted(refused))} input (it takes: "
                f"{allowed})",
            )  # fmt: skip
    if "image" in result.input_types:
        for path, url in image_urls(doc):
            image = check_image_url(url, plan.images, path)  # None: a remote URL allowed
            if isinstance(image, Violation):
                return image
    if plan.injection is None and plan.pii is None:
        return result
    fields = text_fields(doc, plan.profile)
    if isinstance(fields, Violation):
        return fields  # too many strings to read them all: never partly inspected
    if plan.injection is not None:
        check = plan.injection
        verdict = check.detector.score([f.text for f in fields])
        if verdict.score >= check.threshold:
            result.notes["injection"] = {"score": round(verdict.score, 3),
                                         "signals": list(verdict.signals)}  # fmt: skip
            if check.action == "block":
                return Violation(
                    400, "prompt_injection", "",
                    "the request looks like a prompt injection and was refused",
                )  # fmt: skip
            if check.action == "flag":
                result.flags += (FLAG_INJECTION,)
    if plan.pii is not None:
        pii = plan.pii
        found: dict[str, int] = {}
        for text_field in fields:
            findings = pii.scanner.scan(text_field.text)
            if not findings:
                continue
            for finding in findings:
                found[finding.type] = found.get(finding.type, 0) + 1
            blocked = sorted({f.type for f in findings} & pii.block)
            if blocked:
                return Violation(
                    400, "sensitive_data", text_field.path,
                    f"the request contains sensitive data ({', '.join(blocked)})",
                )  # fmt: skip
            text_field.replace(pii.masker.apply(text_field.text, findings))
            result.changed = True
        if found:
            result.notes["pii"] = found
    return result
