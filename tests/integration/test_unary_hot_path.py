"""The unary Check's own Python (issue 17, "Make the unary path cheap"): how many calls of the sidecar's own functions
one check makes, over a real socket, on the Redis path and when a local allowance decides it. Calls are counted, not
timed, so the bound holds on a busy machine; each is the least of several checks, so a background task of the
sidecar (the store watch, the allowance sweep) running beside one check does not count. Before the hot path was cut
(per-check async context managers, the unary_handler wrapper, the batching and the lists for a check its slice
decides, an empty gather, a call per validated field) these were 81 (Redis path) and 85 (local), and 59 after (63 and
63 on main at 436faa1); with a slice's scopes encoded once per slice (check_response_bytes) and the servicer's
_check_input inline, 61 and 51. The bounds leave a little room."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from budgetwarden_client import BudgetClient, pb

from support import TEST_RPC_TIMEOUT_S, RunningSidecar

# Where the sidecar's own code lives (not the client's, nor grpc's or redis-py's).
OWN_CODE = (
    "/budgetwarden/transport/",
    "/budgetwarden/limiter.py",
    "/budgetwarden/allowance.py",
    "/budgetwarden/domain/",
)


class OwnCalls:
    """Counts calls of the sidecar's own functions made on the sidecar's loop thread while it is on."""

    def __init__(self) -> None:
        self.count = 0

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and any(part in frame.f_code.co_filename for part in OWN_CODE):
            self.count += 1  # a coroutine counts once per resumption too: what it costs

    async def start(self) -> None:
        self.count = 0
        sys.setprofile(self.profile)  # this thread only: the sidecar's loop

    async def stop(self) -> int:
        sys.setprofile(None)
        return self.count


def least_calls_per_check(running: RunningSidecar, check: Callable[[int], pb.CheckResponse], first: int) -> int:
    counter = OwnCalls()
    counts = []
    for n in range(first, first + 7):
        running.run(counter.start())
        answer = check(n)
        counts.append(running.run(counter.stop()))
        assert answer.decision == pb.DECISION_ALLOW
    return min(counts)


def test_a_unary_check_on_the_redis_path_makes_few_calls_of_the_sidecars_own_code(
    start_sidecar: Callable[..., RunningSidecar],
) -> None:
    running = start_sidecar()
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:

        def check(n: int) -> pb.CheckResponse:
            return client.check(tenant_id="acme", task_id=f"t{n}", step_id="s", estimated_input_tokens=100)

        check(0)  # warm: scripts loaded, windows cached
        calls = least_calls_per_check(running, check, 1)
    assert calls <= 65, f"{calls} calls of the sidecar's own functions per check"


def test_a_check_its_local_allowance_decides_makes_few_calls_of_the_sidecars_own_code(
    start_sidecar: Callable[..., RunningSidecar],
) -> None:
    running = start_sidecar(local_allowance=True, local_allowance_cap_tokens=50_000, local_allowance_share=0.5)
    with BudgetClient(running.addr, timeout=TEST_RPC_TIMEOUT_S) as client:

        def check(n: int) -> pb.CheckResponse:
            return client.check(tenant_id="acme", task_id="t", step_id=f"s{n}", estimated_input_tokens=100)

        check(0)  # the task's first check, on the Redis path
        check(1)  # takes the slice
        calls = least_calls_per_check(running, check, 2)
        assert running.sidecar is not None
        assert running.sidecar.allowances is not None
        assert running.sidecar.allowances.local_checks >= 7
    assert calls <= 55, f"{calls} calls of the sidecar's own functions per locally decided check"
