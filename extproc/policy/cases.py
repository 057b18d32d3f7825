"""Request files for the policy tools (`extproc policy test`, `explain`, `diff`).

A request is written as the decision core sees it, and as an audit record's `recorded_request`
keeps it, so a recorded request can be pasted into a fixture file as it is:

    method: POST                       # default POST
    path: /v2/models/iris/infer        # a query string after `?` is split off
    host: gateway.test                 # default gateway.test (routes without a host match any)
    headers: {x-model-version: v2}     # names are lower-cased; ${NAME} is read from the
                                       #   environment (a token your CI holds as a secret)
    body: {inputs: [...]}              # any JSON value, sent as JSON (Content-Type and
                                       #   Content-Length are set unless given), or
    body_text: "raw text"              #   a raw body, sent as it is
    source_address: 10.1.2.3
    transport: ext_proc                # or ext_authz, which cannot rewrite a body
    identity:                          # decide for this caller without credentials, or leave
      principal: alice                 #   it out and put real credentials in `headers`
      tenant: demo
      method: jwt                      # default jwt; must be a method the policy accepts
      roles: [classify]
      scopes: []
      claims: {tier: pro}              # what rules on claims, credential constraints and the
                                       #   quota class (class_claim) read

A fixture file (`policy test`) is a mapping with `cases:`, a list of such requests, each with
an optional `name`, an optional `repeat: N` and an `expect:` mapping (see Expectation). YAML
anchors (`identity: &alice {...}`, later `identity: *alice`) share blocks between cases; other
top-level keys starting with `x-` are ignored, a place to define them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from extproc.authn.base import AuthMethod, Identity
from extproc.pipeline.context import RequestContext
from extproc.pipeline.snapshot import UNRECORDED_HEADERS
from extproc.policy.load import PolicyError, PolicyLoadError, _pydantic_errors, _read_document

DEFAULT_HOST = "gateway.test"
# Headers that carry credentials: with an `identity:` they would not be checked, so a case
# giving both is refused rather than passing for a reason its author did not intend.
CREDENTIAL_HEADERS = UNRECORDED_HEADERS - {"cookie"}
M = TypeVar("M", bound=BaseModel)
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Phase = Literal["route", "authenticate", "authorize", "inspect", "admit", "internal"]
Method = Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{1,16}$", to_upper=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentitySpec(_Strict):
    """The caller, as authentication would have yielded it."""

    principal: Annotated[str, StringConstraints(min_length=1)]
    tenant: str | None = None
    method: AuthMethod = "jwt"
    roles: list[str] = Field(default_factory=list)
    scopes: list[str] = Field(default_factory=list)
    claims: dict[str, JsonValue] = Field(default_factory=dict)

    def identity(self) -> Identity:
        return Identity(
            principal=self.principal,
            method=self.method,
            tenant=self.tenant,
            roles=frozenset(self.roles),
            scopes=frozenset(self.scopes),
            claims=dict(self.claims),
        )


class RequestSpec(_Strict):
    """One request: what `explain` reads, what every case and recorded request holds."""

    name: str = ""
    method: Method = "POST"
    path: Annotated[str, StringConstraints(pattern=r"^/")]
    host: Annotated[str, StringConstraints(min_length=1, to_lower=True)] = DEFAULT_HOST
    headers: dict[str, str] = Field(default_factory=dict)
    body: JsonValue = None
    body_text: str | None = None
    source_address: str = ""
    transport: Literal["ext_proc", "ext_authz"] = "ext_proc"
    identity: IdentitySpec | None = None

    @field_validator("headers", mode="before")
    @classmethod
    def _header_names(cls, value: object) -> object:
        # YAML reads `content-length: 70000` as a number; a header is text either way.
        if not isinstance(value, Mapping):
            return value
        return {
            str(k).lower(): str(v) if isinstance(v, int | float) and not isinstance(v, bool)
            else v
            for k, v in value.items()
        }  # fmt: skip

    @model_validator(mode="after")
    def _one_body_one_caller(self) -> RequestSpec:
        if self.body is not None and self.body_text is not None:
            raise ValueError("give `body` (JSON) or `body_text` (raw), not both")
        credentials = sorted(CREDENTIAL_HEADERS & self.headers.keys())
        if self.identity is not None and credentials:
            raise ValueError(
                f"give `identity` or credentials in headers ({', '.join(credentials)}), not "
                "both: with an identity the credentials would not be checked"
            )
        return self

    def raw_body(self) -> bytes | None:
        if self.body_text is not None:
            return self.body_text.encode()
        if self.body is None:
            return None
        return orjson.dumps(self.body)

    def context(self, decision_id: str | None = None) -> RequestContext:
        """The request as an Envoy adapter would hand it to the core."""
        body = self.raw_body()
        headers = dict(self.headers)
        if body is not None:
            # Envoy passes the client's Content-Length; the core sizes bodies by it first.
            headers.setdefault("content-length", str(len(body)))
            if self.body is not None:
                headers.setdefault("content-type", "application/json")
        path, query = RequestContext.split_path(self.path)
        ctx = RequestContext(
            method=self.method, path=path, query=query, host=self.host, headers=headers,
            source_address=self.source_address, body=body,
            rewrites_body=self.transport == "ext_proc",
        )  # fmt: skip
        if decision_id:
            ctx.decision_id = decision_id  # a replay keeps the shadow choice it had
        if self.identity is not None:
            ctx.given_identity = self.identity.identity()
        return ctx

    def label(self) -> str:
        return self.name or f"{self.method} {self.path}"


class Expectation(_Strict):
    """What a case expects; only the fields given are checked."""

    outcome: Literal["allow", "deny", "error"] | None = None  # error: a fault (503, internal)
    status: Annotated[int, Field(ge=100, le=599)] | None = None
    code: str | None = None  # the error code the client sees, e.g. forbidden
    phase: Phase | None = None  # the phase that denied
    reason: str | None = None  # a substring of the denial's audit reason
    version: str | None = None
    cluster: str | None = None  # the Envoy cluster the request is routed to
    redactions: dict[str, int] | None = None  # masked in the request, by type ({} for none)
    flags: list[str] | None = None  # x-gateway-flags, e.g. prompt-injection
    dry_run: list[Phase] | None = None  # the phases dry run would deny, in order

    @model_validator(mode="after")
    def _consistent(self) -> Expectation:
        given = self.model_dump(exclude_none=True)
        if not given:
            raise ValueError("expects nothing: give at least one of " + ", ".join(FIELDS))
        denial = [f for f in ("status", "code", "phase", "reason") if f in given]
        routing = [f for f in ("version", "cluster", "flags") if f in given]
        if self.outcome == "allow" and denial:
            raise ValueError(f"{', '.join(denial)}: only a denial has these; outcome is allow")
        if self.outcome in ("deny", "error") and routing:
            raise ValueError(
                f"{', '.join(routing)}: only an allow has these; outcome is {self.outcome}"
            )
        return self


FIELDS = tuple(Expectation.model_fields)


class Case(RequestSpec):
    repeat: Annotated[int, Field(ge=1, le=10000)] = 1  # the expectation applies to the last
    expect: Expectation


class CaseFile(_Strict):
    cases: Annotated[list[Case], Field(min_length=1)]

    @model_validator(mode="before")
    @classmethod
    def _extensions(cls, data: object) -> object:
        # As in Compose files: `x-` keys hold YAML anchors the cases share, and are not read.
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if not str(k).startswith("x-")}
        return data


def _expand(
    file: str, where: str, headers: Mapping[str, str], environ: Mapping[str, str]
) -> tuple[dict[str, str], list[PolicyError]]:
    """${NAME} in header values, from the environment: credentials stay out of the file."""
    errors: list[PolicyError] = []

    def expanded(header: str, value: str) -> str:
        def variable(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                message = f"environment variable {name} is not set"
                errors.append(PolicyError(file, f"{where}.{header}", message))
                return ""
            return environ[name]

        return _ENV_REF.sub(variable, value)

    return {k: expanded(k, v) for k, v in headers.items()}, errors


def load_cases(path: Path, environ: Mapping[str, str]) -> list[Case]:
    """A fixture file's cases. Raises PolicyLoadError naming the file, case and field."""
    raw = _validated(path, CaseFile)
    cases, errors = [], []
    for index, case in enumerate(raw.cases):
        headers, problems = _expand(str(path), f"cases[{index}].headers", case.headers, environ)
        errors += problems
        cases.append(case.model_copy(update={"headers": headers}))
    if errors:
        raise PolicyLoadError(errors)
    return cases


def load_request(path: Path, environ: Mapping[str, str]) -> RequestSpec:
    """A request file (`policy explain`): one request, as a case without `expect`."""
    spec = _validated(path, RequestSpec)
    headers, errors = _expand(str(path), "headers", spec.headers, environ)
    if errors:
        raise PolicyLoadError(errors)
    return spec.model_copy(update={"headers": headers})


def recorded_spec(recorded: Mapping[str, Any], transport: object) -> RequestSpec:
    """An audit record's `recorded_request` as a request to replay. Raises ValueError (a
    body the record left out, a request the format does not take)."""
    omitted = recorded.get("body_omitted")
    if omitted:
        raise ValueError(f"body not recorded ({omitted})")
    fields = {k: v for k, v in recorded.items() if k != "body_omitted"}
    if transport in ("ext_proc", "ext_authz"):
        fields["transport"] = transport
    try:
        return RequestSpec.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"recorded_request not replayable: {where}: {first['msg']}") from None


def _validated(path: Path, schema: type[M]) -> M:
    _, data = _read_document(path)  # strict YAML (duplicate keys), bounded, a mapping
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise PolicyLoadError(_pydantic_errors(str(path), exc)) from None
