"""extproc.admin.v1.Admin: the active policy revision, and a side-effect-free explain."""

from __future__ import annotations

import os

import grpc

from extproc._proto.extproc.admin.v1 import admin_pb2 as pb
from extproc._proto.extproc.admin.v1 import admin_pb2_grpc as pb_grpc
from extproc.adapters.common import context_from_headers, join_headers
from extproc.pipeline.decision import Allow, Deny
from extproc.pipeline.run import DecisionCore
from extproc.policy.store import PolicyStore

_PHASES = ("route", "authenticate", "authorize")


class AdminService(pb_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, core: DecisionCore, policies: PolicyStore) -> None:
        self._core = core
        self._policies = policies

    async def GetPolicyRevision(
        self,
        request: pb.GetPolicyRevisionRequest,
        context: grpc.aio.ServicerContext[
            pb.GetPolicyRevisionRequest, pb.GetPolicyRevisionResponse
        ],
    ) -> pb.GetPolicyRevisionResponse:
        current = self._policies.current
        return pb.GetPolicyRevisionResponse(
            revision=current.revision,
            loaded_at_unix_ms=int(current.loaded_at * 1000),
            reloads=self._policies.reloads,
            rejected_reloads=self._policies.rejected,
            worker_pid=os.getpid(),
            policies=[
                pb.PolicySummary(
                    name=p.model, file=p.file, models=sorted(p.names), versions=sorted(p.versions)
                )
                for p in current.policies
            ],
        )

    async def Explain(
        self,
        request: pb.ExplainRequest,
        context: grpc.aio.ServicerContext[pb.ExplainRequest, pb.ExplainResponse],
    ) -> pb.ExplainResponse:
        headers = join_headers(request.headers.items())
        headers[":method"] = request.method or "POST"
        headers[":path"] = request.path or "/"
        headers[":authority"] = request.host or "localhost"
        ctx = context_from_headers(headers, request.body or None)
        decision = await self._core.decide(ctx)
        return explain(decision)


def explain(decision: Allow | Deny) -> pb.ExplainResponse:
    if isinstance(decision, Allow):
        return pb.ExplainResponse(
            allowed=True,
            status=200,
            code="allowed",
            policy=decision.policy,
            model=decision.model,
            version=decision.version,
            cluster=decision.cluster,
            phases=[pb.PhaseVerdict(phase=p, verdict="pass") for p in _PHASES],
        )
    phases = []
    for phase in _PHASES:
        if phase == decision.phase:
            phases.append(pb.PhaseVerdict(phase=phase, verdict="deny", reason=decision.reason))
            break
        phases.append(pb.PhaseVerdict(phase=phase, verdict="pass"))
    else:  # a fault outside the named phases
        phases.append(pb.PhaseVerdict(phase=decision.phase, verdict="deny", reason=decision.reason))
    return pb.ExplainResponse(
        allowed=False, status=decision.status, code=decision.code, phases=phases
    )
