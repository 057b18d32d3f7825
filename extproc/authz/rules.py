"""Compiled authorization rules: frozen sets built once per load, checked per request."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from extproc.authn.base import Identity
from extproc.authz.conditions import Condition, ConditionError, ConditionFacts, compile_condition
from extproc.policy.schema import ClaimValue, Rule


def _frozen(values: Iterable[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    versions: frozenset[str] | None
    principals: frozenset[str] | None
    tenants: frozenset[str] | None
    auth_methods: frozenset[str] | None
    roles_any: frozenset[str] | None
    roles_all: frozenset[str] | None
    scopes_any: frozenset[str] | None
    scopes_all: frozenset[str] | None
    claims: tuple[tuple[str, tuple[Any, ...]], ...]
    # Scoped to requests carrying one of these input types: checked once the body is read.
    input_types: frozenset[str] | None = None
    condition: Condition | None = None  # `when:`, a CEL expression

    def applies_to(self, version: str) -> bool:
        return self.versions is None or version in self.versions

    @property
    def reads_cost(self) -> bool:
        return self.condition is not None and "request.cost" in self.condition.variables

    @property
    def reads_body(self) -> bool:
        """Decided once the body is read: scoped to input types, or a condition reads them."""
        return self.input_types is not None or (
            self.condition is not None and self.condition.reads_body
        )

    def failed_condition(self, identity: Identity) -> str | None:
        """The first condition this identity fails, or None when the rule passes."""
        if self.principals is not None and identity.principal not in self.principals:
            return "principals"
        if self.tenants is not None and identity.tenant not in self.tenants:
            return "tenants"
        if self.auth_methods is not None and identity.method not in self.auth_methods:
            return "auth_methods"
        if self.roles_any is not None and self.roles_any.isdisjoint(identity.roles):
            return "roles_any"
        if self.roles_all is not None and not self.roles_all <= identity.roles:
            return "roles_all"
        if self.scopes_any is not None and self.scopes_any.isdisjoint(identity.scopes):
            return "scopes_any"
        if self.scopes_all is not None and not self.scopes_all <= identity.scopes:
            return "scopes_all"
        for claim, allowed in self.claims:
            if not _claim_matches(identity.claims.get(claim, _MISSING), allowed):
                return f"claims.{claim}"
        return None


_MISSING = object()


def _claim_matches(actual: Any, allowed: tuple[Any, ...]) -> bool:
    if actual is _MISSING:
        return False
    # bool is an int in Python: compare types too, so `true` never matches `1`.
    return any(type(actual) is type(a) and actual == a for a in allowed)


def _claim_values(value: ClaimValue) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


class RuleCompileError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def compile_rule(rule: Rule, index: int = 0) -> CompiledRule:
    condition = None
    if rule.when is not None:
        try:
            condition = compile_condition(rule.when)
        except ConditionError as exc:
            raise RuleCompileError(f"authorization.rules[{index}].when", str(exc)) from None
    return CompiledRule(
        name=rule.name,
        versions=_frozen(rule.versions),
        principals=_frozen(rule.principals),
        tenants=_frozen(rule.tenants),
        auth_methods=_frozen(rule.auth_methods),
        roles_any=_frozen(rule.roles_any),
        roles_all=_frozen(rule.roles_all),
        scopes_any=_frozen(rule.scopes_any),
        scopes_all=_frozen(rule.scopes_all),
        claims=tuple((k, _claim_values(v)) for k, v in sorted((rule.claims or {}).items())),
        input_types=_frozen(rule.input_types),
        condition=condition,
    )


def first_failure(
    rules: tuple[CompiledRule, ...],
    identity: Identity,
    version: str,
    input_types: frozenset[str] | None = None,
    facts: Callable[[], ConditionFacts] | None = None,
) -> tuple[str, str] | None:
    """(rule name, condition) of the first applicable rule that fails, or None: all pass.

    Without `input_types` (the request headers) rules that read the body are left for later;
    with them (the body was read) only those rules are checked, the rest having passed already.
    `facts` builds what `when:` conditions read, once, and only if one is evaluated; a
    condition that cannot be evaluated fails its rule.
    """
    return next(failures(rules, identity, version, input_types, facts), None)


def failures(
    rules: tuple[CompiledRule, ...],
    identity: Identity,
    version: str,
    input_types: frozenset[str] | None = None,
    facts: Callable[[], ConditionFacts] | None = None,
) -> Iterator[tuple[str, str]]:
    """(rule name, condition) of every applicable rule that fails, in order (first_failure)."""
    built: ConditionFacts | None = None
    for rule in rules:
        if input_types is None:
            scoped_in = not rule.reads_body
        else:
            scoped_in = rule.reads_body and (
                rule.input_types is None or not rule.input_types.isdisjoint(input_types)
            )
        if not scoped_in or not rule.applies_to(version):
            continue
        failed = rule.failed_condition(identity)
        if failed is None and rule.condition is not None:
            if facts is None:
                yield rule.name, "when (no request facts)"
                continue
            if built is None:
                built = facts()
            try:
                if not rule.condition.evaluate(built):
                    failed = "when"
            except ConditionError:
                failed = "when (evaluation failed)"
        if failed is not None:
            yield rule.name, failed
