"""Schema -> runtime form. Runs once per load; shares key sources and authenticators."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from extproc.authn.apikey import ApiKeyAuthenticator, ApiKeyStore
from extproc.authn.base import Authenticator
from extproc.authn.introspection import IntrospectionAuthenticator
from extproc.authn.jwks import HmacSecret, KeySource, RemoteJwks, StaticJwks
from extproc.authn.jwt import JwtAuthenticator, JwtIssuer
from extproc.authn.mtls import MtlsAuthenticator
from extproc.authn.oidc import DiscoveredJwks
from extproc.authz.rules import RuleCompileError, compile_rule
from extproc.authz.tenancy import TenancyPlan, compile_template
from extproc.authz.versions import Shadow, VersionPlan, VersionSpec
from extproc.inspect.plan import InspectCompileError, compile_input, compile_output
from extproc.policy.compiled import CompiledPolicy, PolicySet, RouteEntry
from extproc.policy.floors import breaches
from extproc.policy.load import NO_PLATFORM, PlatformFile, PolicyError, PolicyFile, PolicyLoadError
from extproc.policy.schema import ApiKeyMethod, IntrospectionMethod, JwtMethod, MtlsMethod, Policy
from extproc.quota.plan import QuotaCompileError, compile_quotas
from extproc.quota.schema import Quotas


@dataclass
class CompileResources:
    """What compiled policies share across one load (and across reloads, for key sources)."""

    api_keys: ApiKeyStore
    environ: Mapping[str, str]
    key_sources: dict[str, KeySource] = field(default_factory=dict)
    # Introspection clients, like key sources, outlive reloads (their caches and connections).
    introspectors: dict[object, IntrospectionAuthenticator] = field(default_factory=dict)
    # Authenticators are shared between policies with the same config, so their token caches are.
    _authenticators: dict[object, Authenticator] = field(default_factory=dict)

    def introspector(self, method: IntrospectionMethod) -> IntrospectionAuthenticator:
        secret = self.environ.get(method.client_secret_env, "")
        if not secret:
            raise ValueError(f"environment variable {method.client_secret_env} is not set")
        # The secret is part of the identity of a client, by digest only.
        key = (method.model_dump_json(), hashlib.sha256(secret.encode()).hexdigest())
        found = self.introspectors.get(key)
        if found is None:
            found = IntrospectionAuthenticator(
                str(method.endpoint),
                client_id=method.client_id,
                client_secret=secret,
                issuer=method.issuer,
                audiences=tuple(method.audiences),
                principal_claim=method.claims.principal,
                tenant_claim=method.claims.tenant,
                roles_claim=method.claims.roles,
                scopes_claim=method.claims.scopes,
                timeout_seconds=method.timeout_seconds,
                cache_ttl_seconds=method.cache_seconds,
            )
            self.introspectors[key] = found
        return found

    def key_source(self, method: JwtMethod, policy_dir: Path) -> KeySource:
        if method.jwks_file:
            path = (policy_dir / method.jwks_file).resolve()
            key = f"file:{path}"
            if key not in self.key_sources:
                self.key_sources[key] = StaticJwks.from_file(path)
            return self.key_sources[key]
        if method.jwks_url:
            key = f"url:{method.jwks_url}"
            if key not in self.key_sources:
                self.key_sources[key] = RemoteJwks(
                    str(method.jwks_url), ttl_seconds=method.jwks_ttl_seconds
                )
            return self.key_sources[key]
        if method.oidc_discovery:
            key = f"oidc:{method.issuer}"
            if key not in self.key_sources:
                self.key_sources[key] = DiscoveredJwks(
                    method.issuer, jwks_ttl_seconds=method.jwks_ttl_seconds
                )
            return self.key_sources[key]
        env_name = method.hs256_secret_env or ""
        secret = self.environ.get(env_name, "").encode()
        if not secret:
            raise ValueError(f"environment variable {env_name} is not set")
        return HmacSecret(secret)

    def shared(self, key: object, build: Callable[[], Authenticator]) -> Authenticator:
        found = self._authenticators.get(key)
        if found is None:
            found = build()
            self._authenticators[key] = found
        return found


def _jwt_issuer(method: JwtMethod, keys: KeySource) -> JwtIssuer:
    return JwtIssuer(
        issuer=method.issuer,
        audiences=frozenset(method.audiences),
        algorithms=frozenset(method.algorithms),
        keys=keys,
        leeway_seconds=method.leeway_seconds,
        principal_claim=method.claims.principal,
        tenant_claim=method.claims.tenant,
        roles_claim=method.claims.roles,
        scopes_claim=method.claims.scopes,
    )


def _authenticators(
    policy: Policy, policy_dir: Path, res: CompileResources
) -> tuple[Authenticator, ...]:
    jwt_methods = [m.jwt for m in policy.authentication if m.jwt is not None]
    key_methods = [m.api_key for m in policy.authentication if m.api_key is not None]
    out: list[Authenticator] = []
    if jwt_methods:
        issuers = tuple(_jwt_issuer(m, res.key_source(m, policy_dir)) for m in jwt_methods)
        out.append(res.shared(("jwt", issuers), lambda: JwtAuthenticator(issuers)))
    if key_methods:
        header = _one_header(key_methods)
        out.append(
            res.shared(
                ("api_key", header), lambda: ApiKeyAuthenticator(res.api_keys, header=header)
            )
        )
    for method in policy.authentication:
        if method.introspection is not None:
            out.append(res.introspector(method.introspection))
    for method in policy.authentication:
        if method.mtls is not None:
            out.append(_mtls(method.mtls))
    return tuple(out)


def _mtls(method: MtlsMethod) -> MtlsAuthenticator:
    return MtlsAuthenticator(
        trust_domains=tuple(method.trust_domains),
        subjects=tuple(method.subjects),
        tenant_from_path_segment=method.tenant_from_path_segment,
    )


def _one_header(methods: list[ApiKeyMethod]) -> str | None:
    headers = {m.header for m in methods}
    if len(headers) > 1:
        raise ValueError("list api_key once; it accepts one extra header")
    return headers.pop()


class FloorError(ValueError):
    """A policy weakens a platform floor; one entry per breach, each (field, message)."""

    def __init__(self, found: list[tuple[str, str]]) -> None:
        self.found = found
        super().__init__("; ".join(message for _, message in found))


def _version_plan(policy: Policy) -> VersionPlan:
    routing = policy.routing
    return VersionPlan(
        model=policy.model,
        default=policy.default_version().name,
        versions={
            v.name: VersionSpec(
                name=v.name,
                cluster=v.cluster,
                weight=v.weight,
                fallback=v.fallback,
                timeout_seconds=v.timeout_seconds,
                retries=v.retries,
                tenants=None if v.tenants is None else frozenset(v.tenants),
            )
            for v in policy.versions
        },
        sticky_by=routing.sticky_by,
        pin_header=routing.pin_header,
        pin_claim=routing.pin_claim,
        shadow=(
            None
            if routing.shadow is None
            else Shadow(routing.shadow.version, routing.shadow.percent)
        ),
    )


def _tenancy_plan(policy: Policy) -> TenancyPlan:
    spec = policy.tenancy
    return TenancyPlan(
        tenants=None if spec.tenants is None else frozenset(spec.tenants),
        require_tenant=spec.require_tenant,
        path_template=None if spec.path_template is None else compile_template(spec.path_template),
        headers=tuple(spec.headers),
        body_fields=tuple(tuple(f.split(".")) for f in spec.body_fields),
    )


def compile_policy(
    pf: PolicyFile, res: CompileResources, platform: PlatformFile = NO_PLATFORM
) -> CompiledPolicy:
    policy = pf.policy
    quotas = platform.platform.quotas.apply(policy.quotas)
    found = breaches(policy, quotas, platform.platform.floors)
    if found:
        raise FloorError(found)
    compiled = [compile_rule(r, i) for i, r in enumerate(policy.authorization.rules)]
    # Dry-run rules (all of them when the policy is in dry run) are only ever reported.
    on_trial = [policy.dry_run or src.dry_run for src in policy.authorization.rules]
    trial = [r for r, t in zip(compiled, on_trial, strict=True) if t]
    rules = tuple(r for r, t in zip(compiled, on_trial, strict=True) if not t)
    every = (*rules, *trial)
    key_headers = {
        m.api_key.header for m in policy.authentication if m.api_key and m.api_key.header
    }
    return CompiledPolicy(
        model=policy.model,
        names=frozenset([policy.model, *policy.aliases]),
        file=str(pf.path),
        routing=_version_plan(policy),
        authenticators=_authenticators(policy, pf.path.parent, res),
        rules=rules,
        allow_any_authenticated=policy.authorization.allow_any_authenticated,
        credential_headers=("authorization", *sorted(key_headers)),
        quotas=compile_quotas(policy.model, quotas),
        inspect=compile_input(
            policy.input, pf.path.parent, res.environ, "input" in policy.model_fields_set
        ),
        output=compile_output(policy.output, res.environ),
        typed_rules=any(r.reads_body for r in every),
        rules_read_cost=any(r.reads_cost for r in every),
        tenancy=_tenancy_plan(policy),
        trial_rules=tuple(trial),
        dry_run=policy.dry_run,
        record_requests=policy.audit.max_body_bytes if policy.audit.record_requests else None,
    )


def _dedupe(items: list[Authenticator]) -> tuple[Authenticator, ...]:
    out: list[Authenticator] = []
    for item in items:
        if all(item is not seen for seen in out):
            out.append(item)
    return tuple(out)


def _index_routes(
    files: list[PolicyFile], compiled: list[CompiledPolicy]
) -> tuple[tuple[RouteEntry, ...], list[PolicyError]]:
    """Group routes by (host, prefix); one exclusive owner, or body-selected models only."""
    groups: dict[tuple[str | None, str], list[tuple[PolicyFile, CompiledPolicy, int]]] = {}
    for pf, cp in zip(files, compiled, strict=True):
        for i, route in enumerate(pf.policy.routes):
            groups.setdefault((route.host, route.path_prefix.rstrip("/") or "/"), []).append(
                (pf, cp, i)
            )
    entries: list[RouteEntry] = []
    errors: list[PolicyError] = []
    for (host, prefix), owners in groups.items():
        routes = [pf.policy.routes[i] for pf, _, i in owners]
        body_selected = [r.select_by_body_model for r in routes]
        if len(owners) > 1 and not all(body_selected):
            pf, _, i = owners[1]
            other = owners[0][0].path
            errors.append(
                PolicyError(
                    str(pf.path),
                    f"routes[{i}]",
                    f"path {prefix!r} (host {host or 'any'}) is also owned by {other}; "
                    "shared paths need select_by_body_model: true in every policy",
                )
            )
            continue
        methods_sets = [r.methods for r in routes]
        methods = (
            None
            if any(m is None for m in methods_sets)
            else frozenset(m for ms in methods_sets for m in ms or ())
        )
        if all(body_selected):
            by_model = {name: cp for _, cp, _ in owners for name in cp.names}
            model_methods = {
                name: None if r.methods is None else frozenset(r.methods)
                for (_, cp, _), r in zip(owners, routes, strict=True)
                for name in cp.names
            }
            auths = _dedupe([a for _, cp, _ in owners for a in cp.authenticators])
            entries.append(RouteEntry(prefix, host, methods, None, by_model, model_methods, auths))
        else:
            entries.append(RouteEntry(prefix, host, methods, owners[0][1]))
    # Host-specific before any-host, then longest prefix first.
    entries.sort(key=lambda e: (e.host is None, -len(e.prefix)))
    return tuple(entries), errors


def _name_clashes(compiled: list[CompiledPolicy]) -> list[PolicyError]:
    seen: dict[str, str] = {}
    errors = []
    for cp in compiled:
        for name in sorted(cp.names):
            if name in seen:
                errors.append(
                    PolicyError(
                        cp.file, "model", f"model name {name!r} is also used by {seen[name]}"
                    )
                )
            seen[name] = cp.file
    return errors


def compile_policy_set(
    files: list[PolicyFile], res: CompileResources, platform: PlatformFile = NO_PLATFORM
) -> PolicySet:
    compiled: list[CompiledPolicy] = []
    errors: list[PolicyError] = []
    if platform.path is not None:
        try:  # the defaults' own errors, named in the platform file, once
            defaults = Quotas(rules=list(platform.platform.quotas.defaults))
            compile_quotas("_platform", defaults, field_prefix="quotas.defaults")
        except QuotaCompileError as exc:
            raise PolicyLoadError([PolicyError(str(platform.path), exc.field, str(exc))]) from None
    for pf in files:
        try:
            compiled.append(compile_policy(pf, res, platform))
        except (QuotaCompileError, InspectCompileError, RuleCompileError) as exc:
            errors.append(PolicyError(str(pf.path), exc.field, str(exc)))
        except FloorError as exc:
            errors.extend(PolicyError(str(pf.path), f, m) for f, m in exc.found)
        except ValueError as exc:
            errors.append(PolicyError(str(pf.path), "authentication", str(exc)))
    if errors:
        raise PolicyLoadError(errors)
    errors.extend(_name_clashes(compiled))
    routes, route_errors = _index_routes(files, compiled)
    errors.extend(route_errors)
    if errors:
        raise PolicyLoadError(errors)
    digests = [platform.digest, *(pf.digest for pf in files)]
    revision = hashlib.sha256("".join(digests).encode()).hexdigest()[:16]
    return PolicySet(
        revision=revision, policies=tuple(compiled), routes=routes, loaded_at=time.time()
    )
