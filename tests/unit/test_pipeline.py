"""The decision core without gRPC: real policies, real authenticators, RequestContexts in."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from extproc.authn.apikey import ApiKeyStore, create_key
from extproc.demo.issuer import DemoIssuer, ensure_demo_issuer
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny, NeedBody
from extproc.pipeline.run import DecisionCore
from extproc.pipeline.upstream import allow_mutation, dynamic_metadata
from extproc.policy.load import PolicyLoadError
from extproc.policy.store import PolicyStore

CHAT = """
model: chat
aliases: [chat-latest]
routes:
  - {path_prefix: /v1/chat/completions, methods: [POST], select_by_body_model: true}
versions:
  - {name: v1, cluster: chat-v1, default: true}
  - {name: v2, cluster: chat-v2}
authentication:
  - jwt: {issuer: "https://issuer.demo.local", audiences: [models], algorithms: [ES256],
          jwks_file: demo/jwks.json, leeway_seconds: 0}
  - api_key: {header: x-api-key}
authorization:
  rules:
    - {name: tenant, tenants: [demo]}
    - {name: beta, versions: [v2], roles_any: [beta]}
"""
OTHER_CHAT = """
model: jwt-only-chat
routes:
  - {path_prefix: /v1/chat/completions, select_by_body_model: true}
versions: [{name: v1, cluster: other-v1}]
authentication:
  - jwt: {issuer: "https://issuer.demo.local", audiences: [models], algorithms: [ES256],
          jwks_file: demo/jwks.json, leeway_seconds: 0}
authorization: {allow_any_authenticated: true}
"""
IRIS = """
model: iris
routes: [{path_prefix: /v2/models/iris}]
versions: [{name: v1, cluster: iris-v1}]
authentication: [{api_key: {}}]
authorization:
  rules: [{name: classifiers, roles_any: [classify], claims: {tier: [gold, silver]}}]
"""


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.issuer: DemoIssuer = ensure_demo_issuer(root / "demo")
        self.keys_file = root / "keys.json"
        self.chat_key, _ = create_key(self.keys_file, "alice", tenant="demo", roles=["chat"])
        self.gold_key, _ = create_key(
            self.keys_file, "ivan", tenant="demo", roles=["classify"], metadata={"tier": "gold"}
        )
        self.iron_key, _ = create_key(
            self.keys_file, "ira", tenant="demo", roles=["classify"], metadata={"tier": "iron"}
        )
        for name, text in (("chat.yaml", CHAT), ("other.yaml", OTHER_CHAT), ("iris.yaml", IRIS)):
            (root / name).write_text(textwrap.dedent(text))
        self.store = PolicyStore(root, ApiKeyStore.load(self.keys_file), {})
        self.core = DecisionCore(self.store)

    def token(self, **claims: Any) -> str:
        base: dict[str, Any] = {"sub": "bob", "tenant": "demo", "roles": ["chat"]}
        base.update(claims)
        return self.issuer.mint(base)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def ctx(path: str, headers: Mapping[str, str] = {}, method: str = "POST") -> RequestContext:
    return RequestContext(method=method, path=path, host="gw.local", headers=dict(headers))


def body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def decide(env: Env, c: RequestContext, payload: bytes | None = None) -> Allow | Deny:
    c.body = payload
    return await env.core.decide(c)


async def test_unowned_path_is_404_before_authentication(env: Env) -> None:
    d = await decide(env, ctx("/v1/embeddings"))
    assert isinstance(d, Deny) and (d.status, d.code, d.phase) == (404, "not_found", "route")


async def test_whole_segment_prefix(env: Env) -> None:
    d = await decide(
        env, ctx("/v2/models/iris2/infer", {"authorization": f"Bearer {env.gold_key}"})
    )
    assert isinstance(d, Deny) and d.status == 404


async def test_method_not_allowed(env: Env) -> None:
    d = await decide(env, ctx("/v2/models/iris/infer", method="PATCH"))
    assert isinstance(d, Deny) and d.status == 401  # iris allows any method
    # /v1/chat/completions is shared: `chat` allows POST only, `jwt-only-chat` any method.
    headers = {"x-api-key": env.chat_key}
    d = await decide(env, ctx("/v1/chat/completions", headers, method="PUT"), body("chat"))
    assert isinstance(d, Deny) and d.status == 405 and ("allow", "POST") in d.headers
    headers = {"authorization": f"Bearer {env.token()}"}
    d = await decide(env, ctx("/v1/chat/completions", headers, method="PUT"), body("jwt-only-chat"))
    assert isinstance(d, Allow)


async def test_missing_and_unrecognised_credentials(env: Env) -> None:
    d = await decide(env, ctx("/v2/models/iris/infer"))
    assert isinstance(d, Deny) and d.status == 401 and d.reason == "missing_credentials"
    assert d.headers == (("www-authenticate", 'Bearer realm="models"'),)
    d = await decide(env, ctx("/v2/models/iris/infer", {"authorization": "Basic dXNlcjpwdw=="}))
    assert isinstance(d, Deny) and d.reason == "unrecognized_credentials"
    assert 'error="invalid_token"' in dict(d.headers)["www-authenticate"]


async def test_body_selected_route_asks_for_body_after_authenticating(env: Env) -> None:
    c = ctx("/v1/chat/completions", {"authorization": f"Bearer {env.chat_key}"})
    first = await env.core.on_headers(c)
    assert isinstance(first, NeedBody) and first.identity.principal == "alice"
    d = await env.core.on_body(c, first, body("chat-latest"))
    assert isinstance(d, Allow)
    assert (d.model, d.version, d.cluster) == ("chat", "v1", "chat-v1")
    # Unauthenticated callers are refused before any body is requested.
    assert isinstance(await env.core.on_headers(ctx("/v1/chat/completions")), Deny)


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "model_required"),
        (b'{"model": 5}', 400, "model_required"),
        (b'{"model": ""}', 400, "model_required"),
        (b'{"model": "nope"}', 404, "model_not_found"),
        (b"", 400, "invalid_json"),
    ],
)
async def test_body_model_errors(env: Env, payload: bytes, status: int, code: str) -> None:
    d = await decide(env, ctx("/v1/chat/completions", {"x-api-key": env.chat_key}), payload)
    assert isinstance(d, Deny) and (d.status, d.code) == (status, code)


async def test_model_that_does_not_accept_the_method_is_401(env: Env) -> None:
    d = await decide(
        env, ctx("/v1/chat/completions", {"x-api-key": env.chat_key}), body("jwt-only-chat")
    )
    assert isinstance(d, Deny) and d.status == 401 and d.reason == "method_not_accepted"
    d = await decide(
        env, ctx("/v1/chat/completions", {"authorization": f"Bearer {env.token()}"}),
        body("jwt-only-chat"),
    )  # fmt: skip
    assert isinstance(d, Allow) and d.cluster == "other-v1"


async def test_versions_and_rules(env: Env) -> None:
    headers = {"authorization": f"Bearer {env.token()}", "x-model-version": "v2"}
    d = await decide(env, ctx("/v1/chat/completions", headers), body("chat"))
    assert isinstance(d, Deny) and d.status == 403 and "beta" in d.reason
    assert "beta" not in d.message  # internals stay in the audit reason
    headers["authorization"] = f"Bearer {env.token(roles=['chat', 'beta'])}"
    d = await decide(env, ctx("/v1/chat/completions", headers), body("chat"))
    assert isinstance(d, Allow) and d.cluster == "chat-v2"
    headers["x-model-version"] = "v9"
    d = await decide(env, ctx("/v1/chat/completions", headers), body("chat"))
    assert isinstance(d, Deny) and (d.status, d.code) == (400, "unknown_version")
    d = await decide(
        env, ctx("/v1/chat/completions", {"authorization": f"Bearer {env.token(tenant='x')}"}),
        body("chat"),
    )  # fmt: skip
    assert isinstance(d, Deny) and d.status == 403 and "tenant" in d.reason


async def test_claims_from_api_key_metadata(env: Env) -> None:
    d = await decide(env, ctx("/v2/models/iris/infer", {"authorization": f"Bearer {env.gold_key}"}))
    assert isinstance(d, Allow)
    d = await decide(env, ctx("/v2/models/iris/infer", {"authorization": f"Bearer {env.iron_key}"}))
    assert isinstance(d, Deny) and d.reason == "rule 'classifiers' failed on claims.tier"


async def test_upstream_mutation_overwrites_and_strips(env: Env) -> None:
    headers = {"authorization": f"Bearer {env.token(tenant=None)}", "x-api-key": "gk_other"}
    d = await decide(env, ctx("/v1/chat/completions", headers), body("jwt-only-chat"))
    assert isinstance(d, Allow)
    m = allow_mutation(d)
    assert dict(m.set)["x-gateway-principal"] == "bob"
    assert "x-gateway-tenant" in m.remove  # no tenant: a client copy must not survive
    assert "authorization" in m.remove
    assert "x-gateway-decision-id" not in m.remove  # the adapter sets it per request
    meta = dynamic_metadata(d)
    assert meta["principal"] == "bob" and "tenant" not in meta


async def test_a_fault_fails_closed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = env.store.current.match("gw.local", "/v2/models/iris/infer")
    assert policy is not None and policy.owner is not None
    authenticator = policy.owner.authenticators[0]

    async def boom(headers: Mapping[str, str]) -> None:
        raise RuntimeError("store exploded")

    monkeypatch.setattr(authenticator, "authenticate", boom)
    d = await decide(env, ctx("/v2/models/iris/infer", {"authorization": f"Bearer {env.gold_key}"}))
    assert isinstance(d, Deny) and d.status == 503 and "exploded" not in d.message


async def test_expired_jwt_from_cache_is_refused(env: Env) -> None:
    token = env.issuer.mint({"sub": "bob", "tenant": "demo"}, ttl_seconds=1)
    headers = {"authorization": f"Bearer {token}"}
    first = await env.core.on_headers(ctx("/v1/chat/completions", headers))
    assert isinstance(first, NeedBody)
    time.sleep(2.1)
    again = await env.core.on_headers(ctx("/v1/chat/completions", headers))
    assert isinstance(again, Deny) and again.status == 401


def test_reload_keeps_last_good_and_swaps_whole(env: Env) -> None:
    before = env.store.current
    (env.root / "iris.yaml").write_text("model: BROKEN\n")
    assert env.store.reload() is False
    assert env.store.current is before
    (env.root / "iris.yaml").write_text(textwrap.dedent(IRIS).replace("iris-v1", "iris-v2"))
    assert env.store.reload() is True
    entry = env.store.current.match("x", "/v2/models/iris/infer")
    assert entry is not None and entry.owner is not None
    assert entry.owner.versions["v1"] == "iris-v2"
    assert env.store.current.revision != before.revision


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (IRIS.replace("model: iris", "model: iris-copy"), "is also owned by"),
        (OTHER_CHAT.replace("jwt-only-chat", "chat-latest"), "'chat-latest' is also used"),
        (IRIS.replace("model: iris", "model: hs").replace("/v2/models/iris", "/hs").replace(
            "[{api_key: {}}]",
            "[{jwt: {issuer: i, audiences: [a], algorithms: [HS256], hs256_secret_env: NOPE}}]"),
         "environment variable NOPE is not set"),
    ],
)  # fmt: skip
def test_set_level_errors_name_the_file(env: Env, extra: str, message: str) -> None:
    path = env.root / "zz-extra.yaml"
    path.write_text(textwrap.dedent(extra))
    with pytest.raises(PolicyLoadError) as info:
        PolicyStore(env.root, ApiKeyStore.load(env.keys_file), {})
    assert any(message in e.message and e.file == str(path) for e in info.value.errors), [
        str(e) for e in info.value.errors
    ]
