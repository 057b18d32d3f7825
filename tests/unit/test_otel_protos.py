"""OpenTelemetry's protobuf modules must be opentelemetry-proto's own, not xds-protos' old copy
at the same paths (CI once failed on a fresh install: the OTLP exporter could not be imported)."""

from __future__ import annotations

import base64
import hashlib
from importlib.metadata import PathDistribution
from pathlib import Path

import pytest

from extproc.telemetry import otel_protos


def _record_line(root: Path, name: str) -> str:
    digest = hashlib.sha256((root / name).read_bytes()).digest()
    b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return f"{name},sha256={b64},{(root / name).stat().st_size}"


def _fake_dist(root: Path) -> PathDistribution:
    (root / "pkg").mkdir()
    (root / "pkg" / "a_pb2.py").write_text("A = 1\n")
    (root / "pkg" / "b_pb2.py").write_text("B = 2\n")
    info = root / "fake-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake\nVersion: 1.0\n")
    lines = [_record_line(root, "pkg/a_pb2.py"), _record_line(root, "pkg/b_pb2.py")]
    (info / "RECORD").write_text("\n".join([*lines, "fake-1.0.dist-info/RECORD,,"]) + "\n")
    return PathDistribution(info)


def test_intact_files_are_not_reported(tmp_path: Path) -> None:
    assert otel_protos.shadowed_files(_fake_dist(tmp_path)) == []


def test_overwritten_and_missing_files_are_reported(tmp_path: Path) -> None:
    dist = _fake_dist(tmp_path)
    (tmp_path / "pkg" / "a_pb2.py").write_text("A = 'an older copy'\n")
    (tmp_path / "pkg" / "b_pb2.py").unlink()
    assert otel_protos.shadowed_files(dist) == ["pkg/a_pb2.py", "pkg/b_pb2.py"]


def test_installed_opentelemetry_proto_is_intact() -> None:
    changed = otel_protos.shadowed_files()
    assert changed == [], f"overwritten by another wheel: {changed[:5]}"
    otel_protos.require_intact()


def test_the_error_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otel_protos, "shadowed_files", lambda dist: ["x/common_pb2.py"])
    with pytest.raises(RuntimeError, match=r"xds-protos.*--force-reinstall opentelemetry-proto=="):
        otel_protos.require_intact()


def test_the_otlp_exporters_import() -> None:
    from extproc.telemetry import otlp_metrics, tracing

    assert tracing.Tracing and otlp_metrics.OtlpMetricPusher
