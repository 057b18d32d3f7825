"""Render the shipped Envoy bootstrap templates (envoy/ext_proc.yaml, envoy/ext_authz.yaml).

The templates are plain YAML with ``${name}`` placeholders (string.Template) so a platform
engineer can read them as they are; this module fills in ports, hosts and paths, and the two
generated blocks: the model routes (``${routes}``) and the fallback clusters
(``${fallback_clusters}``), both from ``EnvoyValues.upstreams`` by extproc.envoy_routes. A
block placeholder stands alone on its line; the block is indented to match it.
``substitute`` (not ``safe_substitute``) is used on purpose: a placeholder without a value
raises instead of leaving ``${...}`` in a config that Envoy would then reject or misread. The
rendered config is then checked against the upstreams (extproc.envoy_routes.check_clusters and
check_routes), so a config whose clusters drifted from the model versions is never written.
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
from typing import Any, Literal

import yaml

from extproc import envoy_routes
from extproc.envoy_routes import VersionUpstream

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

# The model pod clusters the templates define, with Envoy's defaults for each (120 s timeout,
# no retries, no fallback, no mirror): today's demo policies name exactly these.
DEMO_UPSTREAMS: tuple[VersionUpstream, ...] = (
    VersionUpstream("demo-chat-v1"),
    VersionUpstream("demo-chat-v2", fallback_cluster="demo-chat-v1"),  # the canary
    VersionUpstream("demo-oip-v1"),
)
# Placeholders filled with a generated YAML block rather than a scalar.
BLOCKS: tuple[str, ...] = ("routes", "fallback_clusters")
_COMMENT_WIDTH = 80

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
    # The region this gateway serves, set by Envoy on every request as x-gateway-region.
    region: str = "local"
    # One per model version: the routes and fallback clusters are generated from these, and
    # every cluster they name must exist in the template (see policy_upstreams).
    upstreams: tuple[VersionUpstream, ...] = DEMO_UPSTREAMS

    def __post_init__(self) -> None:
        object.__setattr__(self, "upstreams", tuple(self.upstreams))
        envoy_routes.selections(self.upstreams)  # raises on conflicting versions
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_port") and not (isinstance(value, int) and 0 < value < 65536):
                raise ValueError(f"{f.name} must be a TCP port (1..65535), got {value!r}")
        if not 0 < self.ext_timeout_ms <= 3_600_000:
            raise ValueError(f"ext_timeout_ms must be in 1..3600000, got {self.ext_timeout_ms}")
        if re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", self.region) is None:
            raise ValueError(
                f"region must be lower-case letters, digits and '-', got {self.region!r}"
            )
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
        """Every placeholder's text; the BLOCKS unindented (render indents them)."""
        values = {
            f.name: str(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "upstreams"
        }
        values["ext_timeout"] = f"{self.ext_timeout_ms // 1000}.{self.ext_timeout_ms % 1000:03d}s"
        values["routes"] = _yaml_block(envoy_routes.annotated_routes(self.upstreams))
        values["fallback_clusters"] = _yaml_block(
            envoy_routes.annotated_fallback_clusters(self.upstreams)
        )
        return values


def _yaml_block(items: list[tuple[str, dict[str, Any]]]) -> str:
    """YAML list items, each after its comment; empty for no items."""
    lines: list[str] = []
    for comment, item in items:
        lines.extend(f"# {line}" for line in _wrap(comment))
        dumped = yaml.safe_dump([item], sort_keys=False, default_flow_style=None, width=1000)
        lines.extend(dumped.rstrip("\n").splitlines())
    return "\n".join(lines)


def _wrap(text: str) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= _COMMENT_WIDTH:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _expand_blocks(text: str, mapping: dict[str, str]) -> str:
    """Replace each BLOCKS placeholder standing alone on its line with its block, indented
    like the placeholder (an empty block removes the line)."""
    for name in BLOCKS:
        pattern = re.compile(rf"^([ ]*)\$\{{{name}\}}[ ]*\n", re.MULTILINE)

        def indent(match: re.Match[str], name: str = name) -> str:
            pad = match.group(1)
            block = mapping[name].replace("$", "$$")  # literal under string.Template
            return "".join(f"{pad}{line}\n" for line in block.splitlines())

        text = pattern.sub(indent, text)
    return text


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

    Raises KeyError if the template names a placeholder ``values`` does not provide, and
    ValueError if the result does not serve ``values.upstreams`` (a cluster a version names is
    missing or unfit, a generated route or fallback cluster is not where it belongs)."""
    text = template_path(template).read_text(encoding="utf-8")
    mapping = values.mapping()
    text = string.Template(_expand_blocks(text, mapping)).substitute(mapping)
    config = yaml.safe_load(text)
    problems = envoy_routes.check_clusters(config, values.upstreams)
    problems += envoy_routes.check_routes(config, values.upstreams)
    if problems:
        raise ValueError(f"{template}: the config does not fit the model versions: {problems}")
    return text


def policy_upstreams(policy_dir: Path) -> tuple[VersionUpstream, ...]:
    """What Envoy must do for every version the policies name: its cluster, timeout, retries,
    fallback cluster and the shadow cluster it mirrors to. The routes Envoy gets and the keys
    the decision server sets (extproc.pipeline.upstream) come from the same policies, so the
    two cannot drift; `render` refuses a config whose clusters do not fit them."""
    from extproc.policy.load import read_policy_dir  # policies only where asked for

    out: list[VersionUpstream] = []
    for file in read_policy_dir(policy_dir):
        policy = file.policy
        clusters = {v.name: v.cluster for v in policy.versions}
        shadow = policy.routing.shadow
        for version in policy.versions:
            mirrors: tuple[str, ...] = ()
            if shadow is not None and shadow.version != version.name:
                mirrors = (clusters[shadow.version],)
            out.append(
                VersionUpstream(
                    version.cluster,
                    timeout_seconds=version.timeout_seconds,
                    retries=version.retries,
                    per_try_timeout_seconds=version.per_try_timeout_seconds,
                    fallback_cluster=clusters[version.fallback] if version.fallback else None,
                    mirror_clusters=mirrors,
                )
            )
    return tuple(out)


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
