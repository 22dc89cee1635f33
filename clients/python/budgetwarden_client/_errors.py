"""The step API's exceptions: a step that may not run raises one of them, all subclasses of ``BudgetError``.

They are named for the decision they stand for (as the issue's API names them), hence no ``Error`` suffix (N818).
"""

from __future__ import annotations

from budgetwarden_api.v1 import budget_pb2 as pb


class BudgetError(Exception):
    """A step may not run. ``response`` is the sidecar's answer (None when there was none), ``remaining_tokens`` the
    least of the scopes' remaining tokens (None: no limit, or not known)."""

    def __init__(self, message: str, *, response: pb.CheckResponse | None, remaining_tokens: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.response = response
        self.remaining_tokens = remaining_tokens

    @property
    def reason(self) -> pb.Reason.ValueType:
        return self.response.reason if self.response is not None else pb.REASON_UNSPECIFIED


class CheckpointRequired(BudgetError):  # noqa: N818
    """The task reached its checkpoint: nothing runs until ``checkpoint_id`` is approved (``budgetwarden approve ID``
    or ``AdminClient.approve``); then check the same step again."""

    def __init__(self, message: str, *, response: pb.CheckResponse, remaining_tokens: int | None) -> None:
        super().__init__(message, response=response, remaining_tokens=remaining_tokens)
        self.checkpoint_id = response.checkpoint_id


class BudgetDenied(BudgetError):  # noqa: N818
    """The step does not fit (``reason`` says why). ``retry_after`` is the seconds until a tenant window frees up
    when the denial came from one, else None."""

    def __init__(self, message: str, *, response: pb.CheckResponse, remaining_tokens: int | None) -> None:
        super().__init__(message, response=response, remaining_tokens=remaining_tokens)
        has_wait = response.HasField("retry_after") and response.retry_after.ToTimedelta().total_seconds() > 0
        self.retry_after: float | None = response.retry_after.ToTimedelta().total_seconds() if has_wait else None


class BudgetUnavailable(BudgetError):  # noqa: N818
    """The sidecar could not be reached within the deadline and the fail mode is ``"closed"``. The gRPC error is the
    ``__cause__``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, response=None, remaining_tokens=None)
