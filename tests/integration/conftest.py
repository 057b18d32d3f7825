"""Real stacks for integration tests: demo pods, the decision server and Envoy on free ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc.testing.gateway import Gateway, make_stack, running


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    stack = make_stack(tmp_path_factory.mktemp(request.param), mode=request.param)
    with running(stack) as gw:
        yield gw


@pytest.fixture
def gw(gateway: Gateway) -> Gateway:
    gateway.clear()
    return gateway
