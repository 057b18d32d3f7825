"""`extproc policy explain`: one request decided through the real core, phase by phase.

Everything shown comes from what the core recorded while deciding (the timeline's marks, the
trail's findings and dry-run verdicts) and from the decision's audit record, so the explanation
is the one an operator would read in the audit log and the traces."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from extproc.policy.cases import RequestSpec, load_request
from extproc.policy.load import PolicyLoadError
from extproc.policy.replay import BadInput, Decided, Replayer, load_store


def explanation(spec: RequestSpec, decided: Decided) -> dict[str, Any]:
    ctx, trail = decided.ctx, decided.ctx.trail
    identity = ctx.given_identity or trail.identity
    caller: dict[str, Any] | None = None
    if identity is not None:
        caller = {
            "principal": identity.principal,
            "tenant": identity.tenant,
            "method": identity.method,
            "roles": sorted(identity.roles),
            "scopes": sorted(identity.scopes),
            # Given: decided for this identity, without checking any credential.
            "given": ctx.given_identity is not None,
        }
    policy = decided.policy
    return {
        "request": {"name": spec.name, "method": ctx.method, "path": ctx.path, "host": ctx.host},
        "caller": caller,
        "policy": {
            "file": policy.file if policy else None,
            "model": policy.model if policy else None,
            "revision": trail.revision,
        },
        "phases": [
            {
                "phase": m.phase,
                "verdict": m.verdict,
                "reason": m.reason,
                "us": round((m.end_ns - m.start_ns) / 1000, 1),
            }
            for m in trail.timeline.marks
        ],
        "decision": decided.summary(),
        "quota_held": decided.record.get("quota", {}).get("held", []),
        "findings": decided.record.get("findings", {}),
    }


def render(doc: dict[str, Any]) -> str:
    request, caller, policy = doc["request"], doc["caller"], doc["policy"]
    lines = [f"request   {request['method']} {request['path']} (host {request['host']})"]
    if caller is None:
        lines.append("caller    none (not authenticated)")
    else:
        how = "given identity, not authenticated" if caller["given"] else "authenticated"
        about = [caller["method"], f"tenant {caller['tenant'] or '-'}"]
        if caller["roles"]:
            about.append(f"roles {', '.join(caller['roles'])}")
        if caller["scopes"]:
            about.append(f"scopes {', '.join(caller['scopes'])}")
        lines.append(f"caller    {caller['principal']} ({'; '.join(about)}; {how})")
    if policy["file"]:
        lines.append(f"policy    {policy['file']} (model {policy['model']}), "
                     f"revision {policy['revision']}")  # fmt: skip
    else:
        lines.append(f"policy    none reached, revision {policy['revision']}")
    lines.append("phases")
    for mark in doc["phases"]:
        why = mark["reason"]
        if not why and mark["phase"] == "authenticate" and caller and caller["given"]:
            why = "the given identity"
        lines.append(
            f"  {mark['phase']:<13} {mark['verdict']:<10} {mark['us']:>9.1f} us  {why}".rstrip()
        )
    decision = doc["decision"]
    if decision["outcome"] == "allow":
        lines.append(f"decision  allow: version {decision['version']}, "
                     f"cluster {decision['cluster']}")  # fmt: skip
        for key in ("fallback_cluster", "mirror_cluster"):
            if key in decision:
                lines.append(f"          {key.replace('_', ' ')} {decision[key]}")
        if decision["flags"]:
            lines.append(f"          flags {', '.join(decision['flags'])}")
    else:
        lines.append(f"decision  {decision['outcome']} {decision['status']} {decision['code']}: "
                     f"{decision['message']}")  # fmt: skip
        at = f" at field {decision['field']}" if "field" in decision else ""
        lines.append(f"          by {decision['phase']}{at}: {decision['reason']}")
    dry = decision["dry_run"]
    if dry:
        for entry in dry:
            lines.append(f"dry run   would deny {entry['status']} at {entry['phase']}: "
                         f"{entry['reason']}")  # fmt: skip
    else:
        lines.append("dry run   nothing would be denied")
    redactions = decision["redactions"]
    masked = ", ".join(f"{kind}: {count}" for kind, count in sorted(redactions.items()))
    lines.append(f"masked    {masked or 'nothing'}")
    held = ", ".join(f"{h['rule']} {h['amount']}" for h in doc["quota_held"])
    lines.append(f"quota     {'held ' + held if held else 'nothing held'}")
    findings = doc["findings"]
    lines.append(f"findings  {json.dumps(findings, sort_keys=True) if findings else 'none'}")
    return "\n".join(lines)


def run_explain_command(
    directory: Path,
    request_file: Path,
    api_keys: Path | None,
    fmt: str,
) -> int:
    """Exit 0 whatever the decision (it is the answer), 2 when an input cannot be used."""
    try:
        spec = load_request(request_file, os.environ)
        replayer = Replayer(load_store(directory, api_keys))
    except (PolicyLoadError, BadInput) as exc:
        print(exc, file=sys.stderr)
        return 2
    doc = explanation(spec, asyncio.run(replayer.decide(spec)))
    print(json.dumps(doc, indent=2) if fmt == "json" else render(doc))
    return 0
