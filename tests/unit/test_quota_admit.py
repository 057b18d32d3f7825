"""The admit phase through the decision core, without gRPC: real policy files, real API keys,
the embedded store; and the failure modes against a store that is down."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.adapters import ext_proc
from extproc.authn.apikey import ApiKeyStore, create_key
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny
from extproc.pipeline.run import DecisionCore
from extproc.policy.load import PolicyLoadError
from extproc.policy.store import PolicyStore
from extproc.quota.admit import QuotaEngine
from extproc.quota.memory import MemoryStore
from extproc.quota.store import Outcome, Receipt, StoreError, Take

CHAT = """
model: chat
routes: [{path_prefix: /v1/chat/completions, methods: [POST]}]
versions: [{name: v1, cluster: chat-v1, default: true}, {name: v2, cluster: chat-v2}]
authentication: [{api_key: {header: x-api-key}}]
authorization: {allow_any_authenticated: true}
# Request quotas alone: nothing here needs the response (error sanitising would).
output: {sanitize_errors: false}
quotas:
  class_claim: tier
  rules:
    - {name: per-caller, limit: 4, window: 1m, burst: 4, classes: {free: 2},
       limit_from: rpm}
    - {name: per-tenant, key: [tenant], limit: 6, window: 1m, algorithm: sliding_window}
    - {name: v2-only, versions: [v2], limit: 1, window: 1m}
    - {name: keys-only, key: [api_key], limit: 100, window: 1h}
"""
COST = """
model: costly
routes: [{path_prefix: /v1/completions, methods: [POST]}]
versions: [{name: v1, cluster: costly-v1}]
authentication: [{api_key: {}}]
authorization: {allow_any_authenticated: true}
quotas:
  on_store_failure: local
  local_fraction: 0.5
  rules:
    - name: tokens
      kind: cost
      key: [tenant]
      limit: 1000
      window: 1h
      cost: {estimate: "prompt_tokens + max_tokens * n", actual: "total_tokens"}
    - {name: slots, kind: concurrency, key: [tenant], limit: 2}
"""


class Env:
    def __init__(self, root: Path, store: Any = None) -> None:
        keys = root / "keys.json"
        self.alice, _ = create_key(keys, "alice", tenant="acme", roles=[])
        self.bob, _ = create_key(keys, "bob", tenant="acme", roles=[])
        self.free, _ = create_key(keys, "fay", tenant="other", roles=[], metadata={"tier": "free"})
        self.own, _ = create_key(keys, "oz", tenant="third", roles=[], metadata={"rpm": 1})
        (root / "chat.yaml").write_text(textwrap.dedent(CHAT))
        (root / "costly.yaml").write_text(textwrap.dedent(COST))
        self.policies = PolicyStore(root, ApiKeyStore.load(keys), {})
        self.memory = MemoryStore()
        self.core = DecisionCore(self.policies, QuotaEngine(store or self.memory))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


async def chat(env: Env, key: str, version: str | None = None) -> Allow | Deny:
    headers = {"x-api-key": key, **({"x-model-version": version} if version else {})}
    c = RequestContext(method="POST", path="/v1/chat/completions", host="h", headers=headers)
    return await env.core.decide(c)


async def complete(env: Env, key: str, body: dict[str, Any]) -> Allow | Deny:
    c = RequestContext(
        method="POST",
        path="/v1/completions",
        host="h",
        headers={"authorization": f"Bearer {key}"},
        body=json.dumps(body).encode(),
    )
    return await env.core.decide(c)


def statuses(decisions: Sequence[Allow | Deny]) -> list[int]:
    return [200 if isinstance(d, Allow) else d.status for d in decisions]


async def test_limit_per_caller_then_429_with_fields(env: Env) -> None:
    got = [await chat(env, env.alice) for _ in range(5)]
    assert statuses(got) == [200, 200, 200, 200, 429]
    first, denied = got[0], got[4]
    assert isinstance(first, Allow) and first.admission is not None
    fields = dict(first.admission.headers)
    assert fields["ratelimit-policy"] == (
        '"per-caller";q=4;w=60, "per-tenant";q=6;w=60, "keys-only";q=100;w=3600'
    )
    assert fields["ratelimit"].startswith('"per-caller";r=3;t=')
    assert isinstance(denied, Deny)
    assert denied.reason == "quota:per-caller" and "per-caller" in denied.message
    headers = dict(denied.headers)
    assert 1 <= int(headers["retry-after"]) <= 15  # GCRA: one emission interval (15 s)
    assert headers["ratelimit"].startswith('"per-caller";r=0;')


async def test_a_denied_request_consumes_nothing_anywhere(env: Env) -> None:
    # alice uses up 4 of acme's 6; bob then gets 2 more before the tenant quota stops him,
    # and his refused attempts do not eat into his own per-caller quota.
    assert statuses([await chat(env, env.alice) for _ in range(4)]) == [200] * 4
    assert statuses([await chat(env, env.bob) for _ in range(4)]) == [200, 200, 429, 429]
    denied = await chat(env, env.bob)
    assert isinstance(denied, Deny) and denied.reason == "quota:per-tenant"


async def test_class_limit_and_limit_from_identity(env: Env) -> None:
    assert statuses([await chat(env, env.free) for _ in range(3)]) == [200, 200, 429]
    assert statuses([await chat(env, env.own) for _ in range(2)]) == [200, 429]


async def test_version_scoped_rule(env: Env) -> None:
    assert statuses([await chat(env, env.alice, "v2") for _ in range(2)]) == [200, 429]
    assert statuses([await chat(env, env.alice, "v1")]) == [200]


async def test_cost_reserved_settled_and_released(env: Env) -> None:
    req = {"prompt": "x" * 400, "max_tokens": 200, "n": 2}  # 100 + 400 = 500 reserved
    a = await complete(env, env.alice, req)
    b = await complete(env, env.bob, req)
    assert isinstance(a, Allow) and isinstance(b, Allow)
    assert statuses([await complete(env, env.alice, req)]) == [429]  # 1000 reserved
    assert a.admission is not None and b.admission is not None
    await a.admission.settle({"total_tokens": 120})  # 380 come back
    await a.admission.finish()
    # Slots: two were held, `a` finished, so one is free; the reservation of 500 no longer fits
    # (1000 - 120 - 500 = 380), a smaller request does.
    assert statuses([await complete(env, env.alice, req)]) == [429]
    small = await complete(env, env.alice, {"prompt": "x" * 40, "max_tokens": 100})
    assert isinstance(small, Allow)
    assert statuses([await complete(env, env.alice, {"prompt": "", "max_tokens": 1})]) == [429]
    assert small.admission is not None
    small.admission.on_response(502)
    await small.admission.finish()  # upstream failed: reservation refunded, slot freed
    again = await complete(env, env.alice, {"prompt": "x" * 40, "max_tokens": 100})
    assert isinstance(again, Allow)


async def test_cost_larger_than_the_quota_is_refused_outright(env: Env) -> None:
    d = await complete(env, env.alice, {"prompt": "", "max_tokens": 5000})
    assert isinstance(d, Deny) and d.status == 429 and d.reason == "quota:tokens:too_large"


async def test_streaming_request_asks_for_usage(env: Env) -> None:
    d = await complete(env, env.alice, {"prompt": "hi", "max_tokens": 10, "stream": True})
    assert isinstance(d, Allow) and d.admission is not None and d.admission.strip_usage
    assert d.body is not None
    sent = json.loads(d.body)
    assert sent["stream_options"] == {"include_usage": True} and sent["prompt"] == "hi"
    asked = await complete(
        env,
        env.bob,
        {"prompt": "hi", "max_tokens": 10, "stream": True,
         "stream_options": {"include_usage": True}},
    )  # fmt: skip
    assert isinstance(asked, Allow) and asked.body is None
    assert asked.admission is not None and not asked.admission.strip_usage


async def test_cost_needs_json(env: Env) -> None:
    c = RequestContext(
        method="POST",
        path="/v1/completions",
        host="h",
        headers={"authorization": f"Bearer {env.alice}"},
        body=b"not json",
    )
    d = await env.core.decide(c)
    assert isinstance(d, Deny) and d.status == 400 and d.code == "invalid_json"


class DownStore:
    calls = 0

    async def take(self, takes: Sequence[Take], request_id: str) -> Outcome:
        self.calls += 1
        raise StoreError("connection refused")

    async def adjust(self, adjustments: Sequence[tuple[Receipt, int]]) -> None:
        raise StoreError("connection refused")

    async def close(self) -> None:
        pass


async def test_store_down_fail_closed_or_local_per_policy(tmp_path: Path) -> None:
    env = Env(tmp_path, store=DownStore())
    d = await chat(env, env.alice)  # chat declares nothing: fail closed
    assert isinstance(d, Deny) and (d.status, d.reason) == (503, "quota_store_unavailable")
    assert ("retry-after", "1") in d.headers
    # costly degrades to a local store with half of each limit: 500 tokens, 1 slot.
    first = await complete(env, env.alice, {"prompt": "", "max_tokens": 300})
    assert isinstance(first, Allow)
    assert statuses([await complete(env, env.bob, {"prompt": "", "max_tokens": 1})]) == [429]
    assert first.admission is not None
    await first.admission.finish()  # releases against the local store it was taken from
    assert statuses([await complete(env, env.bob, {"prompt": "", "max_tokens": 100})]) == [200]


def test_bad_cost_expression_names_file_field_and_position(tmp_path: Path) -> None:
    (tmp_path / "costly.yaml").write_text(
        textwrap.dedent(COST).replace("prompt_tokens + max_tokens * n", "prompt_tokens +* 2")
    )
    with pytest.raises(PolicyLoadError) as info:
        PolicyStore(tmp_path, ApiKeyStore.load(tmp_path / "keys.json"), {})
    (error,) = info.value.errors
    assert error.file.endswith("costly.yaml")
    assert error.field == "quotas.rules.0.cost.estimate"


def test_unknown_cost_variable_is_refused(tmp_path: Path) -> None:
    (tmp_path / "costly.yaml").write_text(
        textwrap.dedent(COST).replace("prompt_tokens + max_tokens * n", "prompt_tokens + tokens")
    )
    with pytest.raises(PolicyLoadError, match="tokens"):
        PolicyStore(tmp_path, ApiKeyStore.load(tmp_path / "keys.json"), {})


BUSY = """
model: busy
routes: [{path_prefix: /v1/busy}]
versions: [{name: v1, cluster: busy-v1}]
authentication: [{api_key: {}}]
authorization: {allow_any_authenticated: true}
quotas:
  overload: {max_in_flight: 4, class_shares: {free: 0.5}}
"""


async def test_overload_sheds_lower_classes_first(tmp_path: Path) -> None:
    env = Env(tmp_path)
    (tmp_path / "busy.yaml").write_text(textwrap.dedent(BUSY))
    env.policies.reload()

    async def busy(key: str) -> Allow | Deny:
        c = RequestContext(
            method="POST", path="/v1/busy", host="h", headers={"authorization": f"Bearer {key}"}
        )
        return await env.core.decide(c)

    # free callers may fill half of the 4 seats; everyone else all of them.
    free = [await busy(env.free) for _ in range(3)]
    assert statuses(free) == [200, 200, 503]
    shed = free[2]
    assert isinstance(shed, Deny) and shed.code == "overloaded"
    assert int(dict(shed.headers)["retry-after"]) >= 1
    others = [await busy(env.alice) for _ in range(3)]
    assert statuses(others) == [200, 200, 503]  # the cap itself
    first = free[0]
    assert isinstance(first, Allow) and first.admission is not None
    first.admission.on_response(200)
    await first.admission.finish()  # a seat comes back when the exchange ends
    assert statuses([await busy(env.alice)]) == [200]


async def test_overload_latency_is_time_to_response_headers(tmp_path: Path) -> None:
    env = Env(tmp_path)
    (tmp_path / "busy.yaml").write_text(textwrap.dedent(BUSY))
    env.policies.reload()
    c = RequestContext(
        method="POST", path="/v1/busy", host="h", headers={"authorization": f"Bearer {env.alice}"}
    )
    d = await env.core.decide(c)
    assert isinstance(d, Allow) and d.admission is not None and d.admission.ticket is not None
    d.admission.on_response(200)  # headers at once...
    await asyncio.sleep(0.3)  # ... then a long stream
    await d.admission.finish()
    (busy,) = [p for p in env.policies.current.policies if p.model == "busy"]
    guard = busy.quotas.overload
    assert guard is not None and guard.latency_ewma_s < 0.1  # the stream's length is not load


async def test_request_quotas_ride_on_metadata_without_a_response_message(env: Env) -> None:
    allow = await chat(env, env.alice)
    assert isinstance(allow, Allow) and allow.admission is not None
    assert not allow.admission.wants_end  # nothing held past the request
    message = pb.ProcessingResponse.FromString(
        ext_proc.allowed(allow, "d" * len(ext_proc.DECISION_ID_SLOT), "request_headers")
    )
    assert not message.HasField("mode_override")  # Envoy is not asked for the response
    fields = message.dynamic_metadata.fields
    assert set(fields) == {ext_proc.METADATA_NAMESPACE, ext_proc.RESPONSE_HEADERS_NAMESPACE}
    ratelimit = dict(fields[ext_proc.RESPONSE_HEADERS_NAMESPACE].struct_value)
    assert ratelimit == dict(allow.admission.headers)
    decision = fields[ext_proc.METADATA_NAMESPACE].struct_value
    assert decision["decision_id"] == "d" * len(ext_proc.DECISION_ID_SLOT)


async def test_cost_and_slots_still_ask_for_the_response(env: Env) -> None:
    allow = await complete(env, env.alice, {"prompt": "hi", "max_tokens": 10})
    assert isinstance(allow, Allow) and allow.admission is not None
    assert allow.admission.wants_end
    message = pb.ProcessingResponse.FromString(
        ext_proc.allowed(allow, "d" * len(ext_proc.DECISION_ID_SLOT), "request_headers")
    )
    assert message.mode_override.response_header_mode == message.mode_override.SEND
    allow.admission.close_soon()
    await asyncio.sleep(0)
