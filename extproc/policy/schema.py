"""The owner-facing policy file: one YAML file per model, validated strictly.

Every model forbids unknown fields, so a typo is an error naming the field rather than a rule
silently ignored. This module only describes and validates; `compile.py` builds the runtime form.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, StringConstraints, model_validator

from extproc.inspect.schema import Input, InputType, Output
from extproc.quota.schema import PlatformQuotas, Quotas

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
ClusterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
HeaderName = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9-]{1,64}$", to_lower=True, strip_whitespace=True)
]
NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Algorithm = Literal["RS256", "PS256", "ES256", "EdDSA", "HS256"]
ClaimValue = str | int | bool | list[str | int | bool]

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
    name: Name
    cluster: ClusterName = Field(description="Envoy cluster that serves this version.")
    default: bool = Field(default=False, description="Served when the request names no version.")


class JwtClaimNames(Strict):
    principal: NonEmpty = "sub"
    tenant: NonEmpty | None = "tenant"
    roles: NonEmpty | None = "roles"
    scopes: NonEmpty | None = "scope"


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
    hs256_secret_env: Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]*$")] | None = (
        Field(
            default=None,
            description="Environment variable holding the HS256 secret (at least 32 bytes); "
            "secrets never live in policy files.",
        )
    )
    leeway_seconds: int = Field(default=30, ge=0, le=300)
    jwks_ttl_seconds: int = Field(default=300, ge=10, le=86400)
    claims: JwtClaimNames = JwtClaimNames()

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtMethod:
        sources = [s for s in (self.jwks_file, self.jwks_url, self.hs256_secret_env) if s]
        if len(sources) != 1:
            raise ValueError("give exactly one of jwks_file, jwks_url, hs256_secret_env")
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


class AuthMethod(Strict):
    """One accepted method: exactly one of the keys below."""

    jwt: JwtMethod | None = None
    api_key: ApiKeyMethod | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> AuthMethod:
        if (self.jwt is None) == (self.api_key is None):
            raise ValueError("each authentication entry needs exactly one of: jwt, api_key")
        return self


class Rule(Strict):
    """A requirement. Every rule that applies must pass; within a rule every condition holds."""

    name: NonEmpty
    versions: list[Name] | None = Field(
        default=None, description="Apply only when one of these versions is served."
    )
    principals: list[NonEmpty] | None = None
    tenants: list[NonEmpty] | None = None
    auth_methods: list[Literal["jwt", "api_key"]] | None = None
    roles_any: list[NonEmpty] | None = None
    roles_all: list[NonEmpty] | None = None
    scopes_any: list[NonEmpty] | None = None
    scopes_all: list[NonEmpty] | None = None
    claims: dict[NonEmpty, ClaimValue] | None = Field(
        default=None,
        description="Each claim must equal the value, or be one of the listed values.",
    )
    input_types: list[InputType] | None = Field(
        default=None,
        description="Apply only to requests that carry one of these input types (checked "
        "once the body is read), e.g. only some callers may send images.",
    )

    @model_validator(mode="after")
    def _has_condition(self) -> Rule:
        conditions = (
            self.principals, self.tenants, self.auth_methods, self.roles_any, self.roles_all,
            self.scopes_any, self.scopes_all, self.claims,
        )  # fmt: skip
        if all(c is None for c in conditions):
            raise ValueError(f"rule {self.name!r} has no condition; it would allow everyone")
        if any(c is not None and len(c) == 0 for c in (*conditions, self.input_types)):
            raise ValueError(f"rule {self.name!r} has an empty list, which no caller can satisfy")
        return self


class Authorization(Strict):
    rules: list[Rule] = Field(default_factory=list)
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


class Policy(Strict):
    """One model's policy file."""

    model: Name = Field(description="The model's public name; also names the policy.")
    aliases: list[Name] = Field(default_factory=list, description="Other names clients may use.")
    description: str = ""
    routes: list[Route] = Field(min_length=1)
    versions: list[Version] = Field(min_length=1)
    authentication: list[AuthMethod] = Field(min_length=1)
    authorization: Authorization
    quotas: Quotas = Field(default_factory=Quotas, description="How much callers may use.")
    input: Input = Field(default_factory=Input, description="What the model may receive.")
    output: Output = Field(default_factory=Output, description="What may leave the model.")

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        names = [v.name for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError("version names must be unique")
        defaults = [v.name for v in self.versions if v.default]
        if len(defaults) != 1 and len(self.versions) > 1:
            raise ValueError("exactly one version must have default: true")
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


class PlatformPolicy(Strict):
    """The platform team's file, `_platform.yaml` beside the models' policies: what applies to
    every model unless a model's policy says otherwise."""

    description: str = ""
    quotas: PlatformQuotas = Field(
        default_factory=PlatformQuotas, description="Quota defaults for every model."
    )
