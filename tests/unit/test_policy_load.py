"""Policy files: valid ones load; each kind of mistake names the file, the field and the rule."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.policy.load import PolicyLoadError, read_policy_dir, read_policy_file

BASE: dict[str, Any] = {
    "model": "chat",
    "routes": [{"path_prefix": "/v1/chat/completions", "select_by_body_model": True}],
    "versions": [
        {"name": "v1", "cluster": "chat-v1", "default": True},
        {"name": "v2", "cluster": "chat-v2"},
    ],
    "authentication": [{"api_key": {"header": "x-api-key"}}],
    "authorization": {"rules": [{"name": "tenant", "tenants": ["demo"]}]},
}


def write(tmp_path: Path, doc: Any, name: str = "chat.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def test_base_policy_is_valid(tmp_path: Path) -> None:
    pf = read_policy_file(write(tmp_path, BASE))
    assert pf.policy.model == "chat"
    assert pf.policy.default_version().name == "v1"
    assert len(pf.digest) == 64


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    target: Any = doc
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    if value is _DELETE:
        del target[last]
    elif last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value


_DELETE = object()

CASES = [
    # (case, field path to change, new value, expected field in error, expected message part)
    ("unknown top-level field", "owner", "me", "owner", "Extra inputs are not permitted"),
    ("typo in a rule", "authorization.rules.0.role_any", ["x"], "authorization.rules[0].role_any",
     "Extra inputs are not permitted"),
    ("missing model", "model", _DELETE, "model", "Field required"),
    ("bad model name", "model", "Chat Model!", "model", "should match pattern"),
    ("no routes", "routes", [], "routes", "at least 1 item"),
    ("relative path prefix", "routes.0.path_prefix", "v1/chat", "routes[0].path_prefix",
     "should match pattern"),
    ("two defaults", "versions.1.default", True, "", "exactly one version must have default"),
    ("duplicate version", "versions.1.name", "v1", "", "version names must be unique"),
    ("rule on unknown version", "authorization.rules.0.versions", ["v9"], "",
     "names unknown versions ['v9']"),
    ("rule without condition", "authorization.rules.0", {"name": "open"},
     "authorization.rules[0]", "has no condition"),
    ("empty list in rule", "authorization.rules.0.tenants", [], "authorization.rules[0]",
     "empty list"),
    ("no rules and not explicit", "authorization.rules", [], "authorization",
     "allow_any_authenticated"),
    ("no auth methods", "authentication", [], "authentication", "at least 1 item"),
    ("two methods in one entry", "authentication.0",
     {"api_key": {}, "jwt": {"issuer": "i", "audiences": ["a"], "algorithms": ["ES256"],
                             "jwks_file": "k.json"}},
     "authentication[0]", "exactly one of: jwt, api_key"),
    ("api key in reserved header", "authentication.0.api_key.header", "x-gateway-principal",
     "authentication[0].api_key", "reserved"),
    ("jwt without key source", "authentication.0",
     {"jwt": {"issuer": "i", "audiences": ["a"], "algorithms": ["ES256"]}},
     "authentication[0].jwt", "exactly one of jwks_file, jwks_url, hs256_secret_env"),
    ("HS256 from a JWKS", "authentication.0",
     {"jwt": {"issuer": "i", "audiences": ["a"], "algorithms": ["HS256"], "jwks_file": "k"}},
     "authentication[0].jwt", "HS256 needs hs256_secret_env"),
    ("alg none", "authentication.0",
     {"jwt": {"issuer": "i", "audiences": ["a"], "algorithms": ["none"], "jwks_file": "k"}},
     "authentication[0].jwt.algorithms[0]", "Input should be"),
    ("leeway too large", "authentication.0",
     {"jwt": {"issuer": "i", "audiences": ["a"], "algorithms": ["ES256"], "jwks_file": "k",
              "leeway_seconds": 3600}},
     "authentication[0].jwt.leeway_seconds", "less than or equal to 300"),
    ("no audience", "authentication.0",
     {"jwt": {"issuer": "i", "audiences": [], "algorithms": ["ES256"], "jwks_file": "k"}},
     "authentication[0].jwt.audiences", "at least 1 item"),
    ("quota without window", "quotas", {"rules": [{"name": "r", "limit": 5}]},
     "quotas.rules[0]", "window is required for requests"),
    ("quota window too long", "quotas", {"rules": [{"name": "r", "limit": 5, "window": "2d"}]},
     "quotas.rules[0]", "window must be between 1s and 1d"),
    ("quota window unit", "quotas", {"rules": [{"name": "r", "limit": 5, "window": "5y"}]},
     "quotas.rules[0].window", "should match pattern"),
    ("quota zero limit", "quotas", {"rules": [{"name": "r", "limit": 0, "window": "1m"}]},
     "quotas.rules[0].limit", "greater than or equal to 1"),
    ("quota unknown key part", "quotas",
     {"rules": [{"name": "r", "limit": 5, "window": "1m", "key": ["ip"]}]},
     "quotas.rules[0].key[0]", "Input should be"),
    ("concurrency with window", "quotas",
     {"rules": [{"name": "r", "kind": "concurrency", "limit": 5, "window": "1m"}]},
     "quotas.rules[0]", "concurrency has no window"),
    ("cost without expression", "quotas",
     {"rules": [{"name": "r", "kind": "cost", "limit": 5, "window": "1m"}]},
     "quotas.rules[0]", "`cost` is required for, and only for, kind cost"),
    ("burst on a window", "quotas",
     {"rules": [{"name": "r", "limit": 5, "window": "1m", "algorithm": "fixed_window",
                 "burst": 2}]},
     "quotas.rules[0]", "burst is only for algorithm gcra"),
    ("class above the limit", "quotas",
     {"rules": [{"name": "r", "limit": 5, "window": "1m", "classes": {"pro": 50}}]},
     "quotas.rules[0]", "class 'pro' limit 50 exceeds limit 5"),
    ("duplicate quota names", "quotas",
     {"rules": [{"name": "r", "limit": 5, "window": "1m"}, {"name": "r", "limit": 1,
                                                              "window": "1s"}]},
     "quotas", "quota rule names must be unique"),
    ("quota on unknown version", "quotas",
     {"rules": [{"name": "r", "limit": 5, "window": "1m", "versions": ["v9"]}]},
     "", "quota 'r' names unknown versions ['v9']"),
    ("bad store failure mode", "quotas", {"on_store_failure": "open"},
     "quotas.on_store_failure", "Input should be"),
    ("overload share above 1", "quotas",
     {"overload": {"max_in_flight": 10, "class_shares": {"free": 1.5}}},
     "quotas.overload.class_shares.free", "less than or equal to 1"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "value", "field", "message"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_invalid_policy_names_file_and_field(
    tmp_path: Path, change: str, value: Any, field: str, message: str
) -> None:
    doc = copy.deepcopy(BASE)
    _set(doc, change, value)
    path = write(tmp_path, doc)
    with pytest.raises(PolicyLoadError) as info:
        read_policy_file(path)
    errors = info.value.errors
    assert any(e.file == str(path) and e.field == field and message in e.message for e in errors), [
        str(e) for e in errors
    ]
    assert str(path) in str(info.value)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE) + "model: other\n"
    with pytest.raises(PolicyLoadError, match="duplicate key 'model'"):
        read_policy_file(write(tmp_path, text))


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match=r"invalid YAML: line 3, column 3"):
        read_policy_file(write(tmp_path, "model: a\nroutes: [\n  - x: : y\n"))


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="expected a mapping"):
        read_policy_file(write(tmp_path, "- a\n- b\n"))


def test_directory_collects_errors_of_every_file(tmp_path: Path) -> None:
    write(tmp_path, {**BASE, "extra": 1}, "a.yaml")
    write(tmp_path, {**BASE, "model": "UPPER"}, "b.yml")
    write(tmp_path, "ignored", "notes.txt")
    with pytest.raises(PolicyLoadError) as info:
        read_policy_dir(tmp_path)
    files = {Path(e.file).name for e in info.value.errors}
    assert files == {"a.yaml", "b.yml"}


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="no policy files"):
        read_policy_dir(tmp_path)
