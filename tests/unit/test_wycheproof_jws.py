"""Every Wycheproof JWS and JWK vector through our verification layer (jwks + verify_compact).

Each vector's outcome is pinned: `accepted`, a JwtError reason, or `key_rejected` (our key
policy refused the group's key material at construction, as a real deployment would at
startup). Invalid vectors must never be accepted; valid vectors we refuse are listed with why.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc.authn.jwks import ASYMMETRIC_ALGORITHMS, HmacSecret, KeySource, StaticJwks
from extproc.authn.jwt import JwtError, verify_compact

DATA = Path("/work/shared/testdata/wycheproof")
JWS_FILE = "json_web_signature_test.json"
JWK_FILE = "json_web_key_test.json"
KEY_REJECTED = "key_rejected"


def _ids(spec: str) -> set[int]:
    """'1, 3-5' -> {1, 3, 4, 5}"""
    result: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        result.update(range(int(low), int(high or low) + 1))
    return result


# Valid vectors we refuse, and why. Every other valid vector must be accepted.
REFUSED_VALID: dict[str, dict[int, str]] = {
    JWS_FILE: {
        # Keys bound (JWK `alg`) to RS384, RS512, PS384, PS512 or ES512/P-521: outside our
        # algorithm set, so the JWKS has no usable key and is refused at construction.
        **dict.fromkeys(_ids("264-271, 320-323, 325-328, 347, 351"), KEY_REJECTED),
        # RFC 7520 figure 20 is signed with PS384, which is not in our allow-list.
        **dict.fromkeys(_ids("346, 350"), "algorithm_not_allowed"),
        # A '?' inside a segment: lenient base64 decoders drop it, we refuse non-base64url.
        **dict.fromkeys(_ids("372-373"), "malformed_token"),
    },
    JWK_FILE: {
        # A JWKS carrying secret ('k') key material is refused outright: a key set we
        # consume is public, one with secrets in it is a leak, not a configuration.
        2: KEY_REJECTED,
        # HS384 / HS512 keys: only HS256 is supported.
        14: KEY_REJECTED,
        15: KEY_REJECTED,
    },
}

# How each invalid vector is rejected. The table must cover every invalid vector exactly once.
INVALID_REASONS: dict[str, dict[str, str]] = {
    JWS_FILE: {
        "bad_signature": "2-3, 5-6, 8, 19-20, 22-23, 34-35, 37-38, 46-258, 276-286, 289-319,"
        " 379-401",
        "malformed_token": "4, 7, 9-15, 17, 21, 24, 26-30, 36, 39, 41-45, 360-366, 368-369, 371,"
        " 374-375",
        # 16: alg none; 31: HS256 token against an EC key (symmetric/asymmetric confusion).
        "algorithm_not_allowed": "16, 31",
        # An attacker-supplied `jwk` header: never trusted.
        "forbidden_header": "32",
        # Modified header changes the kid, so there is no key for it.
        "unknown_kid": "25, 40",
        # PS384/PS512 groups (unsupported algorithms) and encryption-only keys (use=enc,
        # key_ops=[encrypt]): no usable signature key, so the key set is refused.
        KEY_REJECTED: "324, 329-344, 353-356",
    },
    JWK_FILE: {
        # Mixed/duplicate/secret key sets, ROCA, 1024-bit RSA, e=1, short or empty HMAC keys,
        # alg/curve/kty mismatches, invalid point, AES keys, use=enc.
        KEY_REJECTED: "1, 3-4, 6-12, 16-26",
    },
}

# C2SP/wycheproof#236: these are byte-identical to valid tcId 357 yet labelled invalid. No
# verifier can satisfy both labels; we check they are the same bytes and get 357's verdict.
# (What they were meant to test, padded base64, is covered in test_jwt.py.)
CONTRADICTORY = {367: 357, 370: 357}


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


def _vectors() -> Iterator[Any]:
    for name in (JWS_FILE, JWK_FILE):
        for index, group in enumerate(_load(name)["testGroups"]):
            for test in group["tests"]:
                yield pytest.param(name, index, test, id=f"{name.split('_')[2]}-{test['tcId']}")


@functools.cache
def _group(name: str, index: int) -> dict[str, Any]:
    group: dict[str, Any] = _load(name)["testGroups"][index]
    return group


def _key_source(group: dict[str, Any]) -> tuple[KeySource, frozenset[str]]:
    """The group's key material as we would be configured with it.

    A single symmetric key becomes an HmacSecret (the only way we take an HMAC key), and such
    an issuer may only use HS256; anything else is a JWKS for the asymmetric algorithms.
    """
    material = group.get("public") or group["private"]
    keys = material.get("keys", [material])
    if len(keys) == 1 and keys[0].get("kty") == "oct":
        return HmacSecret.from_jwk(keys[0]), frozenset({"HS256"})
    return StaticJwks.from_mapping({"keys": keys}), ASYMMETRIC_ALGORITHMS


async def _outcome(group: dict[str, Any], jws: object) -> str:
    try:
        keys, algorithms = _key_source(group)
    except ValueError:
        return KEY_REJECTED
    assert isinstance(jws, str)  # the JSON-serialised vector is a JSON string in these files
    try:
        await verify_compact(jws, keys, algorithms)
    except JwtError as exc:
        return exc.reason
    return "accepted"


def _expected(name: str, test: dict[str, Any]) -> str:
    tc_id = test["tcId"]
    if test["result"] == "valid":
        return REFUSED_VALID[name].get(tc_id, "accepted")
    assert test["result"] == "invalid", "no 'acceptable' vectors in these files"
    reasons = [r for r, spec in INVALID_REASONS[name].items() if tc_id in _ids(spec)]
    assert len(reasons) == 1, f"tcId {tc_id} must appear in exactly one reason: {reasons}"
    return reasons[0]


@pytest.fixture(autouse=True)
def _quiet_key_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="extproc.authn.jwks")


@pytest.mark.parametrize(("name", "index", "test"), list(_vectors()))
async def test_vector(name: str, index: int, test: dict[str, Any]) -> None:
    group = _group(name, index)
    outcome = await _outcome(group, test["jws"])
    if name == JWS_FILE and test["tcId"] in CONTRADICTORY:
        twin = next(
            t
            for g in _load(name)["testGroups"]
            for t in g["tests"]
            if t["tcId"] == CONTRADICTORY[test["tcId"]]
        )
        assert test["jws"] == twin["jws"] and twin["result"] == "valid"
        assert outcome == "accepted"
        return
    assert outcome == _expected(name, test), test["comment"]


def test_vector_counts_match_the_readme() -> None:
    """Guards against the parametrisation silently running fewer vectors."""
    assert sum(len(g["tests"]) for g in _load(JWS_FILE)["testGroups"]) == 401
    assert sum(len(g["tests"]) for g in _load(JWK_FILE)["testGroups"]) == 26
    assert len(list(_vectors())) == 427


def test_invalid_reason_table_has_no_stray_ids() -> None:
    for name, table in INVALID_REASONS.items():
        invalid = {
            t["tcId"]
            for g in _load(name)["testGroups"]
            for t in g["tests"]
            if t["result"] == "invalid"
        }
        listed = set().union(*(_ids(spec) for spec in table.values()))
        assert listed == invalid - set(CONTRADICTORY if name == JWS_FILE else ())


class _NoKeys:
    """A key source that fails the test if it is ever asked: the check must come first."""

    async def key_for(self, kid: str | None, alg: str) -> None:
        raise AssertionError("the key source must not be consulted")

    async def warm(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


async def test_alg_none_vectors_fail_before_any_key_lookup() -> None:
    """The AlgIsNone group's key is refused by our key policy, which would hide the alg check;
    so run those tokens again with every supported algorithm allowed."""
    none_vectors = [
        t["jws"]
        for g in _load(JWS_FILE)["testGroups"]
        for t in g["tests"]
        if "AlgIsNone" in t["flags"] or "NoneAlgorithm" in t["comment"]
    ]
    assert len(none_vectors) == 5
    for jws in none_vectors:
        with pytest.raises(JwtError) as caught:
            await verify_compact(jws, _NoKeys(), ASYMMETRIC_ALGORITHMS | {"HS256"})
        assert caught.value.reason == "algorithm_not_allowed"
