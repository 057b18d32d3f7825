"""Are OpenTelemetry's protobuf modules the ones `opentelemetry-proto` installed?

`xds-protos` (Envoy's API, which we need) ships an old copy of the same modules under the same
paths (`opentelemetry/proto/...`), and whichever wheel pip unpacks last wins. With xds-protos'
copy the OTLP exporter cannot even be imported. `make` reinstalls opentelemetry-proto last; this
check turns a surprise ImportError deep in the SDK into an error that says what to do."""

from __future__ import annotations

import base64
import hashlib
from importlib.metadata import Distribution, PackageNotFoundError, distribution

PACKAGE = "opentelemetry-proto"
FIX = f"pip install --no-deps --force-reinstall {PACKAGE}=={{version}}"


def shadowed_files(dist: Distribution | None = None) -> list[str]:
    """Python files of `opentelemetry-proto` whose content on disk is not what its RECORD says
    (overwritten by another wheel), in RECORD order."""
    dist = dist if dist is not None else distribution(PACKAGE)
    changed: list[str] = []
    for entry in dist.files or ():
        if entry.hash is None or entry.hash.mode != "sha256" or entry.suffix != ".py":
            continue
        path = entry.locate()
        try:
            digest = hashlib.sha256(path.read_bytes()).digest()  # type: ignore[attr-defined]
        except FileNotFoundError:
            changed.append(str(entry))
            continue
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != entry.hash.value:
            changed.append(str(entry))
    return changed


def require_intact() -> None:
    """Raise RuntimeError naming the fix when OTLP export cannot work with what is installed."""
    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError as exc:
        raise RuntimeError(f"OTLP export needs {PACKAGE}: pip install {PACKAGE}") from exc
    changed = shadowed_files(dist)
    if changed:
        raise RuntimeError(
            f"OTLP export is unavailable: {len(changed)} module(s) of {PACKAGE} were overwritten "
            f"by another package (xds-protos ships an old copy), e.g. {changed[0]}. "
            f"Reinstall it last: {FIX.format(version=dist.version)}"
        )
