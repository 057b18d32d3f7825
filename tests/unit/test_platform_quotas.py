"""The platform's quota defaults (`_platform.yaml`): per tenant class, for every model, replaced
by a model's own rule of the same name; its errors name its file and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from extproc.authn.apikey import ApiKeyStore, create_key
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny
from extproc.pipeline.run import DecisionCore
from extproc.policy.load import PolicyLoadError
from extproc.policy.store import PolicyStore
from extproc.quota.admit import QuotaEngine
from extproc.quota.memory import MemoryStore

PLATFORM = """
description: platform defaults
quotas:
  class_claim: plan
  default_class: free
  defaults:
    - name: tenant-daily
      key: [tenant, model]
      limit: 5
      window: 1d
      classes: {free: 2, pro: 4}
"""


def model(name: str, quotas: str = "") -> str:
    return textwrap.dedent(f"""
        model: {name}
        routes: [{{path_prefix: /v2/models/{name}, methods: [POST]}}]
        versions: [{{name: v1, cluster: {name}-v1}}]
        authentication: [{{api_key: {{header: x-api-key}}}}]
        authorization: {{allow_any_authenticated: true}}
        """) + textwrap.dedent(quotas)


class Env:
    def __init__(self, root: Path) -> None:
        keys = root / "keys.json"
        self.free, _ = create_key(keys, "fay", tenant="t-free", metadata={"plan": "free"})
        self.pro, _ = create_key(keys, "pia", tenant="t-pro", metadata={"plan": "pro"})
        self.big, _ = create_key(keys, "ben", tenant="t-big", metadata={"plan": "enterprise"})
        self.none, _ = create_key(keys, "nia", tenant="t-none")
        self.root = root
        (root / "_platform.yaml").write_text(textwrap.dedent(PLATFORM))
        (root / "plain.yaml").write_text(model("plain"))
        own = """
            quotas:
              rules:
                - {name: tenant-daily, key: [tenant], limit: 3, window: 1d}
        """
        (root / "own.yaml").write_text(model("own", own))
        self.policies = PolicyStore(root, ApiKeyStore.load(keys), {})
        self.core = DecisionCore(self.policies, QuotaEngine(MemoryStore()))

    async def admitted(self, name: str, key: str, n: int = 8) -> int:
        count = 0
        for _ in range(n):
            ctx = RequestContext(
                method="POST", path=f"/v2/models/{name}", host="h", headers={"x-api-key": key}
            )
            decision = await self.core.decide(ctx)
            assert isinstance(decision, Allow | Deny)
            count += isinstance(decision, Allow)
        return count


async def test_defaults_per_tenant_class_apply_to_every_model(tmp_path: Path) -> None:
    env = Env(tmp_path)
    assert await env.admitted("plain", env.free) == 2
    assert await env.admitted("plain", env.pro) == 4
    assert await env.admitted("plain", env.big) == 5  # a class without its own limit
    assert await env.admitted("plain", env.none) == 2  # no class: the platform's default_class


async def test_a_models_rule_of_the_same_name_replaces_the_default(tmp_path: Path) -> None:
    env = Env(tmp_path)
    assert await env.admitted("own", env.pro) == 3
    assert await env.admitted("own", env.free) == 3
    ctx = RequestContext(
        method="POST", path="/v2/models/own", host="h", headers={"x-api-key": env.big}
    )
    allow = await env.core.decide(ctx)
    assert isinstance(allow, Allow) and allow.admission is not None
    assert dict(allow.admission.headers)["ratelimit-policy"] == '"tenant-daily";q=3;w=86400'


async def test_the_platform_file_changes_the_revision(tmp_path: Path) -> None:
    env = Env(tmp_path)
    before = env.policies.current.revision
    (tmp_path / "_platform.yaml").write_text(textwrap.dedent(PLATFORM).replace("5", "6"))
    assert env.policies.reload()
    assert env.policies.current.revision != before


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("quotas: {defualts: []}\n", "quotas.defualts", "Extra inputs are not permitted"),
        (
            "quotas: {defaults: [{name: a, limit: 1, window: 1m, versions: [v1]}]}\n",
            "quotas",
            "versions belong in a model's policy",
        ),
        (
            "quotas: {defaults: [{name: a, kind: cost, limit: 9, window: 1m,"
            " cost: {estimate: 'max_tokens +'}}]}\n",
            "quotas.defaults.0.cost.estimate",
            "",
        ),
        (
            "quotas: {defaults: [{name: a, limit: 1, window: 1m},"
            " {name: a, limit: 2, window: 1m}]}\n",
            "quotas",
            "unique",
        ),
    ],
)
def test_platform_errors_name_the_file_and_field(
    tmp_path: Path, text: str, field: str, message: str
) -> None:
    keys = tmp_path / "keys.json"
    create_key(keys, "x")
    (tmp_path / "plain.yaml").write_text(model("plain"))
    (tmp_path / "_platform.yaml").write_text(text)
    with pytest.raises(PolicyLoadError) as caught:
        PolicyStore(tmp_path, ApiKeyStore.load(keys), {})
    errors = caught.value.errors
    assert len(errors) == 1, errors
    assert errors[0].file.endswith("_platform.yaml")
    assert errors[0].field == field
    assert message in errors[0].message
