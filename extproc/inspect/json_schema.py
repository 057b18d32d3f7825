"""A policy's own JSON Schema for request bodies, validated with jsonschema-rs.

The schema is compiled once, when the policy loads: it is checked against its meta-schema
(the draft its `$schema` names, 2020-12 by default), and every `$ref` must resolve inside the
schema itself, since nothing is fetched over the network, then or later. `pattern` uses a
linear-time regex engine (no look-around or back-references), so a policy cannot make a
request's validation backtrack for long.

A refusal names the failing field and says why in a message built from the error's keyword,
not the validator's own text, which quotes the offending value (possibly large, or sensitive).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema_rs
from jsonschema_rs import ValidationErrorKind as Kind

from extproc.inspect.profiles import field_path
from extproc.inspect.violation import Violation, quoted

MAX_MESSAGE_CHARS = 200
_MAX_LISTED = 5


class BodySchema:
    """A compiled JSON Schema; `check` is safe to call on the request path."""

    __slots__ = ("_validator",)

    def __init__(self, schema: Mapping[str, Any]) -> None:
        """Raises ValueError when the schema is invalid or refers outside itself."""
        if not isinstance(schema, Mapping):
            raise ValueError("a JSON Schema must be an object")
        try:
            self._validator = jsonschema_rs.validator_for(
                dict(schema),
                offline=True,  # a remote $ref (or $schema) fails here, never fetched
                pattern_options=jsonschema_rs.RegexOptions(),
            )
        except jsonschema_rs.ValidationError as exc:
            where = field_path(exc.instance_path)
            raise ValueError(
                f"invalid JSON Schema{f' at {where}' if where else ''}: "
                f"{exc.message.splitlines()[0]}"
            ) from None
        except (jsonschema_rs.ReferencingError, ValueError, TypeError) as exc:
            raise ValueError(f"invalid JSON Schema: {str(exc).splitlines()[0]}") from None

    def check(self, doc: object) -> Violation | None:
        """None when `doc` is valid; else a 422 `schema_violation` for the first error found."""
        try:
            self._validator.validate(doc)
        except jsonschema_rs.ValidationError as exc:
            message = _describe(exc.kind)
            if len(message) > MAX_MESSAGE_CHARS:
                message = message[: MAX_MESSAGE_CHARS - 3] + "..."
            return Violation(422, "schema_violation", field_path(exc.instance_path), message)
        except ValueError:  # not JSON (a parsed body always is): fail closed all the same
            return Violation(422, "schema_violation", "", "the body is not JSON data")
        return None


def _describe(kind: Kind) -> str:
    """What the failing value should have been, without quoting more than a short excerpt of
    the client's own input (property names) and of the schema (enum values, patterns)."""
    match kind:
        case Kind.Type(types=types):
            return f"must be of type {' or '.join(types)}"
        case Kind.Required(property=name):
            return f"{quoted(name)} is required"
        case (
            Kind.AdditionalProperties(unexpected=names)
            | Kind.UnevaluatedProperties(unexpected=names)
        ):
            return f"unexpected properties: {_listed(names)}"
        case Kind.Enum(options=options):
            return f"must be one of: {_listed(options)}"
        case Kind.Constant(expected_value=value):
            return f"must be {quoted(value)}"
        case Kind.Minimum(limit=limit):
            return f"must be at least {limit}"
        case Kind.Maximum(limit=limit):
            return f"must be at most {limit}"
        case Kind.ExclusiveMinimum(limit=limit):
            return f"must be greater than {limit}"
        case Kind.ExclusiveMaximum(limit=limit):
            return f"must be less than {limit}"
        case Kind.MultipleOf(multiple_of=step):
            return f"must be a multiple of {step}"
        case Kind.MinLength(limit=limit):
            return f"must be at least {limit} characters long"
        case Kind.MaxLength(limit=limit):
            return f"must be at most {limit} characters long"
        case Kind.MinItems(limit=limit):
            return f"must have at least {limit} items"
        case Kind.MaxItems(limit=limit) | Kind.AdditionalItems(limit=limit):
            return f"must have at most {limit} items"
        case Kind.UnevaluatedItems():
            return "has unexpected items"
        case Kind.MinProperties(limit=limit):
            return f"must have at least {limit} properties"
        case Kind.MaxProperties(limit=limit):
            return f"must have at most {limit} properties"
        case Kind.UniqueItems():
            return "items must be unique"
        case Kind.Contains():
            return "must contain an item that matches the schema"
        case Kind.Pattern(pattern=pattern):
            return f"must match the pattern {quoted(pattern)}"
        case Kind.Format(format=name):
            return f"must be a valid {quoted(name)}"
        case Kind.PropertyNames():
            return "has a property name that is not allowed"
        case Kind.AnyOf():
            return "must match at least one of the allowed forms"
        case Kind.OneOfNotValid():
            return "must match exactly one of the allowed forms; it matches none"
        case Kind.OneOfMultipleValid():
            return "must match exactly one of the allowed forms; it matches several"
        case Kind.Not():
            return "matches a form that is not allowed"
        case Kind.FalseSchema():
            return "is not allowed"
    return f"does not match the schema ({kind.name})"


def _listed(values: list[Any]) -> str:
    shown = ", ".join(quoted(value) for value in values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown
