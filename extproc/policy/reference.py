"""JSON Schemas for policy files and the Markdown policy reference, generated from the models.

Both come from the pydantic models in `schema.py`: the JSON Schemas directly, the reference from
those schemas, so the reference never says something the schema (and so the loader) does not.
Output is deterministic (field order, no timestamps): the checked-in files are compared with it
by a unit test and by `extproc policy schema --check`. The schemas serve editors (completion and
inline errors through yaml-language-server); the loader remains the authority, and also checks
what a schema cannot say (one default version, known version names, CEL that compiles...).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from extproc.policy.schema import PlatformPolicy, Policy

POLICY_SCHEMA = "schema/policy.schema.json"
PLATFORM_SCHEMA = "schema/platform.schema.json"
REFERENCE = "docs/policy-reference.md"

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
Schema = dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Document:
    model: type[BaseModel]
    schema_path: str
    schema_id: str
    title: str  # the schema's
    heading: str  # the reference's section
    applies_to: str  # which files, as the reference names them


_DOCUMENTS = (
    _Document(Policy, POLICY_SCHEMA, "urn:extproc:schema:policy", "extproc model policy",
              "Model policy files", "`policies/<model>.yaml`, one file per model"),
    _Document(PlatformPolicy, PLATFORM_SCHEMA, "urn:extproc:schema:platform",
              "extproc platform policy", "The platform file",
              "`policies/_platform.yaml`, the platform team's file"),
)  # fmt: skip


class _WithFactoryDefaults(GenerateJsonSchema):
    """Also shows defaults built by a default_factory (`[]`, nested sections), which pydantic
    leaves out: editors and the reference should show every default."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()  # type: ignore[call-arg]
        return super().get_default_value(schema)

    def dict_schema(self, schema: core_schema.DictSchema) -> JsonSchemaValue:
        generated = super().dict_schema(schema)
        # Keys with a pattern (class names) come as patternProperties, which alone would let
        # any other key through; the loader refuses them, so the schema does too.
        if "patternProperties" in generated and "additionalProperties" not in generated:
            generated["additionalProperties"] = False
        return generated


def json_schema(model: type[BaseModel]) -> Schema:
    """The JSON Schema (2020-12) of a policy file described by `model`."""
    doc = next(d for d in _DOCUMENTS if d.model is model)
    generated = model.model_json_schema(schema_generator=_WithFactoryDefaults)
    generated.pop("title", None)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": doc.schema_id,
        "title": doc.title,
        **generated,
    }


def schema_text(model: type[BaseModel]) -> str:
    return json.dumps(json_schema(model), indent=2, ensure_ascii=False) + "\n"


def generated_files() -> dict[str, str]:
    """Every generated file: its path relative to the repository root, and its text."""
    files = {doc.schema_path: schema_text(doc.model) for doc in _DOCUMENTS}
    files[REFERENCE] = reference_markdown()
    return files


def stale_files(root: Path) -> list[str]:
    """The generated files under `root` that are missing or differ from the generator's."""
    stale = []
    for name, text in generated_files().items():
        path = root / name
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            stale.append(name)
    return stale


def write_files(root: Path) -> list[Path]:
    written = []
    for name, text in generated_files().items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# --- the Markdown reference ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldDoc:
    path: str  # e.g. quotas.rules[].limit
    type: str
    required: bool
    default: str  # "" when none (required, or absent means "off")
    allowed: str
    description: str


@dataclass(frozen=True, slots=True)
class SectionDoc:
    path: str  # the object's path, "" for the top level
    description: str
    fields: tuple[FieldDoc, ...]


def sections(schema: Schema) -> list[SectionDoc]:
    """The schema's objects, depth first in field order, each with its fields."""
    out: list[SectionDoc] = []
    _walk(schema, schema, "", out, frozenset())
    return out


def _walk(
    root: Schema, node: Schema, path: str, out: list[SectionDoc], seen: frozenset[str]
) -> None:
    required = set(node.get("required", ()))
    fields: list[FieldDoc] = []
    children: list[tuple[str, Schema, str]] = []
    for name, prop in node.get("properties", {}).items():
        field_path = f"{path}.{name}" if path else name
        fields.append(_field(root, field_path, prop, name in required))
        children.extend(_objects_in(root, field_path, prop))
    description = "" if not path else _text(node.get("description", ""))
    out.append(SectionDoc(path, description, tuple(fields)))
    for child_path, child, ref in children:
        if ref not in seen:  # a recursive model would otherwise never end
            _walk(root, child, child_path, out, seen | {ref})


def _resolve(root: Schema, node: Schema) -> tuple[Schema, str]:
    ref = node.get("$ref")
    if ref is None:
        return node, ""
    name = ref.removeprefix("#/$defs/")
    return root["$defs"][name], name


def _objects_in(root: Schema, path: str, prop: Schema) -> Iterator[tuple[str, Schema, str]]:
    """The documented objects a property holds: itself, its items, its map values."""
    node, ref = _resolve(root, prop)
    if "properties" in node:
        yield path, node, ref
    for branch in node.get("anyOf", ()):
        yield from _objects_in(root, path, branch)
    if isinstance(node.get("items"), dict):
        yield from _objects_in(root, f"{path}[]", node["items"])
    values = _map_values(node)
    if values is not None:
        yield from _objects_in(root, f"{path}.<name>", values)


def _map_values(node: Schema) -> Schema | None:
    """The schema of a map's values (pydantic writes patternProperties for keys with a
    pattern), or None when the node is no map of a known value type."""
    if isinstance(node.get("additionalProperties"), dict):
        values: Schema = node["additionalProperties"]
        return values
    patterns = node.get("patternProperties", {})
    return next(iter(patterns.values())) if len(patterns) == 1 else None


def _field(root: Schema, path: str, prop: Schema, required: bool) -> FieldDoc:
    type_text, allowed = _describe(root, prop)
    # A field without its own description is described by the object it holds, if any.
    description = prop.get("description") or next(
        (obj["description"] for _, obj, _ in _objects_in(root, path, prop) if "description" in obj),
        "",
    )
    return FieldDoc(
        path=path,
        type=type_text,
        required=required,
        default=_default(root, prop),
        allowed=allowed,
        description=_text(description),
    )


def _describe(root: Schema, prop: Schema) -> tuple[str, str]:
    """(type, allowed values) of a property, in words."""
    node = _resolve(root, prop)[0]
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        nullable = len(branches) < len(node["anyOf"])
        described = [_describe(root, b) for b in branches]
        types = " or ".join(_grouped(t) for t, _ in described) + (" or null" if nullable else "")
        return types, "; ".join(a for _, a in described if a)
    if "properties" in node:
        return "object", ""
    if "const" in node:
        return node.get("type", "value"), f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return node.get("type", "value"), "one of " + ", ".join(
            f"`{json.dumps(v)}`" for v in node["enum"]
        )
    kind = node.get("type", "any")
    if kind == "array":
        return _describe_array(root, node)
    if kind == "object":
        return _describe_map(root, node)
    if kind == "any" and not node:
        return "any", ""
    limits = _limits(node)
    if node.get("format") == "uri":
        return "string (URL)", limits
    return str(kind), limits


def _describe_array(root: Schema, node: Schema) -> tuple[str, str]:
    if "prefixItems" in node:
        parts = [_describe(root, p) for p in node["prefixItems"]]
        allowed = "; ".join(a for _, a in parts if a)
        return "[" + ", ".join(t for t, _ in parts) + "]", allowed
    sizes = []
    if "minItems" in node:
        sizes.append(f"at least {_items(node['minItems'])}")
    if "maxItems" in node:
        sizes.append(f"at most {_items(node['maxItems'])}")
    item_type, item_allowed = _describe(root, node.get("items", {}))
    allowed = ", ".join(sizes)
    if item_allowed:
        allowed = f"{allowed}; each: {item_allowed}" if allowed else f"each: {item_allowed}"
    return f"list of {_grouped(item_type)}", allowed


def _describe_map(root: Schema, node: Schema) -> tuple[str, str]:
    values = _map_values(node)
    if values is None:
        return "object (any JSON)", ""
    value_type, value_allowed = _describe(root, values)
    patterns = list(node.get("patternProperties", {}))
    keys = node.get("propertyNames") or ({"pattern": patterns[0]} if patterns else {})
    allowed = [f"keys: {_limits(keys)}"] if _limits(keys) else []
    if value_allowed:
        allowed.append(f"values: {value_allowed}")
    return f"map of string to {_grouped(value_type)}", "; ".join(allowed)


def _grouped(type_text: str) -> str:
    """A type inside another, bracketed when it is a choice: list of (string or integer)."""
    depth, top_level = 0, ""
    for char in type_text:  # only a choice outside brackets needs them
        depth += {"(": 1, ")": -1}.get(char, 0)
        top_level += char if depth == 0 else ""
    return f"({type_text})" if " or " in top_level else type_text


def _items(count: int) -> str:
    return f"{count} item" if count == 1 else f"{count} items"


def _limits(node: Schema) -> str:
    parts = []
    for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                      ("maximum", "≤"), ("exclusiveMaximum", "<")):  # fmt: skip
        if key in node:
            parts.append(f"{sign} {node[key]}")
    if "minLength" in node and "maxLength" in node:
        parts.append(f"length {node['minLength']} to {node['maxLength']}")
    elif "minLength" in node:
        parts.append(f"length ≥ {node['minLength']}")
    elif "maxLength" in node:
        parts.append(f"length ≤ {node['maxLength']}")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    return ", ".join(parts)


def _default(root: Schema, prop: Schema) -> str:
    if "default" not in prop:
        return ""
    value = prop["default"]
    if isinstance(value, dict) and value and any(_objects_in(root, "", prop)):
        return "see its fields"  # a whole section's defaults, each shown on its own field
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _cell(text: str) -> str:
    # GitHub tables split on `|` even inside code spans unless it is escaped.
    return text.replace("|", "\\|")


def _table(section: SectionDoc) -> list[str]:
    lines = [
        "| Field | Type | Required | Default | Allowed | Description |",
        "|---|---|---|---|---|---|",
    ]
    for f in section.fields:
        cells = (f"`{f.path}`", f.type, "yes" if f.required else "", f.default, f.allowed,
                 f.description)  # fmt: skip
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


_INTRO = """\
# Policy reference

Every field of a model's policy file and of the platform's `_platform.yaml`: its type, whether
it is required, its default, the values it allows and what it does. Generated from the pydantic
models in `extproc/policy/schema.py`, through the JSON Schemas in `schema/`: do not edit it by
hand; after changing the models run `make docs` (`extproc policy schema`).

Paths read as in error messages: `authorization.rules[]` is each entry of the list, `.<name>`
each key of a map. Unknown fields are errors. The loader also checks what a schema cannot say
(exactly one default version, rules naming known versions, CEL that compiles, the platform's
floors): run `extproc policy check DIR`, and `extproc policy lint DIR` for rules that can never
apply or pass, redundant rules and fail-open settings.

Editors with yaml-language-server (the VS Code YAML extension, for example) complete and check
policy files with a first line such as

```yaml
# yaml-language-server: $schema=../schema/policy.schema.json
```

(`../schema/platform.schema.json` in `_platform.yaml`), or with the `yaml.schemas` setting.
"""


def reference_markdown() -> str:
    lines = [_INTRO]
    for doc in _DOCUMENTS:
        schema = json_schema(doc.model)
        lines += [f"## {doc.heading}", "",
                  f"{doc.applies_to}; JSON Schema `{doc.schema_path}`.", ""]  # fmt: skip
        if schema.get("description"):
            lines += [_text(schema["description"]), ""]
        for section in sections(schema):
            title = f"`{section.path}`" if section.path else "Top level"
            lines += [f"### {title}", ""]
            if section.description:
                lines += [section.description, ""]
            lines += [*_table(section), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def field_paths(schema: Schema) -> list[str]:
    """Every documented field path of a schema, e.g. `quotas.rules[].limit`."""
    return [f.path for s in sections(schema) for f in s.fields]
