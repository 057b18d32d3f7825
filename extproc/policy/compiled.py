"""The runtime form of policies: frozen, built once per load, nothing parsed per request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from extproc.authn.base import Authenticator
from extproc.authz.rules import CompiledRule
from extproc.authz.tenancy import TenancyPlan
from extproc.authz.versions import VersionPlan
from extproc.inspect.plan import NO_INPUT, NO_OUTPUT, InputPlan, OutputPlan
from extproc.quota.plan import NO_QUOTAS, QuotaPlan


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    model: str
    names: frozenset[str]  # the model and its aliases, as clients may write them
    file: str
    routing: VersionPlan  # the versions, and how a request picks one
    authenticators: tuple[Authenticator, ...]
    rules: tuple[CompiledRule, ...]
    allow_any_authenticated: bool
    # Every header that can carry a credential for this model: all are removed upstream, not
    # only the one that authenticated, so a second credential never leaks to the model.
    credential_headers: tuple[str, ...] = ("authorization",)
    quotas: QuotaPlan = NO_QUOTAS
    inspect: InputPlan = NO_INPUT
    output: OutputPlan = NO_OUTPUT
    # Some rule applies only to certain input types: decided once the body is read.
    typed_rules: bool = False
    # Some `when:` condition reads request.cost: estimated from the body only then.
    rules_read_cost: bool = False
    tenancy: TenancyPlan = field(default_factory=TenancyPlan)
    # Rules in dry run: what they would deny is recorded, never enforced.
    trial_rules: tuple[CompiledRule, ...] = ()
    # The whole policy in dry run: credential constraints, content verdicts and quotas are
    # recorded instead of enforced (authentication, routing, tenancy and limits still are).
    dry_run: bool = False
    # Keep each request in its audit record (audit.record_requests): the body cap, else None.
    record_requests: int | None = None

    @property
    def has_trials(self) -> bool:
        return self.dry_run or bool(self.trial_rules)

    @property
    def versions(self) -> Mapping[str, str]:
        """Version name -> the Envoy cluster that serves it."""
        return {name: v.cluster for name, v in self.routing.versions.items()}

    @property
    def default_version(self) -> str:
        return self.routing.default

    @property
    def needs_body(self) -> bool:
        return (
            self.inspect.needs_body
            or self.quotas.needs_body
            or self.typed_rules
            or self.tenancy.needs_body
        )

    @property
    def watches_response(self) -> bool:
        """Envoy must show us the response: for quotas, or for the output rules."""
        return self.quotas.watches_response or self.output.watches_response


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """Requests under one (host, path prefix): owned by one policy, or chosen by body model."""

    prefix: str
    host: str | None
    methods: frozenset[str] | None
    owner: CompiledPolicy | None
    by_model: Mapping[str, CompiledPolicy] = field(default_factory=dict)
    # Per model on a shared path: its own methods (None: any), checked once the body names it.
    model_methods: Mapping[str, frozenset[str] | None] = field(default_factory=dict)
    # For body-selected routes: every candidate's authenticators, so a caller is authenticated
    # (and a missing credential refused) before the body is even requested.
    authenticators: tuple[Authenticator, ...] = ()

    @property
    def watches_response(self) -> bool:
        """Some model here has quotas or output rules that need the response."""
        if self.owner is not None:
            return self.owner.watches_response
        return any(p.watches_response for p in self.by_model.values())

    def matches(self, host: str, path: str) -> bool:
        if self.host is not None and self.host != host:
            return False
        prefix = self.prefix
        if path == prefix or prefix == "/":
            return True
        # Whole segments only: /v2/models/iris must not match /v2/models/iris2.
        return path.startswith(prefix if prefix.endswith("/") else prefix + "/")


@dataclass(frozen=True, slots=True)
class PolicySet:
    revision: str
    policies: tuple[CompiledPolicy, ...]
    routes: tuple[RouteEntry, ...]  # most specific first
    loaded_at: float

    def match(self, host: str, path: str) -> RouteEntry | None:
        for entry in self.routes:
            if entry.matches(host, path):
                return entry
        return None
