"""Tenancy, version choice (pin, sticky canary, fallback, shadow) and credential constraints,
through the decision core with real policy files, JWTs and API keys."""

from __future__ import annotations

import contextlib
import json
import textwrap
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from extproc.authn.apikey import ApiKeyStore, create_key
from extproc.authz.constraints import ConstraintError, parse_range, version_of
from extproc.demo.issuer import DemoIssuer, ensure_demo_issuer
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny
from extproc.pipeline.run import DecisionCore
from extproc.policy.load import PolicyLoadError
from extproc.policy.store import PolicyStore

JWT = """  - jwt: {issuer: "https://issuer.demo.local", audiences: [models], algorithms: [ES256],
          jwks_file: demo/jwks.json, leeway_seconds: 0}"""
SHARED = f"""
model: shared
routes: [{{path_prefix: /v1/tenants}}]
versions:
  - {{name: v1, cluster: shared-v1, default: true}}
  - {{name: v2, cluster: shared-v2, weight: 25, fallback: v1}}
  - {{name: v3, cluster: shared-v3-acme, tenants: [acme]}}
routing: {{pin_claim: pin}}
tenancy:
  path_template: /v1/tenants/{{tenant}}/
  headers: [x-tenant-id]
  body_fields: [metadata.tenant]
authentication:
{JWT}
  - api_key: {{}}
authorization:
  rules:
    - {{name: beta-only, versions: [v2], roles_any: [beta]}}
"""
OWNED = f"""
model: acme-only
routes: [{{path_prefix: /v1/acme}}]
versions: [{{name: v1, cluster: acme-v1}}]
tenancy: {{tenants: [acme], require_tenant: true}}
authentication:
{JWT}
authorization: {{allow_any_authenticated: true}}
"""
SHADOWED = f"""
model: shadowed
routes: [{{path_prefix: /v1/shadowed}}]
versions:
  - {{name: v1, cluster: sh-v1, default: true}}
  - {{name: v2, cluster: sh-v2, tenants: [acme]}}
routing: {{shadow: {{version: v2}}}}
authentication:
{JWT}
authorization: {{allow_any_authenticated: true}}
"""


class Env:
    def __init__(self, root: Path, files: Mapping[str, str]) -> None:
        self.root = root
        self.issuer: DemoIssuer = ensure_demo_issuer(root / "demo")
        self.keys_file = root / "keys.json"
        self.key, _ = create_key(
            self.keys_file, "kim", tenant="acme", roles=["beta"],
            metadata={"models": ["other"]},
        )  # fmt: skip
        for name, text in files.items():
            (root / name).write_text(textwrap.dedent(text))
        self.store = PolicyStore(root, ApiKeyStore.load(self.keys_file), {})
        self.core = DecisionCore(self.store)

    def bearer(self, **claims: Any) -> dict[str, str]:
        base: dict[str, Any] = {"sub": "bob", "tenant": "acme", "roles": []}
        base.update(claims)
        return {"authorization": f"Bearer {self.issuer.mint(base)}"}

    async def decide(
        self,
        path: str,
        headers: Mapping[str, str],
        payload: object = None,
        source: str = "10.1.2.3",
    ) -> Allow | Deny:
        c = RequestContext(
            method="POST", path=path, host="gw.local", headers=dict(headers),
            source_address=source,
        )  # fmt: skip
        c.body = None if payload is None else json.dumps(payload).encode()
        return await self.core.decide(c)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path, {"shared.yaml": SHARED, "owned.yaml": OWNED, "shadow.yaml": SHADOWED})


def allowed(d: Allow | Deny) -> Allow:
    assert isinstance(d, Allow), d
    return d


def denied(d: Allow | Deny, status: int) -> Deny:
    assert isinstance(d, Deny), d
    assert d.status == status, d
    return d


# --- tenancy --------------------------------------------------------------------------------


async def test_a_model_owned_by_another_tenant_does_not_exist(env: Env) -> None:
    assert allowed(await env.decide("/v1/acme/chat", env.bearer())).cluster == "acme-v1"
    other = denied(await env.decide("/v1/acme/chat", env.bearer(tenant="globex")), 404)
    nothing = denied(await env.decide("/v1/nothing", env.bearer(tenant="globex")), 404)
    assert (other.code, other.message) == (nothing.code, nothing.message)
    denied(await env.decide("/v1/acme/chat", env.bearer(tenant=None)), 404)


async def test_paths_headers_and_bodies_must_name_the_callers_tenant(env: Env) -> None:
    own = "/v1/tenants/acme/files"
    allowed(await env.decide(own, env.bearer(), {"metadata": {"tenant": "acme"}}))
    allowed(await env.decide(own, {**env.bearer(), "x-tenant-id": "acme"}))
    for path, extra, payload in (
        ("/v1/tenants/globex/files", {}, None),
        ("/v1/tenants/globex", {}, None),
        (own, {"x-tenant-id": "globex"}, None),
        (own, {"x-tenant-id": ""}, None),
        (own, {}, {"metadata": {"tenant": "globex"}}),
        (own, {}, {"metadata": {"tenant": ["acme"]}}),
        (own, {}, {"metadata": {"tenant": None}}),
    ):
        d = denied(await env.decide(path, {**env.bearer(), **extra}, payload), 403)
        assert d.reason.startswith("tenancy:"), d
    # A caller without a tenant may name none.
    denied(await env.decide(own, env.bearer(tenant=None)), 403)
    allowed(await env.decide("/v1/tenants", env.bearer(tenant=None)))


# --- versions -------------------------------------------------------------------------------


async def test_a_dedicated_version_is_indistinguishable_from_a_missing_one(env: Env) -> None:
    pin_v3 = {"x-model-version": "v3"}
    assert allowed(await env.decide("/v1/tenants", {**env.bearer(), **pin_v3})).version == "v3"
    theirs = denied(await env.decide("/v1/tenants", {**env.bearer(tenant="globex"), **pin_v3}), 400)
    missing = denied(
        await env.decide("/v1/tenants", {**env.bearer(tenant="globex"), "x-model-version": "v9"}),
        400,
    )
    assert (theirs.code, theirs.message, theirs.reason) == (
        missing.code, missing.message, missing.reason,
    )  # fmt: skip


async def test_canary_split_is_sticky_and_skips_callers_the_rules_refuse(env: Env) -> None:
    served: Counter[str] = Counter()
    first: dict[str, str] = {}
    for i in range(400):
        d = allowed(await env.decide("/v1/tenants", env.bearer(sub=f"user-{i}", roles=["beta"])))
        served[d.version] += 1
        first[f"user-{i}"] = d.version
    # 25 % of 400: sd = sqrt(400 * .25 * .75) = 8.7; 5 sd either way.
    assert 100 - 44 <= served["v2"] <= 100 + 44 and served["v2"] + served["v1"] == 400
    for i in range(0, 400, 7):  # the same caller keeps its version
        d = allowed(await env.decide("/v1/tenants", env.bearer(sub=f"user-{i}", roles=["beta"])))
        assert d.version == first[f"user-{i}"]
    # Callers the rules keep off v2 are served v1 instead of refused...
    canary_users = [u for u, v in first.items() if v == "v2"]
    d = allowed(await env.decide("/v1/tenants", env.bearer(sub=canary_users[0])))
    assert d.version == "v1"
    # ...but pinning v2 without the role is refused: pinning never widens access.
    pin = {"x-model-version": "v2"}
    denied(await env.decide("/v1/tenants", {**env.bearer(sub=canary_users[0]), **pin}), 403)


async def test_canary_gets_its_fallback_and_the_claim_pin_wins(env: Env) -> None:
    beta = env.bearer(roles=["beta"], pin="v2")
    d = allowed(await env.decide("/v1/tenants", {**beta, "x-model-version": "v1"}))
    assert (d.version, d.cluster, d.fallback_cluster) == ("v2", "shared-v2", "shared-v1")
    d = allowed(await env.decide("/v1/tenants", env.bearer(pin="v1")))
    assert (d.version, d.fallback_cluster) == ("v1", None)


async def test_shadow_copies_only_for_callers_who_could_be_served_it(env: Env) -> None:
    d = allowed(await env.decide("/v1/shadowed", env.bearer()))
    assert (d.cluster, d.mirror_cluster) == ("sh-v1", "sh-v2")
    d = allowed(await env.decide("/v1/shadowed", env.bearer(tenant="globex")))
    assert (d.cluster, d.mirror_cluster) == ("sh-v1", None)


async def test_body_model_must_agree_with_the_path(env: Env) -> None:
    d = denied(await env.decide("/v1/tenants", env.bearer(), {"model": "acme-only"}), 400)
    assert d.code == "model_mismatch"
    allowed(await env.decide("/v1/tenants", env.bearer(), {"model": "shared"}))


# --- constraints the credential carries -----------------------------------------------------


async def test_credential_constraints_narrow_access(env: Env) -> None:
    path = "/v1/tenants"
    cases: list[tuple[dict[str, Any], dict[str, str], str, int | None]] = [
        ({"models": ["shared"]}, {}, "10.1.2.3", None),
        ({"models": "*"}, {}, "10.1.2.3", None),
        ({"models": ["acme-only"]}, {}, "10.1.2.3", 403),
        ({"model_versions": "^1"}, {}, "10.1.2.3", None),
        ({"model_versions": ">=2.0.0"}, {}, "10.1.2.3", 403),  # the default v1 is out of range
        ({"model_versions": ">=2.0.0"}, {"x-model-version": "v3"}, "10.1.2.3", None),
        ({"model_versions": {"shared": "~1.0", "other": ">=9"}}, {}, "10.1.2.3", None),
        ({"regions": ["eu-west-1"]}, {"x-gateway-region": "eu-west-1"}, "10.1.2.3", None),
        ({"regions": ["eu-west-1"]}, {"x-gateway-region": "us-east-1"}, "10.1.2.3", 403),
        ({"regions": ["eu-west-1"]}, {}, "10.1.2.3", 403),
        ({"source_cidrs": ["10.0.0.0/8"]}, {}, "10.1.2.3", None),
        ({"source_cidrs": ["10.0.0.0/8", "2001:db8::/32"]}, {}, "2001:db8::1", None),
        ({"source_cidrs": ["192.168.0.0/16"]}, {}, "10.1.2.3", 403),
        ({"source_cidrs": ["10.0.0.0/8"]}, {}, "", 403),
        # Unreadable constraints refuse rather than mean "no constraint".
        ({"source_cidrs": ["not-a-range"]}, {}, "10.1.2.3", 403),
        ({"models": 7}, {}, "10.1.2.3", 403),
        ({"model_versions": ">=banana"}, {}, "10.1.2.3", 403),
    ]
    for claims, extra, source, status in cases:
        d = await env.decide(path, {**env.bearer(**claims), **extra}, source=source)
        if status is None:
            allowed(d)
        else:
            denied(d, status)
    # API key metadata narrows the same way (this key may only call a model named "other").
    d = denied(await env.decide(path, {"authorization": f"Bearer {env.key}"}), 403)
    assert d.reason == "credential constraint models"


async def test_input_type_constraint_reads_the_body(env: Env) -> None:
    headers = env.bearer(input_types=["text"])
    image = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
    allowed(await env.decide("/v1/tenants", headers, {"prompt": "hello"}))
    d = denied(await env.decide("/v1/tenants", headers, image), 403)
    assert d.reason == "credential constraint input_types"


def test_version_ranges() -> None:
    v = version_of
    assert v("v2") == v("2.0.0") and v("1.4") == v("1.4.0") and v("latest") is None
    cases = {
        "^1.4": (["1.4.0", "1.9.9"], ["1.3.9", "2.0.0"]),
        "^0.2.3": (["0.2.3", "0.2.9"], ["0.3.0"]),
        "~1.2": (["1.2.0", "1.2.7"], ["1.3.0"]),
        "1.x": (["1.0.0", "1.99.0"], ["2.0.0", "0.9.0"]),
        ">=1.0.0 <2.0.0": (["1.0.0", "1.5.0"], ["2.0.0", "0.1.0"]),
        ">= 1.0, < 2": (["1.0.0"], ["2.0.0"]),
        "1.2.3 || >=3": (["1.2.3", "3.1.0"], ["1.2.4", "2.0.0"]),
        "*": (["0.0.1", "9.0.0"], []),
    }
    for source, (inside, outside) in cases.items():
        parsed = parse_range(source)
        for text in inside:
            assert parsed.matches(v(text)), (source, text)  # type: ignore[arg-type]
        for text in outside:
            assert not parsed.matches(v(text)), (source, text)  # type: ignore[arg-type]
    for bad in ("", ">=", "1.2.3.4", "=>1", "a.b", "||", "x" * 300):
        with pytest.raises(ConstraintError):
            parse_range(bad)


# --- floors ---------------------------------------------------------------------------------

PLATFORM = """
floors:
  authentication_methods: [jwt]
  require_tenant: true
  max_body_bytes: 65536
  injection: block
  pii_block: [aws_access_key]
  output_redact: [email]
  sanitize_errors: true
  fail_closed: true
  max_quotas:
    - {kind: requests, limit: 100, window: 1m}
"""
COMPLIANT = f"""
model: compliant
routes: [{{path_prefix: /v1/compliant}}]
versions: [{{name: v1, cluster: c-v1}}]
tenancy: {{require_tenant: true}}
authentication:
{JWT}
authorization: {{allow_any_authenticated: true}}
input:
  max_body_bytes: 65536
  injection: {{action: block, threshold: 0.4}}
  pii: {{block: [aws_access_key]}}
output:
  redact: {{mask: [email]}}
quotas:
  rules: [{{name: hourly, limit: 6000, window: 1h}}]
"""


def test_floors_accept_a_compliant_policy(tmp_path: Path) -> None:
    env = Env(tmp_path, {"_platform.yaml": PLATFORM, "compliant.yaml": COMPLIANT})
    assert env.store.current.policies[0].model == "compliant"


@pytest.mark.parametrize(
    ("change", "field", "floor"),
    [
        (("  - api_key: {}\n", "authorization:"), "authentication[1]", "authentication_methods"),
        (
            ("tenancy: {require_tenant: true}", "tenancy: {}"),
            "tenancy.require_tenant",
            "require_tenant",
        ),
        (
            ("max_body_bytes: 65536", "max_body_bytes: 65537"),
            "input.max_body_bytes",
            "max_body_bytes",
        ),
        (("action: block", "action: flag"), "input.injection.action", "injection"),
        (
            ("pii: {block: [aws_access_key]}", "pii: {mask: [aws_access_key]}"),
            "input.pii.block",
            "pii_block",
        ),
        (("redact: {mask: [email]}", "redact: {mask: [phone]}"), "output.redact", "output_redact"),
        (
            ("redact: {mask: [email]}", "redact: {mask: [email]}\n  sanitize_errors: false"),
            "output.sanitize_errors",
            "sanitize_errors",
        ),
        (
            ("rules: [", "on_store_failure: local\n  rules: ["),
            "quotas.on_store_failure",
            "fail_closed",
        ),
        (
            ("limit: 6000, window: 1h", "limit: 6001, window: 1h"),
            "quotas.rules[0].limit",
            "max_quotas[0]",
        ),
        (
            (
                "{name: hourly, limit: 6000, window: 1h}",
                "{name: busy, kind: concurrency, limit: 4}",
            ),
            "quotas.rules",
            "max_quotas[0]",
        ),
    ],
)
def test_a_policy_cannot_weaken_a_floor(
    tmp_path: Path, change: tuple[str, str], field: str, floor: str
) -> None:
    old, new = change
    if old == "  - api_key: {}\n":  # add a second method rather than replace text
        text = COMPLIANT.replace(f"{JWT}\n", f"{JWT}\n  - api_key: {{}}\n")
    else:
        assert old in COMPLIANT
        text = COMPLIANT.replace(old, new)
    with pytest.raises(PolicyLoadError) as caught:
        Env(tmp_path, {"_platform.yaml": PLATFORM, "compliant.yaml": text})
    errors = caught.value.errors
    assert any(
        e.field == field and f"floors.{floor}" in e.message and e.file.endswith("compliant.yaml")
        for e in errors
    ), errors


# --- hot reload -----------------------------------------------------------------------------


async def test_watched_changes_apply_and_broken_ones_leave_the_last_good_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    env = Env(tmp_path, {"shared.yaml": SHARED})
    store = env.store
    first = store.current.revision
    watcher = asyncio.create_task(store.watch(0.02))

    async def until(predicate: Any) -> None:
        for _ in range(250):  # at most 5 s
            if predicate():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the watcher did not react")

    try:
        pinned = {**env.bearer(), "x-model-version": "v1"}
        assert allowed(await env.decide("/v1/tenants", pinned)).cluster == "shared-v1"
        # Blue-green: the default moves to v3's cluster by an edit; applied without a restart.
        (tmp_path / "shared.yaml").write_text(
            textwrap.dedent(SHARED).replace("cluster: shared-v1", "cluster: shared-blue")
        )
        await until(lambda: store.current.revision != first)
        assert allowed(await env.decide("/v1/tenants", pinned)).cluster == "shared-blue"
        good = store.current.revision
        assert (store.reloads, store.rejected) == (1, 0)
        # A broken edit is refused with a logged error naming the file; service is untouched.
        (tmp_path / "shared.yaml").write_text("model: shared\nroutes: 7\n")
        await until(lambda: store.rejected == 1)
        assert store.current.revision == good
        assert allowed(await env.decide("/v1/tenants", pinned)).cluster == "shared-blue"
        assert "shared.yaml: routes" in caplog.text and "keeping revision" in caplog.text
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


# --- CEL conditions on rules ----------------------------------------------------------------

CONDITIONAL = f"""
model: conditional
routes: [{{path_prefix: /v1/conditional}}]
versions: [{{name: v1, cluster: cond-v1}}]
authentication:
{JWT}
authorization:
  rules:
    - name: office hours or admins
      when: '"admin" in identity.roles || (now.getHours("UTC") >= 8 && now.getHours("UTC") < 18)'
    - name: eu only
      when: region == "eu-west-1" || region == "eu-central-1"
    - name: small requests from outside
      when: ip_in(request.source_ip, ["10.0.0.0/8"]) || request.cost <= 100
"""


async def test_conditions_on_time_region_source_and_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import extproc.pipeline.authorize as authorize_module

    env = Env(tmp_path, {"conditional.yaml": CONDITIONAL})
    eu = {"x-gateway-region": "eu-west-1"}
    noon, night = 1_767_225_600.0 + 12 * 3600, 1_767_225_600.0 + 22 * 3600  # 2026-01-01 UTC

    async def at(when: float, headers: dict[str, str], payload: object, source: str) -> Any:
        monkeypatch.setattr(authorize_module, "clock", lambda: when)
        return await env.decide("/v1/conditional", headers, payload, source=source)

    small = {"prompt": "hi", "max_tokens": 10}
    big = {"prompt": "hi", "max_tokens": 5000}
    allowed(await at(noon, {**env.bearer(), **eu}, small, "192.0.2.1"))
    d = denied(await at(night, {**env.bearer(), **eu}, small, "192.0.2.1"), 403)
    assert d.reason == "rule 'office hours or admins' failed on when"
    allowed(await at(night, {**env.bearer(roles=["admin"]), **eu}, small, "192.0.2.1"))
    d = denied(await at(noon, {**env.bearer(), "x-gateway-region": "us-east-1"}, small, "1.2.3.4"),
               403)  # fmt: skip
    assert d.reason == "rule 'eu only' failed on when"
    # The cost is known once the body is read: large requests only from the internal range.
    allowed(await at(noon, {**env.bearer(), **eu}, big, "10.9.9.9"))
    d = denied(await at(noon, {**env.bearer(), **eu}, big, "192.0.2.1"), 403)
    assert d.reason == "rule 'small requests from outside' failed on when"


def test_a_condition_that_does_not_compile_names_file_field_and_position(tmp_path: Path) -> None:
    broken = CONDITIONAL.replace('region == "eu-west-1"', 'regoin == "eu-west-1"')
    with pytest.raises(PolicyLoadError) as caught:
        Env(tmp_path, {"conditional.yaml": broken})
    (error,) = caught.value.errors
    assert error.file.endswith("conditional.yaml")
    assert error.field == "authorization.rules[1].when"
    assert "line 1, column 1" in error.message and "regoin" in error.message


QUOTED = f"""
model: quoted
routes: [{{path_prefix: /v1/quoted}}]
versions: [{{name: v1, cluster: q-v1}}]
authentication:
{JWT}
authorization: {{allow_any_authenticated: true}}
quotas:
  rules: [{{name: per-tenant, key: [tenant], limit: 2, window: 1m}}]
"""


async def test_a_tenant_cannot_spend_or_see_another_tenants_quota(tmp_path: Path) -> None:
    env = Env(tmp_path, {"quoted.yaml": QUOTED})
    acme, globex = env.bearer(tenant="acme"), env.bearer(tenant="globex", sub="gus")
    for _ in range(2):
        allowed(await env.decide("/v1/quoted", acme))
    denied(await env.decide("/v1/quoted", acme), 429)
    # Naming the other tenant anywhere a client can write changes nothing: quotas are keyed
    # by the verified identity only.
    for headers in (
        {**acme, "x-gateway-tenant": "globex"},
        {**acme, "x-tenant-id": "globex"},
    ):
        denied(await env.decide("/v1/quoted", headers, {"metadata": {"tenant": "globex"}}), 429)
    # The other tenant's budget is untouched by all of the above.
    for _ in range(2):
        allowed(await env.decide("/v1/quoted", globex))
    denied(await env.decide("/v1/quoted", globex), 429)
