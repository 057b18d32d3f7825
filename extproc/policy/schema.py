"""The owner-facing policy file: one YAML file per model, validated strictly.

Every model forbids unknown fields, so a typo is an error naming the field rather than a rule
silently ignored. This module only describes and validates; `compile.py` builds the runtime form.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, StringConstraints, model_validator

from extproc.inspect.schema import Input, InputType, Output, PiiType
from extproc.quota.schema import Duration, PlatformQuotas, Quotas

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
ClusterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
HeaderName = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9-]{1,64}$", to_lower=True, strip_whitespace=True)
]
NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Algorithm = Literal["RS256", "PS256", "ES256", "EdDSA", "HS256"]
ClaimValue = str | int | bool | list[str | int | bool]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]*$")]

# Headers the gateway owns or Envoy owns: an API key may not be read from them.
_RESERVED_HEADER = re.compile(r"^(x-gateway-|x-envoy-|:)|^(host|content-length|content-type)$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Route(Strict):
    """A request this model owns: path prefix, optionally a host, optionally the body's model."""

    path_prefix: Annotated[str, StringConstraints(pattern=r"^/[A-Za-z0-9._~/-]*$")] = Field(
        description="Path prefix, matched on whole segments after Envoy normalises the path."
    )
    host: (
        Annotated[str, StringConstraints(pattern=r"^[a-z0-9.-]{1,253}$", to_lower=True)] | None
    ) = Field(default=None, description="Exact host (without port); any host when absent.")
    methods: list[Literal["GET", "POST", "PUT", "DELETE", "PATCH"]] | None = Field(
        default=None, description="Allowed HTTP methods; any when absent."
    )
    select_by_body_model: bool = Field(
        default=False,
        description="Several models share this path (OpenAI-compatible APIs): the JSON body's "
        "`model` field names the model, and must be this policy's model or one of its aliases.",
    )


class Version(Strict):
    """One deployed version of the model and the Envoy cluster that serves it."""

    name: Name = Field(
        description="The version's name; read as a semantic version for the ranges credentials "
        "may carry (`v2` is 2.0.0, `1.4` is 1.4.0)."
    )
    cluster: ClusterName = Field(description="Envoy cluster that serves this version.")
    default: bool = Field(
        default=False,
        description="The stable version: served when the request names no version and no "
        "canary weight picks another. Moving `default` to another version is a blue-green switch.",
    )
    weight: int = Field(
        default=0, ge=0, le=100,
        description="Canary: the percentage of callers (sticky, see routing.sticky_by) served "
        "this version when they pin none. The default version serves the rest.",
    )  # fmt: skip
    fallback: Name | None = Field(
        default=None,
        description="When this version's upstream fails (5xx, reset, refused), Envoy retries "
        "the request once on this version's cluster, if the caller may use it.",
    )
    timeout_seconds: float = Field(
        default=120, gt=0, le=3600, description="Upstream timeout Envoy enforces for this version."
    )
    per_try_timeout_seconds: float | None = Field(
        default=None, gt=0, le=3600,
        description="Each attempt's timeout; with a fallback, a hung upstream falls back after "
        "this long (without it, only a failure answer or a refused connection does).",
    )  # fmt: skip
    retries: int = Field(
        default=0, ge=0, le=5,
        description="Extra attempts Envoy makes on this version's cluster on 5xx, reset or "
        "refused connections.",
    )  # fmt: skip
    tenants: list[NonEmpty] | None = Field(
        default=None,
        description="A dedicated version: served only to callers of these tenants; to anyone "
        "else it does not exist.",
    )


class Shadow(Strict):
    """Copies of requests sent to a candidate version; its answers are discarded by Envoy."""

    version: Name = Field(description="The version that receives the copies.")
    percent: float = Field(
        default=100, gt=0, le=100,
        description="Share of requests copied, in percent (only for callers who could be "
        "served that version).",
    )  # fmt: skip


class Routing(Strict):
    """How a request finds its version."""

    sticky_by: Literal["principal", "tenant"] = Field(
        default="principal",
        description="Canary assignment key: the same caller (or tenant) keeps its version while "
        "the weights stay.",
    )
    pin_header: HeaderName | None = Field(
        default="x-model-version",
        description="Request header that pins a version; null turns header pinning off. A "
        "pinned version must still pass every rule and the credential's version range.",
    )
    pin_claim: NonEmpty | None = Field(
        default=None,
        description="Token claim (or API key metadata field) that pins a version; it wins over "
        "the header.",
    )
    shadow: Shadow | None = Field(
        default=None, description="Mirror requests to a candidate version (Envoy mirroring)."
    )


class Tenancy(Strict):
    """Which tenants may reach this model, and where requests name a tenant."""

    tenants: list[NonEmpty] | None = Field(
        default=None,
        description="Only callers of these tenants may reach the model; to anyone else it "
        "does not exist (404). Any tenant (or none) when absent.",
    )
    require_tenant: bool = Field(
        default=False, description="Refuse callers whose credential names no tenant."
    )
    path_template: (
        Annotated[str, StringConstraints(pattern=r"^/[A-Za-z0-9._~/{}*-]*$", max_length=256)] | None
    ) = Field(
        default=None,
        description="Where the path names a tenant, e.g. `/v1/tenants/{tenant}/`: `{tenant}` "
        "marks the segment, `*` matches any one segment. A path matching the template must "
        "name the caller's own tenant.",
    )
    headers: list[HeaderName] = Field(
        default_factory=list,
        description="Request headers that name a tenant; when present they must name the "
        "caller's own.",
    )
    body_fields: list[
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){0,7}$")]
    ] = Field(
        default_factory=list,
        description="JSON body fields (dotted paths) that name a tenant; when present they must "
        "name the caller's own. The body is then read for every request.",
    )

    @model_validator(mode="after")
    def _one_placeholder(self) -> Tenancy:
        if self.path_template is not None and self.path_template.count("{tenant}") != 1:
            raise ValueError("path_template must contain {tenant} exactly once")
        return self


class JwtClaimNames(Strict):
    """Which claims carry the caller's identity. null turns one off: callers then have no
    tenant (roles, scopes), and a rule requiring one never passes for this method."""

    principal: NonEmpty = Field(
        default="sub", description="Claim naming the caller; a token without it is refused."
    )
    tenant: NonEmpty | None = Field(
        default="tenant", description="Claim naming the caller's tenant (a non-empty string)."
    )
    roles: NonEmpty | None = Field(
        default="roles", description="Claim listing roles: a list, or a space-separated string."
    )
    scopes: NonEmpty | None = Field(
        default="scope",
        description="Claim listing scopes: a list, or a space-separated string (OAuth2 `scope`).",
    )


class JwtMethod(Strict):
    """JWT bearer tokens from one issuer. Exactly one key source."""

    issuer: NonEmpty = Field(description="Matched exactly against the token's `iss`.")
    audiences: list[NonEmpty] = Field(min_length=1, description="The token's `aud` must name one.")
    algorithms: list[Algorithm] = Field(
        min_length=1, description="Accepted algorithms; the token's `alg` never widens this."
    )
    jwks_file: NonEmpty | None = Field(
        default=None, description="Static JWKS file, relative to the policy file's directory."
    )
    jwks_url: HttpUrl | None = Field(default=None, description="JWKS URL, fetched and cached.")
    oidc_discovery: bool = Field(
        default=False,
        description="Find the JWKS through the issuer's OpenID Connect discovery document "
        "(`<issuer>/.well-known/openid-configuration`), whose `issuer` must match exactly.",
    )
    hs256_secret_env: EnvName | None = Field(
        default=None,
        description="Environment variable holding the HS256 secret (at least 32 bytes); "
        "secrets never live in policy files.",
    )
    leeway_seconds: int = Field(
        default=30, ge=0, le=300,
        description="Clock skew tolerated when checking `exp`, `nbf` and `iat`.",
    )  # fmt: skip
    jwks_ttl_seconds: int = Field(
        default=300, ge=10, le=86400,
        description="How long fetched keys (jwks_url, oidc_discovery) are used before they "
        "are fetched again.",
    )  # fmt: skip
    claims: JwtClaimNames = Field(
        default=JwtClaimNames(),
        description="Which token claims carry principal, tenant, roles and scopes.",
    )

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtMethod:
        sources = [
            s
            for s in (self.jwks_file, self.jwks_url, self.hs256_secret_env, self.oidc_discovery)
            if s
        ]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of jwks_file, jwks_url, hs256_secret_env, oidc_discovery"
            )
        hmac_only = set(self.algorithms) == {"HS256"}
        if self.hs256_secret_env and not hmac_only:
            raise ValueError("hs256_secret_env can only be used with algorithms: [HS256]")
        if not self.hs256_secret_env and "HS256" in self.algorithms:
            raise ValueError("HS256 needs hs256_secret_env; it is never verified with a JWKS")
        return self


class ApiKeyMethod(Strict):
    """API keys from the server's key store, in `Authorization: Bearer` or in `header`."""

    header: HeaderName | None = Field(
        default=None, description="Also accept the key in this header (never in the query)."
    )

    @model_validator(mode="after")
    def _not_reserved(self) -> ApiKeyMethod:
        if self.header and _RESERVED_HEADER.search(self.header):
            raise ValueError(f"header {self.header!r} is reserved and cannot carry an API key")
        return self


class IntrospectionMethod(Strict):
    """Opaque bearer tokens, checked with an OAuth2 introspection endpoint (RFC 7662)."""

    endpoint: HttpUrl = Field(
        description="The introspection endpoint (https, or http on loopback)."
    )
    client_id: NonEmpty = Field(description="The gateway's OAuth2 client id at the endpoint.")
    client_secret_env: EnvName = Field(
        description="Environment variable holding the client secret (HTTP Basic)."
    )
    issuer: NonEmpty | None = Field(default=None, description="Required `iss`, when given.")
    audiences: list[NonEmpty] = Field(
        default_factory=list, description="When given, `aud` must name one of them."
    )
    timeout_seconds: float = Field(
        default=1.0, gt=0, le=5, description="Per call; an endpoint that does not answer is 503."
    )
    cache_seconds: int = Field(
        default=60, ge=0, le=3600,
        description="Active answers are cached this long at most, and never past the token's "
        "`exp`; 0 asks the endpoint every time (revocation takes effect at once).",
    )  # fmt: skip
    claims: JwtClaimNames = Field(
        default=JwtClaimNames(),
        description="Which fields of the introspection answer carry principal, tenant, roles "
        "and scopes.",
    )


class MtlsMethod(Strict):
    """The client certificate Envoy verified on the connection (never a header)."""

    trust_domains: list[NonEmpty] = Field(
        default_factory=list,
        description="SPIFFE trust domains accepted: the certificate's one URI SAN "
        "(spiffe://domain/path) becomes the principal.",
    )
    subjects: list[NonEmpty] = Field(
        default_factory=list, description="Exact subjects (RFC 2253, as Envoy reports them)."
    )
    tenant_from_path_segment: NonEmpty | None = Field(
        default=None,
        description="The SPIFFE path segment after this one names the tenant, e.g. `tenant` "
        "for spiffe://corp/tenant/acme/svc/x.",
    )

    @model_validator(mode="after")
    def _something_accepted(self) -> MtlsMethod:
        if not self.trust_domains and not self.subjects:
            raise ValueError("give trust_domains or subjects: whose certificates are accepted")
        return self


class AuthMethod(Strict):
    """One accepted method: exactly one of the keys below."""

    jwt: JwtMethod | None = Field(default=None, description="JWT bearer tokens from one issuer.")
    api_key: ApiKeyMethod | None = Field(
        default=None,
        description="API keys from the server's key store; they carry a principal, a tenant, "
        "roles and metadata (as claims), but no scopes.",
    )
    introspection: IntrospectionMethod | None = Field(
        default=None, description="Opaque bearer tokens, checked with an introspection endpoint."
    )
    mtls: MtlsMethod | None = Field(
        default=None,
        description="Client certificates Envoy verified; they carry a principal and optionally "
        "a tenant, but no roles or scopes.",
    )

    def kind(self) -> str:
        """The method's name, as rules (`auth_methods`) and floors write it."""
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @model_validator(mode="after")
    def _exactly_one(self) -> AuthMethod:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "each authentication entry needs exactly one of: jwt, api_key, introspection, mtls"
            )
        return self


class Rule(Strict):
    """A requirement. Every rule that applies must pass; within a rule every condition holds."""

    name: NonEmpty = Field(
        description="Unique within the policy; names the rule in audit records when it denies."
    )
    versions: list[Name] | None = Field(
        default=None, description="Apply only when one of these versions is served."
    )
    principals: list[NonEmpty] | None = Field(
        default=None,
        description="The caller's principal must be one of these. Matched exactly: `*` is not "
        "a wildcard.",
    )
    tenants: list[NonEmpty] | None = Field(
        default=None,
        description="The caller's tenant must be one of these (exactly); callers without a "
        "tenant fail.",
    )
    auth_methods: list[Literal["jwt", "api_key", "introspection", "mtls"]] | None = Field(
        default=None, description="The caller must have authenticated with one of these methods."
    )
    roles_any: list[NonEmpty] | None = Field(
        default=None, description="The caller must hold at least one of these roles."
    )
    roles_all: list[NonEmpty] | None = Field(
        default=None, description="The caller must hold every one of these roles."
    )
    scopes_any: list[NonEmpty] | None = Field(
        default=None, description="The caller's token must carry at least one of these scopes."
    )
    scopes_all: list[NonEmpty] | None = Field(
        default=None, description="The caller's token must carry every one of these scopes."
    )
    claims: dict[NonEmpty, ClaimValue] | None = Field(
        default=None,
        description="Each claim must equal the value, or be one of the listed values.",
    )
    input_types: list[InputType] | None = Field(
        default=None,
        description="Apply only to requests that carry one of these input types (checked "
        "once the body is read), e.g. only some callers may send images.",
    )
    when: Annotated[str, StringConstraints(min_length=1, max_length=1000)] | None = Field(
        default=None,
        description="A CEL condition over identity, request, now, region and load that must "
        'also hold, e.g. `now.getHours("Europe/Paris") < 20`.',
    )
    dry_run: bool = Field(
        default=False,
        description="Record in the audit log and metrics when this rule would deny, without "
        "denying: try a new rule on live traffic before enforcing it.",
    )

    @model_validator(mode="after")
    def _has_condition(self) -> Rule:
        conditions = (
            self.principals, self.tenants, self.auth_methods, self.roles_any, self.roles_all,
            self.scopes_any, self.scopes_all, self.claims, self.when,
        )  # fmt: skip
        if all(c is None for c in conditions):
            raise ValueError(f"rule {self.name!r} has no condition; it would allow everyone")
        if any(
            c is not None and not isinstance(c, str) and len(c) == 0
            for c in (*conditions, self.input_types)
        ):
            raise ValueError(f"rule {self.name!r} has an empty list, which no caller can satisfy")
        return self


class Authorization(Strict):
    """Who may use the model. Every rule that applies must pass: rules add up (AND), they are
    not tried in turn until one matches."""

    rules: list[Rule] = Field(
        default_factory=list,
        description="Requirements: a request is allowed only when every rule that applies to "
        "its version (and input types) passes.",
    )
    allow_any_authenticated: bool = Field(
        default=False,
        description="Must be set explicitly for a model with no rules: no rules never means "
        "open by accident.",
    )

    @model_validator(mode="after")
    def _explicit(self) -> Authorization:
        if not self.rules and not self.allow_any_authenticated:
            raise ValueError("give at least one rule, or set allow_any_authenticated: true")
        if self.rules and self.allow_any_authenticated:
            raise ValueError("allow_any_authenticated cannot be combined with rules")
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        return self


class AuditSettings(Strict):
    """What this model's audit records carry beyond the decision itself."""

    record_requests: bool = Field(
        default=False,
        description="Also record each request (method, path, headers without credentials, and "
        "the JSON body with PII and secrets masked), so `extproc policy diff` can replay it "
        "against another policy version. Off by default: bodies stay out of the audit log.",
    )
    max_body_bytes: int = Field(
        default=16384,
        ge=0,
        le=1024 * 1024,
        description="A longer recorded body is left out (marked as such), not cut mid-JSON.",
    )


class Policy(Strict):
    """One model's policy file."""

    model: Name = Field(description="The model's public name; also names the policy.")
    aliases: list[Name] = Field(default_factory=list, description="Other names clients may use.")
    description: str = Field(default="", description="Free text for people reading the file.")
    routes: list[Route] = Field(min_length=1, description="The requests this model owns.")
    versions: list[Version] = Field(
        min_length=1,
        description="The deployed versions; with more than one, exactly one is the default.",
    )
    authentication: list[AuthMethod] = Field(
        min_length=1,
        description="Accepted credentials, one method per entry; the first method that "
        "succeeds wins.",
    )
    authorization: Authorization = Field(
        description="Who may use the model; required, so access is always stated."
    )
    quotas: Quotas = Field(default_factory=Quotas, description="How much callers may use.")
    input: Input = Field(default_factory=Input, description="What the model may receive.")
    output: Output = Field(default_factory=Output, description="What may leave the model.")
    routing: Routing = Field(default_factory=Routing, description="How versions are chosen.")
    tenancy: Tenancy = Field(default_factory=Tenancy, description="Who owns the model's data.")
    audit: AuditSettings = Field(
        default_factory=AuditSettings, description="What the audit records keep."
    )
    dry_run: bool = Field(
        default=False,
        description="Record what this policy would deny (authorization, input inspection, "
        "quotas) without denying. Authentication and routing are still enforced: an "
        "unidentified caller is never let through.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        names = [v.name for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError("version names must be unique")
        defaults = [v.name for v in self.versions if v.default]
        if len(defaults) != 1 and len(self.versions) > 1:
            raise ValueError("exactly one version must have default: true")
        stable = self.default_version()
        if stable.weight:
            raise ValueError(f"the default version {stable.name!r} takes the remaining share; "
                             "give weight only to canary versions")  # fmt: skip
        if sum(v.weight for v in self.versions) > 100:
            raise ValueError("canary weights add up to more than 100")
        for v in self.versions:
            if v.fallback is not None and (v.fallback not in names or v.fallback == v.name):
                raise ValueError(f"version {v.name!r}: fallback must name another version")
            if v.weight and v.tenants is not None:
                raise ValueError(f"version {v.name!r}: a dedicated version cannot be a canary")
        if stable.tenants is not None:
            raise ValueError("the default version must serve every tenant")
        shadow = self.routing.shadow
        if shadow is not None and shadow.version not in names:
            raise ValueError(f"routing.shadow names unknown version {shadow.version!r}")
        for rule in self.authorization.rules:
            unknown = set(rule.versions or ()) - set(names)
            if unknown:
                raise ValueError(f"rule {rule.name!r} names unknown versions {sorted(unknown)}")
        for quota in self.quotas.rules:
            unknown = set(quota.versions or ()) - set(names)
            if unknown:
                raise ValueError(f"quota {quota.name!r} names unknown versions {sorted(unknown)}")
        if self.model in self.aliases:
            raise ValueError("aliases must differ from model")
        return self

    def default_version(self) -> Version:
        return next((v for v in self.versions if v.default), self.versions[0])


AuthMethodName = Literal["jwt", "api_key", "introspection", "mtls"]


class QuotaCeiling(Strict):
    """The most a model may grant per caller: every rule of this kind stays at or below this
    rate, and every model has at least one such rule (its own or a platform default)."""

    kind: Literal["requests", "concurrency", "cost"] = Field(
        description="The kind of quota rule this ceiling caps."
    )
    limit: int = Field(
        ge=1, description="Units per window (requests, cost) or requests in flight (concurrency)."
    )
    window: Duration | None = Field(default=None, description="Not for concurrency.")

    @model_validator(mode="after")
    def _window(self) -> QuotaCeiling:
        if (self.window is None) != (self.kind == "concurrency"):
            raise ValueError("give a window for requests and cost ceilings, and only for them")
        return self


class Floors(Strict):
    """What no model's policy may weaken. A policy that does is refused at load, with an error
    naming the floor."""

    authentication_methods: list[AuthMethodName] | None = Field(
        default=None, description="The only methods a model may accept."
    )
    require_tenant: bool = Field(
        default=False, description="Every model must refuse callers without a tenant."
    )
    max_body_bytes: int | None = Field(
        default=None, ge=1, description="No model may take larger request bodies."
    )
    injection: Literal["block", "flag", "log"] | None = Field(
        default=None,
        description="Every model inspects prompts for injection, acting at least this firmly "
        "(block > flag > log).",
    )
    max_injection_threshold: float | None = Field(
        default=None, gt=0.0, le=1.0, description="No model may set a higher (laxer) threshold."
    )
    pii_block: list[PiiType] = Field(
        default_factory=list, description="Types every model must refuse in requests."
    )
    pii_mask: list[PiiType] = Field(
        default_factory=list,
        description="Types every model must mask (or refuse) in requests.",
    )
    output_redact: list[PiiType] = Field(
        default_factory=list,
        description="Types every model must mask (or withhold) in answers.",
    )
    sanitize_errors: bool = Field(
        default=False, description="No model may turn upstream error sanitising off."
    )
    fail_closed: bool = Field(
        default=False,
        description="No model may count quotas locally when the shared store fails "
        "(quotas.on_store_failure: local).",
    )
    max_quotas: list[QuotaCeiling] = Field(
        default_factory=list, description="Ceilings on every model's quota rules, per kind."
    )
    forbid_dry_run: bool = Field(
        default=False,
        description="No model may run its policy or a rule in dry-run mode (which lets "
        "through what it would deny).",
    )


class PlatformPolicy(Strict):
    """The platform team's file, `_platform.yaml` beside the models' policies: what applies to
    every model unless a model's policy says otherwise, and the floors no policy may weaken."""

    description: str = Field(default="", description="Free text for people reading the file.")
    quotas: PlatformQuotas = Field(
        default_factory=PlatformQuotas, description="Quota defaults for every model."
    )
    floors: Floors = Field(default_factory=Floors, description="What no model may weaken.")
