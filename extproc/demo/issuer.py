"""The demo JWT issuer: an ES256 key made locally at first run, its JWKS, and token minting."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = "https://issuer.demo.local"
AUDIENCE = "models"
KID = "demo-1"


@dataclass(frozen=True)
class DemoIssuer:
    key: ec.EllipticCurvePrivateKey
    jwks_path: Path

    def mint(self, claims: dict[str, Any], ttl_seconds: int = 24 * 3600, **header: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + ttl_seconds}
        payload.update(claims)
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": KID, **header})


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def ensure_demo_issuer(directory: Path) -> DemoIssuer:
    """Create (or reuse) the demo signing key and write its public JWKS beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "issuer-key.pem"
    if key_path.exists():
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        key = loaded
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(key_path, pem)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": KID, "use": "sig", "alg": "ES256"})
    jwks_path = directory / "jwks.json"
    tmp = jwks_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": [jwk]}, indent=2))
    os.replace(tmp, jwks_path)
    return DemoIssuer(key=key, jwks_path=jwks_path)
