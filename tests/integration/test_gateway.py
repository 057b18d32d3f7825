"""Authentication and authorization through a real Envoy over real HTTPS, in both modes.

Every refused request is also checked at the pods: a denied request never reaches a model.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from extproc.testing.gateway import Gateway

CHAT = "/v1/chat/completions"
IRIS = "/v2/models/iris/infer"
IRIS_BODY = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4],
                         "data": [5.1, 3.5, 1.4, 0.2]}]}  # fmt: skip


def chat_body(model: str = "demo-chat", text: str = "hello") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    h = b64(json.dumps(header).encode())
    c = b64(json.dumps(claims).encode())
    return f"{h}.{c}.{b64(signature)}"


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": "https://issuer.demo.local", "aud": "models", "sub": "bob", "tenant": "demo",
            "roles": ["chat"], "iat": now, "nbf": now, "exp": now + 600}  # fmt: skip
    base.update(over)
    return base


def assert_denied(gw: Gateway, response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["error"]["code"] == code
    assert body["error"]["decision_id"] == response.headers["x-gateway-decision-id"]
    assert len(body["error"]["decision_id"]) == 32
    assert gw.received_total() == 0, "a denied request reached a model pod"
    return body


# -- authentication -------------------------------------------------------------------------


def test_no_credentials_is_401_with_challenge(gw: Gateway) -> None:
    r = gw.client.post(CHAT, json=chat_body())
    assert_denied(gw, r, 401, "unauthenticated")
    assert r.headers["www-authenticate"] == 'Bearer realm="models"'


def _bad_tokens(gw: Gateway) -> dict[str, str]:
    assert gw.stack.issuer is not None
    key = gw.stack.issuer.key
    other = ec.generate_private_key(ec.SECP256R1())
    public_pem = gw.stack.issuer.jwks_path.read_bytes()  # what an attacker can see
    hs_header = {"alg": "HS256", "typ": "JWT", "kid": "demo-1"}
    signing_input = unsigned(hs_header, claims()).rsplit(".", 1)[0]
    hs_sig = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return {
        "malformed": "not-a-jwt.at-all",
        "garbage_segments": "a.b.c",
        "expired": pyjwt.encode(claims(exp=int(time.time()) - 3600), key, "ES256",
                                headers={"kid": "demo-1"}),
        "not_yet_valid": pyjwt.encode(claims(nbf=int(time.time()) + 3600), key, "ES256",
                                      headers={"kid": "demo-1"}),
        "wrong_issuer": pyjwt.encode(claims(iss="https://evil.example"), key, "ES256",
                                     headers={"kid": "demo-1"}),
        "wrong_audience": pyjwt.encode(claims(aud="other"), key, "ES256",
                                       headers={"kid": "demo-1"}),
        "no_exp": pyjwt.encode({k: v for k, v in claims().items() if k != "exp"}, key, "ES256",
                               headers={"kid": "demo-1"}),
        "alg_none": unsigned({"alg": "none", "typ": "JWT"}, claims()),
        "hs256_with_public_key": f"{signing_input}.{b64(hs_sig)}",
        "unknown_kid": pyjwt.encode(claims(), other, "ES256", headers={"kid": "rotated-away"}),
        "right_kid_wrong_key": pyjwt.encode(claims(), other, "ES256", headers={"kid": "demo-1"}),
        "jku_header": pyjwt.encode(claims(), key, "ES256",
                                   headers={"kid": "demo-1", "jku": "https://evil.example/k"}),
        "oversized": pyjwt.encode(claims(pad="x" * 9000), key, "ES256",
                                  headers={"kid": "demo-1"}),
        "unknown_api_key": "gk_aaaaaaaaaaaa_" + "A" * 43,
    }  # fmt: skip


BAD = ["malformed", "garbage_segments", "expired", "not_yet_valid", "wrong_issuer",
       "wrong_audience", "no_exp", "alg_none", "hs256_with_public_key", "unknown_kid",
       "right_kid_wrong_key", "jku_header", "oversized", "unknown_api_key"]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_token_is_401_and_reaches_nothing(gw: Gateway, case: str) -> None:
    token = _bad_tokens(gw)[case]
    for path, body in ((CHAT, chat_body()), (IRIS, IRIS_BODY)):
        r = gw.client.post(path, json=body, headers=bearer(token))
        assert_denied(gw, r, 401, "unauthenticated")
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        assert token not in r.text


def test_valid_jwt_reaches_the_pod(gw: Gateway) -> None:
    token = gw.jwt()
    r = gw.client.post(CHAT, json=chat_body(text="echo me"), headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo me"
    assert r.headers["x-demo-version"] == "v1"
    seen = gw.received("chat-v1")
    assert len(seen) == 1
    headers = {k.lower(): v for k, v in seen[0]["headers"]}
    assert headers["x-gateway-principal"] == "bob"
    assert headers["x-gateway-tenant"] == "demo"
    assert headers["x-gateway-model"] == "demo-chat"
    assert "authorization" not in headers


def test_demo_quotas_are_announced_in_both_modes(gw: Gateway) -> None:
    key = gw.stack.create_api_key("quinn", "demo", ["chat"], metadata={"tier": "free"})
    gw.await_status(CHAT, chat_body(), {"x-api-key": key}, 200)
    r = gw.client.post(CHAT, json=chat_body(), headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    # The free class gets 60 of the rule's 300 requests; tokens are per tenant; the platform's
    # default (policies/_platform.yaml) gives a free tenant 2000 a day on each model.
    policy = r.headers["ratelimit-policy"]
    assert policy == (
        '"requests-per-caller";q=60;w=60, "tokens-per-tenant";q=200000;w=3600, '
        '"tenant-daily";q=2000;w=86400'
    )
    state = r.headers["ratelimit"]
    assert state.startswith('"requests-per-caller";r=') and '"tokens-per-tenant";r=' in state
    iris = gw.client.post(IRIS, json=IRIS_BODY, headers={"x-api-key": gw.iris_key})
    assert iris.status_code == 200, iris.text  # a model without quotas of its own
    assert iris.headers["ratelimit-policy"] == '"tenant-daily";q=100000;w=86400'


def test_valid_api_key_reaches_the_pod_over_http2(gw: Gateway) -> None:
    r = gw.h2.post(IRIS, json=IRIS_BODY, headers={"x-api-key": gw.iris_key})
    assert r.status_code == 200, r.text
    assert r.http_version == "HTTP/2"
    assert r.json()["outputs"][1]["data"] == [0]
    (seen,) = gw.received("oip-v1")
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-gateway-principal"] == "ivan"
    assert "x-api-key" not in headers
    assert gw.iris_key not in json.dumps(seen)


def test_revoked_key_is_401_while_its_replacement_works(gw: Gateway) -> None:
    from extproc.authn.apikey import revoke_key

    old = gw.stack.create_api_key("rotating", "demo", ["chat"])
    new = gw.stack.create_api_key("rotating", "demo", ["chat"])
    gw.await_status(CHAT, chat_body(), bearer(new), 200)
    assert gw.client.post(CHAT, json=chat_body(), headers=bearer(old)).status_code == 200
    revoke_key(gw.stack.api_keys_file, old.split("_")[1])
    gw.await_status(CHAT, chat_body(), bearer(old), 401)
    gw.clear()
    assert_denied(gw, gw.client.post(CHAT, json=chat_body(), headers=bearer(old)), 401,
                  "unauthenticated")  # fmt: skip
    assert gw.client.post(CHAT, json=chat_body(), headers=bearer(new)).status_code == 200


# -- authorization --------------------------------------------------------------------------


def test_principal_without_role_is_403(gw: Gateway) -> None:
    r = gw.client.post(IRIS, json=IRIS_BODY, headers=bearer(gw.chat_key))
    body = assert_denied(gw, r, 403, "forbidden")
    assert body["error"]["message"] == "the caller is not allowed to use this model"
    assert "classify" not in r.text and "rule" not in r.text


def test_other_tenant_is_403(gw: Gateway) -> None:
    r = gw.client.post(CHAT, json=chat_body(), headers=bearer(gw.other_tenant_key))
    assert_denied(gw, r, 403, "forbidden")


def test_version_needs_its_role(gw: Gateway) -> None:
    pinned = {"x-model-version": "v2"}
    r = gw.client.post(CHAT, json=chat_body(), headers={**bearer(gw.chat_key), **pinned})
    assert_denied(gw, r, 403, "forbidden")
    r = gw.client.post(CHAT, json=chat_body(), headers={**bearer(gw.beta_key), **pinned})
    assert r.status_code == 200
    assert r.headers["x-demo-version"] == "v2"
    assert len(gw.received("chat-v2")) == 1 and gw.received("chat-v1") == []


def test_jwt_roles_decide_too(gw: Gateway) -> None:
    r = gw.client.post(CHAT, json=chat_body(), headers=bearer(gw.jwt(roles=["classify"])))
    assert_denied(gw, r, 403, "forbidden")


def test_unknown_model_in_body_and_unowned_path(gw: Gateway) -> None:
    r = gw.client.post(CHAT, json=chat_body(model="gpt-9"), headers=bearer(gw.chat_key))
    assert_denied(gw, r, 404, "model_not_found")
    r = gw.client.post("/v1/embeddings", json=chat_body(), headers=bearer(gw.chat_key))
    assert_denied(gw, r, 404, "not_found")
    json_type = {"content-type": "application/json"}
    r = gw.client.post(CHAT, content=b"{not json", headers={**bearer(gw.chat_key), **json_type})
    assert_denied(gw, r, 400, "invalid_json")
    # Without a media type the chat model takes, the body is not even parsed.
    r = gw.client.post(CHAT, content=b"{not json", headers=bearer(gw.chat_key))
    assert_denied(gw, r, 415, "unsupported_media_type")


def test_spoofed_identity_headers_are_replaced(gw: Gateway) -> None:
    spoof = {
        "x-gateway-principal": "root",
        "x-gateway-tenant": "evil",
        "x-gateway-cluster": "demo-chat-v2",
        "x-gateway-decision-id": "forged",
        "x-gateway-auth-method": "mtls",
        "x-gateway-version": "v9",
    }
    r = gw.client.post(CHAT, json=chat_body(), headers={**bearer(gw.chat_key), **spoof})
    assert r.status_code == 200
    assert r.headers["x-demo-version"] == "v1"  # the forged cluster header did not route
    (seen,) = gw.received("chat-v1")
    values: dict[str, list[str]] = {}
    for k, v in seen["headers"]:
        values.setdefault(k.lower(), []).append(v)
    assert values["x-gateway-principal"] == ["alice"]
    assert values["x-gateway-tenant"] == ["demo"]
    assert values["x-gateway-cluster"] == ["demo-chat-v1"]
    assert "x-gateway-auth-method" not in values  # a client copy is removed, never passed
    assert "x-gateway-version" not in values
    assert values["x-gateway-decision-id"] != ["forged"]


def test_caller_without_tenant_cannot_borrow_one_from_a_header(gw: Gateway) -> None:
    r = gw.client.post(
        CHAT, json=chat_body(), headers={**bearer(gw.jwt(tenant=None)), "x-gateway-tenant": "demo"}
    )
    # The policy requires tenant demo: a caller without a tenant cannot borrow one.
    assert_denied(gw, r, 403, "forbidden")


def test_duplicate_authorization_headers_do_not_authenticate(gw: Gateway) -> None:
    headers = [("authorization", f"Bearer {gw.chat_key}"), ("authorization", "Bearer other")]
    r = gw.client.post(CHAT, json=chat_body(), headers=headers)
    assert r.status_code in (400, 401)
    assert gw.received_total() == 0


# -- path tricks ----------------------------------------------------------------------------

PATH_TRICKS = [
    "//v2/models/iris/infer",
    "/v2//models/iris/infer",
    "/v2/models/iris/../iris/infer",
    "/v1/chat/completions/../../../v2/models/iris/infer",
    "/v1/chat/%2e%2e/%2e%2e/v2/models/iris/infer",
    "/v2/models/%69ris/infer",
    "/v2/models%2Firis/infer",
    "/v2/models/iris%2finfer",
    "/v2/models/./iris/infer",
]


@pytest.mark.parametrize("path", PATH_TRICKS)
def test_path_variants_cannot_bypass_a_rule(gw: Gateway, path: str) -> None:
    """alice may chat but not classify: no spelling of the iris path gets her to the pod."""
    import httpx

    url = httpx.URL(gw.stack.gateway_url).copy_with(raw_path=path.encode())
    r = gw.client.post(url, json=IRIS_BODY, headers=bearer(gw.chat_key))
    assert r.status_code in (400, 403, 404), (path, r.status_code, r.text)
    assert gw.received_total() == 0


def test_dynamic_metadata_carries_the_decision(gw: Gateway) -> None:
    r = gw.client.post(IRIS, json=IRIS_BODY, headers=bearer(gw.iris_key))
    assert r.status_code == 200
    (seen,) = gw.received("oip-v1")
    decision_id = {k.lower(): v for k, v in seen["headers"]}["x-gateway-decision-id"]
    log = gw.stack.access_log
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in log.read_text().splitlines() if decision_id in x]
        if lines:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("decision id not in Envoy's access log dynamic metadata")
    meta = lines[0]["decision"]
    assert meta["decision_id"] == decision_id
    assert meta["principal"] == "ivan"
    assert meta["model"] == "iris"


def test_no_credential_goes_upstream_even_an_unused_one(gw: Gateway) -> None:
    headers = {**bearer(gw.jwt()), "x-api-key": gw.other_tenant_key}
    r = gw.client.post(CHAT, json=chat_body(), headers=headers)
    assert r.status_code == 200, r.text
    (seen,) = gw.received("chat-v1")
    names = {k.lower() for k, _ in seen["headers"]}
    assert "authorization" not in names and "x-api-key" not in names
    assert gw.other_tenant_key not in json.dumps(seen)


def test_no_secret_reaches_any_log(gw: Gateway) -> None:
    """Runs last in this module: every key and a token used above must be absent from logs."""
    token = gw.jwt()
    assert gw.client.post(CHAT, json=chat_body(), headers=bearer(token)).status_code == 200
    bad = gw.client.post(CHAT, json=chat_body(), headers=bearer(token[:-4] + "AAAA"))
    assert bad.status_code == 401
    time.sleep(0.3)  # access log flush interval is 100 ms
    logs = "\n".join(
        p.read_text(errors="replace") for p in (gw.stack.run_dir / "logs").glob("*.log")
    )
    assert "decision_id" in logs  # the access log was written
    secrets = [gw.chat_key, gw.beta_key, gw.iris_key, gw.other_tenant_key, token]
    for secret in secrets:
        assert secret not in logs
        assert secret.split(".")[-1][-20:] not in logs  # not even a signature or key tail


def test_upstream_stack_trace_is_sanitised_in_both_modes(gw: Gateway) -> None:
    """A 5xx goes to the decision server on a stream of its own (Envoy's composite filter),
    in ext_authz deployments too; the upstream's words reach the audit record, PII masked."""
    headers = {**bearer(gw.jwt()), "x-demo-traceback": "1"}
    r = gw.client.post(CHAT, json=chat_body(), headers=headers)
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    decision_id = r.headers["x-gateway-decision-id"]
    assert r.json() == {
        "error": {
            "code": "upstream_error",
            "message": "the model failed to answer",
            "decision_id": decision_id,
        }
    }
    assert "Traceback" not in r.text and "oncall" not in r.text
    # The debug server's own headers go with its words; Envoy's and the gateway's stay.
    assert "x-powered-by" not in r.headers and "set-cookie" not in r.headers
    assert r.headers["server"] == "envoy" and r.headers["cache-control"] == "no-store"
    assert "date" in r.headers
    record = gw.await_audit({decision_id}, "upstream_error")[decision_id]
    assert record["transport"] == gw.stack.config.mode
    assert (record["model"], record["status"], record["sanitised"]) == ("demo-chat", 500, True)
    assert record["bytes"] > 0
    head = record["body_head"]
    assert head.startswith("Traceback") and "RuntimeError: demo failure" in head
    assert "oncall@demo.example" not in head and "[EMAIL]" in head
    # The decision that let the request through has its own record, under the same id.
    assert gw.await_audit({decision_id}, "decision")[decision_id]["outcome"] == "allow"
