"""Render the shipped Envoy bootstrap templates (envoy/ext_proc.yaml, envoy/ext_authz.yaml).

The templates are plain YAML with ``${name}`` placeholders (string.Template) so a platform
engineer can read them as they are; this module only fills in ports, hosts and paths.
``substitute`` (not ``safe_substitute``) is used on purpose: a placeholder without a value
raises instead of leaving ``${...}`` in a config that Envoy would then reject or misread.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Template = Literal["ext_proc", "ext_authz"]
TEMPLATES: tuple[Template, ...] = ("ext_proc", "ext_authz")


def _find_envoy_dir() -> Path:
    # The package is installed editable from the repository, so the templates sit next to it.
    candidate = Path(__file__).resolve().parent.parent / "envoy"
    if not (candidate / "ext_proc.yaml").is_file():
        raise FileNotFoundError(
            f"Envoy templates not found at {candidate}: extproc.envoyconf expects the "
            "repository layout (install the package editable: pip install -e .)"
        )
    return candidate


ENVOY_DIR: Path = _find_envoy_dir()

# Hostnames as Envoy's STRICT_DNS cluster and our YAML quoting accept them.
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class EnvoyValues:
    """Every value the templates need. ``render`` maps field names to ``${field}``."""

    listen_address: str
    listen_port: int
    admin_port: int
    decision_host: str
    decision_port: int
    sds_dir: Path
    access_log_path: Path
    chat_v1_port: int
    chat_v2_port: int
    oip_v1_port: int
    # Per-message deadline towards the decision server (ext_proc message_timeout, ext_authz
    # gRPC timeout). Rendered as ``${ext_timeout_ms}`` and, because Envoy's YAML wants a
    # protobuf Duration ("0.250s", not "250ms"), as ``${ext_timeout}``.
    ext_timeout_ms: int = 250

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_port") and not (isinstance(value, int) and 0 < value < 65536):
                raise ValueError(f"{f.name} must be a TCP port (1..65535), got {value!r}")
        if not 0 < self.ext_timeout_ms <= 3_600_000:
            raise ValueError(f"ext_timeout_ms must be in 1..3600000, got {self.ext_timeout_ms}")
        _check_address("listen_address", self.listen_address, allow_hostname=False)
        _check_address("decision_host", self.decision_host, allow_hostname=True)
        for name in ("sds_dir", "access_log_path"):
            path = getattr(self, name)
            if not path.is_absolute():
                # Envoy resolves relative paths against its own working directory.
                raise ValueError(f"{name} must be an absolute path, got {path}")
            if any(c in str(path) for c in '"\\\n\r\t$'):
                # The templates put paths in double-quoted YAML scalars.
                raise ValueError(f"{name} contains characters the template cannot quote: {path}")

    def mapping(self) -> dict[str, str]:
        values = {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}
        values["ext_timeout"] = f"{self.ext_timeout_ms // 1000}.{self.ext_timeout_ms % 1000:03d}s"
        return values


def _check_address(name: str, value: str, *, allow_hostname: bool) -> None:
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if allow_hostname and _HOSTNAME.match(value):
        return
    kind = "an IP address or hostname" if allow_hostname else "an IP address"
    raise ValueError(f"{name} must be {kind}, got {value!r}")


def template_path(template: Template) -> Path:
    if template not in TEMPLATES:
        raise ValueError(f"unknown Envoy template {template!r}; expected one of {TEMPLATES}")
    return ENVOY_DIR / f"{template}.yaml"


def render(template: Template, values: EnvoyValues) -> str:
    """The bootstrap YAML for ``template`` with every placeholder filled.

    Raises KeyError if the template names a placeholder ``values`` does not provide."""
    text = template_path(template).read_text(encoding="utf-8")
    return string.Template(text).substitute(values.mapping())


def write_config(template: Template, values: EnvoyValues, out: Path) -> Path:
    """Render ``template`` to ``out`` (atomically: Envoy or a reader never sees half a file)."""
    text = render(template, values)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
