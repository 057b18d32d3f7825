"""Audit notes: what a decision found that is worth keeping, never the values themselves.

One JSON line per note on the `extproc.audit` logger, keyed by decision id (the same id the
client sees in x-gateway-decision-id). Callers pass only counts, types, scores and codes:
nothing a client sent verbatim, and no secret.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson

log = logging.getLogger("extproc.audit")


def record(decision_id: str, event: str, fields: Mapping[str, object]) -> None:
    if log.isEnabledFor(logging.INFO):
        line = orjson.dumps({"decision_id": decision_id, "event": event, **fields},
                            default=str)  # fmt: skip
        log.info("%s", line.decode())
