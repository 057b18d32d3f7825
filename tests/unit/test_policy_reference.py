"""The policy JSON Schemas and reference: checked in up to date, faithful to the models, and
usable by editors (they accept the shipped policies and refuse what the loader refuses)."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from extproc.cli import main
from extproc.policy.reference import (
    PLATFORM_SCHEMA,
    POLICY_SCHEMA,
    REFERENCE,
    field_paths,
    generated_files,
    json_schema,
    reference_markdown,
)
from extproc.policy.schema import PlatformPolicy, Policy, Rule

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"


def validator(name: str) -> Any:
    return jsonschema_rs.validator_for(json.loads((REPO / name).read_text()))


def schema_for(path: Path) -> str:
    return PLATFORM_SCHEMA if path.name == "_platform.yaml" else POLICY_SCHEMA


# --- checked in and up to date --------------------------------------------------------------


@pytest.mark.parametrize("name", [POLICY_SCHEMA, PLATFORM_SCHEMA, REFERENCE])
def test_checked_in_files_match_the_generator(name: str) -> None:
    checked_in = (REPO / name).read_text(encoding="utf-8")
    assert checked_in == generated_files()[name], f"{name} is stale: run `make docs`"


def test_schemas_are_json_schema_2020_12_with_ids_and_titles() -> None:
    for model, name in ((Policy, POLICY_SCHEMA), (PlatformPolicy, PLATFORM_SCHEMA)):
        schema = json.loads((REPO / name).read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"].startswith("urn:extproc:schema:")
        assert schema["title"] and schema["description"]
        assert jsonschema_rs.meta.is_valid(schema)
        assert schema == json_schema(model)
    ids = {json.loads((REPO / n).read_text())["$id"] for n in (POLICY_SCHEMA, PLATFORM_SCHEMA)}
    assert len(ids) == 2


def test_defaults_from_factories_are_shown() -> None:
    schema = json_schema(Policy)
    rule = schema["$defs"]["Rule"]["properties"]
    assert rule["dry_run"]["default"] is False
    assert schema["properties"]["aliases"]["default"] == []  # a default_factory
    assert schema["$defs"]["Tenancy"]["properties"]["headers"]["default"] == []
    assert schema["properties"]["quotas"]["default"]["on_store_failure"] == "fail_closed"


# --- the schemas accept what the loader accepts, and refuse what it refuses ----------------


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.yaml")), ids=lambda p: p.name)
def test_schema_accepts_every_shipped_policy(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    errors = [e.message for e in validator(schema_for(path)).iter_errors(doc)]
    assert errors == []


def _iris() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((POLICIES / "iris.yaml").read_text())
    return doc


BROKEN: list[tuple[str, str, Any, list[str | int]]] = [
    # (case, where to change, new value, instance path of the expected schema error)
    ("unknown top-level field", "owner", "me", []),
    ("typo in a rule", "authorization.rules.0.role_any", ["x"], ["authorization", "rules", 0]),
    ("string for a list", "authorization.rules.0.tenants", "demo",
     ["authorization", "rules", 0, "tenants"]),
    ("string for an integer", "input.max_body_bytes", "lots", ["input", "max_body_bytes"]),
    ("value out of range", "versions.0.weight", 101, ["versions", 0, "weight"]),
    # `jwt` may also be null, so the error is reported where the choice is.
    ("unknown enum value", "authentication.0.jwt.algorithms", ["none"],
     ["authentication", 0, "jwt"]),
    ("pattern", "model", "Iris Model!", ["model"]),
    ("missing required", "authorization", None, []),
    ("bad key in a map", "quotas", {"rules": [{"name": "r", "limit": 5, "window": "1m",
                                               "classes": {"Free Tier": 1}}]},
     ["quotas", "rules", 0, "classes"]),
]  # fmt: skip


def _change(doc: dict[str, Any], where: str, value: Any) -> None:
    *parents, last = where.split(".")
    target: Any = doc
    for key in parents:
        target = target[int(key)] if key.isdigit() else target.setdefault(key, {})
    if value is None:
        del target[last]
    else:
        target[last] = value


@pytest.mark.parametrize(("case", "where", "value", "path"), BROKEN, ids=[c[0] for c in BROKEN])
def test_schema_refuses_broken_policies_like_the_loader(
    case: str, where: str, value: Any, path: list[str | int]
) -> None:
    doc = _iris()
    _change(doc, where, value)
    errors = list(validator(POLICY_SCHEMA).iter_errors(doc))
    assert [list(e.instance_path) for e in errors] == [path], [e.message for e in errors]
    with pytest.raises(ValidationError):
        Policy.model_validate(doc)


def test_platform_schema_refuses_an_unknown_floor() -> None:
    doc = yaml.safe_load((POLICIES / "_platform.yaml").read_text())
    assert validator(PLATFORM_SCHEMA).is_valid(doc)
    doc["floors"]["require_tenants"] = True
    errors = list(validator(PLATFORM_SCHEMA).iter_errors(doc))
    assert [list(e.instance_path) for e in errors] == [["floors"]]
    assert "require_tenants" in errors[0].message
    # A model's policy is not a platform file, nor the reverse.
    assert not validator(PLATFORM_SCHEMA).is_valid(_iris())
    assert not validator(POLICY_SCHEMA).is_valid(
        yaml.safe_load((POLICIES / "_platform.yaml").read_text())
    )


# --- the reference documents every field ----------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's type holds: directly, in a list, a map or a union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        args = args[:1]
    return [m for arg in args for m in _models_in(arg)]


def _suffix(annotation: Any) -> str:
    """How the reference writes the step into a nested model: `[]` for lists, `.<name>` maps."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _suffix(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return next((s for a in typing.get_args(annotation) if (s := _suffix(a))), "")
    if origin is list:
        return "[]"
    if origin is dict:
        return ".<name>"
    return ""


def model_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field path of a model, walked from the pydantic fields (not the schema)."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}.{info.alias or name}" if prefix else (info.alias or name)
        paths.append(path)
        for nested in _models_in(info.annotation):
            paths += model_paths(nested, path + _suffix(info.annotation))
    return paths


@pytest.mark.parametrize("model", [Policy, PlatformPolicy])
def test_every_model_field_is_in_the_reference(model: type[BaseModel]) -> None:
    reference = reference_markdown()
    paths = model_paths(model)
    assert "quotas.rules[].limit" in paths or model is PlatformPolicy  # the walk goes deep
    assert "authentication[].jwt.claims.roles" in paths or model is PlatformPolicy
    missing = [p for p in paths if f"| `{p}` |" not in reference]
    assert missing == []
    assert sorted(field_paths(json_schema(model))) == sorted(paths)  # and nothing else


def _row(path: str, reference: str | None = None) -> list[str]:
    """The reference table cells of a field path (`reference`: the text, when already made)."""
    text = reference_markdown() if reference is None else reference
    line = next(line for line in text.splitlines() if line.startswith(f"| `{path}` |"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def test_reference_rows_carry_type_required_default_range_and_description() -> None:
    assert _row("quotas.rules[].limit") == [
        "`quotas.rules[].limit`", "integer", "yes", "", "≥ 1, ≤ 1000000000000",
        "Units per window (requests, cost) or requests in flight (concurrency); also the "
        "maximum when the limit comes from the caller (limit_from) or a class.",
    ]  # fmt: skip
    pin = _row("routing.pin_header")
    assert pin[1:5] == ["string or null", "", '`"x-model-version"`', "pattern `^[a-z0-9-]{1,64}$`"]
    assert _row("quotas.on_store_failure")[4] == 'one of `"fail_closed"`, `"local"`'
    description = Rule.model_fields["principals"].description
    assert description is not None and _row("authorization.rules[].principals")[5] == description
    # A pipe inside a cell is escaped, or the table would gain a column.
    assert "(ms\\|s\\|m\\|h\\|d)" in _row("quotas.rules[].window")[4]


@pytest.mark.parametrize("model", [Policy, PlatformPolicy])
def test_every_field_has_a_description(model: type[BaseModel]) -> None:
    # Model owners read the reference: a field without a description is a row that says nothing.
    reference = reference_markdown()
    undescribed = [p for p in model_paths(model) if not _row(p, reference)[-1]]
    assert undescribed == []


# --- the command ----------------------------------------------------------------------------


def test_schema_command_writes_and_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "schema", "--out-dir", str(tmp_path)]) == 0
    for name, text in generated_files().items():
        assert (tmp_path / name).read_text(encoding="utf-8") == text
    capsys.readouterr()
    assert main(["policy", "schema", "--check", "--out-dir", str(tmp_path)]) == 0

    (tmp_path / POLICY_SCHEMA).write_text("{}\n")
    (tmp_path / REFERENCE).unlink()
    assert main(["policy", "schema", "--check", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / POLICY_SCHEMA}: stale" in err
    assert f"{tmp_path / REFERENCE}: stale" in err
    assert PLATFORM_SCHEMA not in err
    # --check writes nothing.
    assert (tmp_path / POLICY_SCHEMA).read_text() == "{}\n"
    assert not (tmp_path / REFERENCE).exists()


def test_schema_check_passes_on_the_repository() -> None:
    assert main(["policy", "schema", "--check", "--out-dir", str(REPO)]) == 0
