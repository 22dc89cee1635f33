"""check_response_bytes (the unary Check's answer, with a local slice's scopes encoded once) answers exactly what
check_response encodes, whatever it remembered before."""

from __future__ import annotations

from budgetwarden.domain import (
    Amount,
    Counter,
    Decision,
    Reason,
    Scope,
    ScopeKind,
    Thresholds,
    Verdict,
    Window,
    WindowSpan,
)
from budgetwarden.limiter import CheckResult
from budgetwarden.transport import _encoding
from budgetwarden.transport._encoding import check_response, check_response_bytes
from budgetwarden_api.v1 import budget_pb2 as pb

TASK = Scope(name="task", kind=ScopeKind.TASK, limit=10_000)
STEP = Scope(name="step", kind=ScopeKind.STEP, limit=2_000)
DAY = Scope(
    name="tenant:day",
    kind=ScopeKind.TENANT_WINDOW,
    limit=1_000_000,
    span=WindowSpan(window=Window.DAY, label="d", start_ms=1_796_000_000_000, end_ms=1_796_086_400_000),
    limit_usd=5_000_000,
)
THRESHOLDS = Thresholds(soft_bp=8_000, checkpoint_bp=9_000)


def result(task: Counter, day: Counter, *, step: Counter | None = None, **fields: object) -> CheckResult:
    scopes = ((TASK, task), (DAY, day))
    if step is not None:
        scopes = ((STEP, step), *scopes)
    values: dict[str, object] = {
        "verdict": Verdict(
            decision=Decision.ALLOW, reason=Reason.WITHIN_BUDGET, granted=1_000, message="allowed 1000 tokens"
        ),
        "requested": Amount(1_000, 37),
        "reservation_id": "r" * 32,
        "lease_expires_ms": 1_796_000_060_000,
        "scopes": scopes,
        "policy_version": "v1",
        "thresholds": THRESHOLDS,
    }
    values.update(fields)
    return CheckResult(**values)  # type: ignore[arg-type]


def same(answer: CheckResult) -> None:
    assert pb.CheckResponse.FromString(check_response_bytes(answer)) == check_response(answer)


def test_the_bytes_parse_to_the_response_check_response_builds() -> None:
    task, day = Counter(limit=10_000, used=100, reserved=3_000), Counter(limit=1_000_000, used=5, reserved=7)
    same(result(task, day))
    same(result(task, day))  # remembered this time
    same(result(task, day, step=Counter(limit=2_000, used=0, reserved=0)))
    same(result(task, day, replayed=True, reservation_id="x", lease_expires_ms=None, thresholds=Thresholds()))
    same(result(task, Counter(limit=1_000_000, used=5, reserved=7, limit_usd=5_000_000, used_usd=10, reserved_usd=3)))


def test_an_answer_with_other_figures_is_not_answered_from_what_was_remembered() -> None:
    day = Counter(limit=1_000_000, used=5, reserved=7)
    before = result(Counter(limit=10_000, used=100, reserved=3_000), day)
    same(before)
    for changed in (
        Counter(limit=10_000, used=100, reserved=4_000),
        Counter(limit=10_000, used=200, reserved=3_000),
        Counter(limit=20_000, used=100, reserved=3_000),
        Counter(limit=10_000, used=100, reserved=3_000, limit_usd=9, used_usd=1, reserved_usd=2),
    ):
        after = result(changed, day)
        same(after)
        assert check_response_bytes(after) != check_response_bytes(before)
    # Other thresholds (equal figures, another object): the soft and checkpoint lines differ.
    other = result(Counter(limit=10_000, used=100, reserved=3_000), day, thresholds=Thresholds(soft_bp=5_000))
    same(other)
    assert check_response(other).scopes[0].soft_limit_tokens == 5_000


def test_what_is_remembered_is_bounded() -> None:
    day = Counter(limit=1_000_000, used=5, reserved=7)
    for n in range(_encoding.ENCODED_SCOPES_MAX + 10):
        same(result(Counter(limit=10_000, used=n, reserved=0), day))
    assert len(_encoding._ENCODED_SCOPES) <= _encoding.ENCODED_SCOPES_MAX
