"""The inspect phase inside the decision core: rules scoped to input types, policy errors that
name the file and field, masking refused where the transport cannot rewrite the body."""

from __future__ import annotations

import base64
import io
import json
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from extproc.authn.apikey import ApiKeyStore, create_key
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny
from extproc.pipeline.run import DecisionCore
from extproc.policy.load import PolicyLoadError
from extproc.policy.store import PolicyStore

VISION = """
model: vision
routes: [{path_prefix: /v1/vision, methods: [POST]}]
versions: [{name: v1, cluster: vision-v1, default: true}]
authentication: [{api_key: {}}]
authorization:
  rules:
    - {name: callers, roles_any: [chat, vision]}
    - {name: images need the vision role, input_types: [image], roles_any: [vision]}
input:
  profile: openai_chat
  pii: {mask: [email]}
"""


def _png() -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _request(key: str, parts: list[object], rewrites_body: bool = True) -> RequestContext:
    body = json.dumps({"model": "vision", "messages": [{"role": "user", "content": parts}]})
    ctx = RequestContext(
        method="POST", path="/v1/vision", host="h",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json",
                 "content-length": str(len(body))},
        body=body.encode(),
    )  # fmt: skip
    ctx.rewrites_body = rewrites_body
    return ctx


@pytest.fixture
def setup(tmp_path: Path) -> tuple[DecisionCore, str, str]:
    keys = tmp_path / "keys.json"
    chat_key, _ = create_key(keys, "carl", tenant="t", roles=["chat"])
    vision_key, _ = create_key(keys, "vera", tenant="t", roles=["vision"])
    (tmp_path / "vision.yaml").write_text(textwrap.dedent(VISION))
    core = DecisionCore(PolicyStore(tmp_path, ApiKeyStore.load(keys), {}))
    return core, chat_key, vision_key


async def test_rules_scoped_to_input_types(setup: tuple[DecisionCore, str, str]) -> None:
    core, chat_key, vision_key = setup
    text = {"type": "text", "text": "hello"}
    image = {"type": "image_url", "image_url": {"url": _png()}}
    assert isinstance(await core.decide(_request(chat_key, [text])), Allow)
    refused = await core.decide(_request(chat_key, [text, image]))
    assert isinstance(refused, Deny) and refused.status == 403
    assert "images need the vision role" in refused.reason
    assert isinstance(await core.decide(_request(vision_key, [text, image])), Allow)


async def test_masked_body_replaces_the_request(setup: tuple[DecisionCore, str, str]) -> None:
    core, chat_key, _ = setup
    allow = await core.decide(_request(chat_key, [{"type": "text", "text": "to a@b.example"}]))
    assert isinstance(allow, Allow) and allow.body is not None
    assert json.loads(allow.body)["messages"][0]["content"][0]["text"] == "to [EMAIL]"
    # ext_authz cannot replace the body: a body that needs masking is refused instead.
    refused = await core.decide(
        _request(chat_key, [{"type": "text", "text": "to a@b.example"}], rewrites_body=False)
    )
    assert isinstance(refused, Deny) and refused.code == "sensitive_data"


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("input: {pii: {mask: [emial]}}", "input.pii"),
        ("output: {extraction: {score_fields: ['a..b']}}", "output.extraction.score_fields.0"),
        ("input: {json_schema: {file: missing.json}}", "input.json_schema.file"),
        ("input: {injection: {detector: 'no.such.module:make'}}", "input.injection.detector"),
        ("output: {redact: {mask: [email], style: hash, hash_key_env: NOPE_KEY}}",
         "output.redact.hash_key_env"),
        # A profile's limits without that profile would be silently unused.
        ("input: {chat: {max_messages: 4}}", "input"),
        ("input: {profile: openai_chat, tensors: {max_elements: 9}}", "input"),
    ],
)  # fmt: skip
def test_policy_errors_name_file_and_field(tmp_path: Path, section: str, field: str) -> None:
    base = textwrap.dedent(VISION).split("input:")[0]
    (tmp_path / "vision.yaml").write_text(base + section + "\n")
    with pytest.raises(PolicyLoadError) as info:
        PolicyStore(tmp_path, ApiKeyStore.load(tmp_path / "keys.json"), {})
    (error,) = info.value.errors
    assert error.file.endswith("vision.yaml")
    assert error.field == field


async def test_an_images_section_alone_has_images_checked(tmp_path: Path) -> None:
    """Limits on images inspect the body even when nothing else in `input` asks for it."""
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, "vera", tenant="t", roles=["vision"])
    base = textwrap.dedent(VISION).split("input:")[0]
    (tmp_path / "vision.yaml").write_text(base + "input: {images: {max_width: 4}}\n")
    core = DecisionCore(PolicyStore(tmp_path, ApiKeyStore.load(keys), {}))
    image = {"type": "image_url", "image_url": {"url": _png()}}  # 8 x 8 pixels
    denied = await core.decide(_request(key, [image]))
    assert isinstance(denied, Deny) and (denied.status, denied.code) == (413, "image_too_large")
    assert isinstance(await core.decide(_request(key, [{"type": "text", "text": "hi"}])), Allow)
