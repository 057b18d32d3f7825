"""Reading policy files: strict YAML, then the schema; every error names the file and field."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from extproc.policy.schema import PlatformPolicy, Policy

MAX_POLICY_BYTES = 1024 * 1024
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class PolicyError:
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        return f"{where}: {self.message}"


class PolicyLoadError(Exception):
    def __init__(self, errors: list[PolicyError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: YAML would silently keep the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _pydantic_errors(file: str, exc: ValidationError) -> list[PolicyError]:
    errors = []
    for err in exc.errors(include_url=False, include_input=False):
        # Validators on a model report loc of the model itself; union branches add their tag.
        loc = tuple(p for p in err["loc"] if p not in ("function-after[_one_key_source()]",))
        message = err["msg"].removeprefix("Value error, ")
        errors.append(PolicyError(file, _field_path(loc), message))
    return errors


@dataclass(frozen=True, slots=True)
class PolicyFile:
    path: Path
    policy: Policy
    digest: str


@dataclass(frozen=True, slots=True)
class PlatformFile:
    path: Path | None  # None: the directory has no platform file
    platform: PlatformPolicy
    digest: str


PLATFORM_FILE = "_platform.yaml"
NO_PLATFORM = PlatformFile(None, PlatformPolicy(), "")


def read_policy_file(path: Path) -> PolicyFile:
    """One model's file, validated. Raises PolicyLoadError naming the file and field."""
    policy, digest = _read_validated(path, Policy)
    return PolicyFile(path=path, policy=policy, digest=digest)


def read_platform_file(directory: Path) -> PlatformFile:
    """The directory's `_platform.yaml`, validated; NO_PLATFORM when there is none."""
    path = directory / PLATFORM_FILE
    if not path.is_file():
        return NO_PLATFORM
    platform, digest = _read_validated(path, PlatformPolicy)
    return PlatformFile(path=path, platform=platform, digest=digest)


def _read_validated(path: Path, schema: type[M]) -> tuple[M, str]:
    """The file validated against `schema`, and the SHA-256 of its bytes."""
    raw, data = _read_document(path)
    try:
        validated = schema.model_validate(data)
    except ValidationError as exc:
        raise PolicyLoadError(_pydantic_errors(str(path), exc)) from None
    return validated, hashlib.sha256(raw).hexdigest()


def _read_document(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes and its YAML mapping, bounded in size and strict about keys."""
    name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyLoadError([PolicyError(name, "", f"cannot read: {exc.strerror}")]) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyLoadError([PolicyError(name, "", f"larger than {MAX_POLICY_BYTES} bytes")])
    try:
        data = yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyLoadError([PolicyError(name, "", f"invalid YAML: {where}{problem}")]) from None
    if not isinstance(data, dict):
        raise PolicyLoadError([PolicyError(name, "", "expected a mapping at the top level")])
    return raw, data


def read_policy_dir(directory: Path) -> list[PolicyFile]:
    """Every model's `*.yaml` / `*.yml` file, sorted (not the platform's `_platform.yaml`);
    all errors of all files are collected."""
    if not directory.is_dir():
        raise PolicyLoadError([PolicyError(str(directory), "", "not a directory")])
    paths = sorted(
        p
        for p in directory.iterdir()
        if p.suffix in (".yaml", ".yml") and p.is_file() and p.name != PLATFORM_FILE
    )
    if not paths:
        raise PolicyLoadError([PolicyError(str(directory), "", "no policy files (*.yaml)")])
    files, errors = [], []
    for path in paths:
        try:
            files.append(read_policy_file(path))
        except PolicyLoadError as exc:
            errors.extend(exc.errors)
    if errors:
        raise PolicyLoadError(errors)
    return files
