"""What a credential says its holder may use, enforced on every request.

A token's claims, an introspection answer or an API key's metadata may narrow what the holder
may reach, whatever the model's rules allow:

    models          names the holder may call (a model's name or one of its aliases), or "*"
    model_versions  a semantic-version range for every model (">=1.2.0 <2.0.0", "^1.4",
                    "~2.1.0", "1.x", alternatives joined by "||"), or a map model -> range
    input_types     the input types the holder may send (text, image, audio, tensor)
    regions         the gateway regions (as Envoy reports them) the holder may be served in
    source_cidrs    address ranges the holder may call from

An absent claim does not narrow. A claim of the wrong shape (a number for `models`, a range
that does not parse, an address range that is not one) refuses the request: a credential that
tries to say something we cannot read is never taken as saying nothing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import semver

from extproc.authz.conditions import ip_in

MODELS = "models"
MODEL_VERSIONS = "model_versions"
INPUT_TYPES = "input_types"
REGIONS = "regions"
SOURCE_CIDRS = "source_cidrs"
CLAIMS = (MODELS, MODEL_VERSIONS, INPUT_TYPES, REGIONS, SOURCE_CIDRS)

# Bounds on what a credential may carry: parsing stays cheap whatever a token holds.
MAX_ITEMS = 64
MAX_RANGE_CHARS = 256

_COMPARATOR = re.compile(r"^(>=|<=|>|<|==|=|!=|\^|~)?\s*v?([0-9x*][0-9A-Za-z.+*-]*)$")
_VERSION_NAME = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?$")


class ConstraintError(ValueError):
    """A claim that narrows access is present but cannot be read."""


def version_of(name: str) -> semver.Version | None:
    """The semantic version a version name stands for ("v2" -> 2.0.0, "1.4" -> 1.4.0)."""
    match = _VERSION_NAME.match(name)
    if match is None:
        return None
    major, minor, patch, pre = match.groups()
    return semver.Version(int(major), int(minor or 0), int(patch or 0), prerelease=pre)


@dataclass(frozen=True, slots=True)
class VersionRange:
    """Alternatives (`||`) of comparator sets; a version matches when one set matches whole."""

    source: str
    alternatives: tuple[tuple[tuple[str, semver.Version], ...], ...]

    def matches(self, version: semver.Version) -> bool:
        return any(
            all(version.compare(bound) in _ACCEPTS[op] for op, bound in comparators)
            for comparators in self.alternatives
        )


# compare() gives -1, 0 or 1; the comparisons each operator accepts.
_ACCEPTS = {
    ">=": (0, 1),
    ">": (1,),
    "<=": (-1, 0),
    "<": (-1,),
    "==": (0,),
    "!=": (-1, 1),
}


def _partial(text: str) -> tuple[int, ...]:
    """The given parts of a version ("1.x" -> (1,), "2.1" -> (2, 1)); wildcards end it."""
    parts: list[int] = []
    for part in text.split("+")[0].split("-")[0].split("."):
        if part in ("x", "X", "*"):
            break
        if not part.isdigit():
            raise ConstraintError(f"{text!r} is not a version")
        parts.append(int(part))
    if len(parts) > 3:
        raise ConstraintError(f"{text!r} has more than three parts")
    return tuple(parts)


def _bound(parts: tuple[int, ...]) -> semver.Version:
    return semver.Version(*(*parts, 0, 0, 0)[:3])


def _comparators(token: str) -> list[tuple[str, semver.Version]]:
    match = _COMPARATOR.match(token)
    if match is None:
        raise ConstraintError(f"{token!r} is not a version comparator")
    op, text = match.groups()
    if op in (">=", "<=", ">", "<", "==", "!="):
        try:
            return [(op, semver.Version.parse(text, optional_minor_and_patch=True))]
        except ValueError:
            raise ConstraintError(f"{text!r} is not a semantic version") from None
    parts = _partial(text)
    if not parts:  # "*" or "x": any version
        return []
    low = _bound(parts)
    if op == "^":  # up to the next change of the first non-zero part (npm semantics)
        index = next((i for i, p in enumerate(parts) if p != 0), len(parts) - 1)
        index = min(index, len(parts) - 1)
        high = (*parts[:index], parts[index] + 1)
    elif op == "~" and len(parts) >= 2:  # patch changes only
        high = (parts[0], parts[1] + 1)
    elif op in (None, "=", "~") and len(parts) == 3 and "-" not in text:
        return [("==", low)]
    elif op in (None, "=") and "-" in text:
        try:
            return [("==", semver.Version.parse(text))]
        except ValueError:
            raise ConstraintError(f"{text!r} is not a semantic version") from None
    else:  # a partial version: every version it prefixes ("1.x", "1.2", "~1")
        high = (*parts[:-1], parts[-1] + 1)
    return [(">=", low), ("<", _bound(high))]


@functools.lru_cache(maxsize=1024)
def parse_range(source: str) -> VersionRange:
    """Parse an npm-style range. Raises ConstraintError."""
    if len(source) > MAX_RANGE_CHARS:
        raise ConstraintError(f"a version range has at most {MAX_RANGE_CHARS} characters")
    alternatives = []
    for alternative in source.split("||"):
        tokens = re.sub(r"(>=|<=|>|<|==|!=|=|\^|~)\s+", r"\1", alternative.strip()).split()
        if not tokens:
            raise ConstraintError(f"{source!r} has an empty alternative")
        comparators: list[tuple[str, semver.Version]] = []
        for token in tokens:
            comparators.extend(_comparators(token.rstrip(",")))
        alternatives.append(tuple(comparators))
    return VersionRange(source, tuple(alternatives))


def _strings(claims: Mapping[str, Any], name: str) -> frozenset[str] | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list | tuple)
        or len(value) > MAX_ITEMS
        or not all(isinstance(v, str) for v in value)
    ):
        raise ConstraintError(f"claim {name!r} must be a string or a list of at most "
                              f"{MAX_ITEMS} strings")  # fmt: skip
    return frozenset(value)


@dataclass(frozen=True, slots=True)
class Request:
    """The facts about one request that constraints are checked against."""

    model_names: frozenset[str]  # the model and its aliases
    model: str
    version: str
    source_address: str
    region: str
    input_types: frozenset[str] | None = None  # None: not known yet (before the body)


def violated(claims: Mapping[str, Any], request: Request) -> str | None:
    """The first constraint the request breaks ("models", ...), or None. Raises
    ConstraintError for a constraint claim that cannot be read."""
    models = _strings(claims, MODELS)
    if models is not None and "*" not in models and models.isdisjoint(request.model_names):
        return MODELS
    ranges = claims.get(MODEL_VERSIONS)
    if ranges is not None:
        if isinstance(ranges, Mapping):
            if len(ranges) > MAX_ITEMS:
                raise ConstraintError(f"claim {MODEL_VERSIONS!r} names too many models")
            found = [r for name, r in ranges.items() if name in request.model_names]
            source = found[0] if found else None
        else:
            source = ranges
        if source is not None:
            if not isinstance(source, str):
                raise ConstraintError(f"claim {MODEL_VERSIONS!r} must hold range strings")
            version = version_of(request.version)
            if version is None or not parse_range(source).matches(version):
                return MODEL_VERSIONS
    types = _strings(claims, INPUT_TYPES)
    known = request.input_types
    if types is not None and known is not None and not known <= types:
        return INPUT_TYPES
    regions = _strings(claims, REGIONS)
    if regions is not None and request.region not in regions:
        return REGIONS
    cidrs = _strings(claims, SOURCE_CIDRS)
    if cidrs is not None:
        try:
            inside = ip_in(request.source_address, sorted(cidrs))
        except ValueError:  # no usable address, or a range that is not one: refused either way
            return SOURCE_CIDRS
        if not inside:
            return SOURCE_CIDRS
    return None


def narrows_input_types(claims: Mapping[str, Any]) -> bool:
    """The credential limits input types: the body must be read to check them."""
    return claims.get(INPUT_TYPES) is not None
