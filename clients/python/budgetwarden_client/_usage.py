"""What the integrations (``budgetwarden_client.integrations``) share: reading an OpenAI-format ``usage`` onto a step,
and a stream whose step ends when the stream does (the OpenAI SDK's streams, LiteLLM's: anything iterable with a
``close``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from budgetwarden_client._budget import AsyncStepScope, StepScope
from budgetwarden_client._step import Step

# --- what a call spent ----------------------------------------------------------------------------------------------


def get(value: Any, *path: str) -> Any:
    """``value.a.b`` (or ``value["a"]["b"]``) for ``path`` ``("a", "b")``; None where a step is missing."""
    for name in path:
        if value is None:
            return None
        value = value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)
    return value


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def record_usage(step: Step, usage: Any, *, model: str | None = None) -> bool:
    """Records a Chat Completions or Responses ``usage`` on the step; False when there is none. Reasoning tokens are
    part of ``completion_tokens`` / ``output_tokens`` already, so they are charged through them."""
    if usage is None:
        return False
    chat = get(usage, "prompt_tokens") is not None
    details = "prompt_tokens_details" if chat else "input_tokens_details"
    step.record_usage(
        input_tokens=_int(get(usage, "prompt_tokens" if chat else "input_tokens")),
        output_tokens=_int(get(usage, "completion_tokens" if chat else "output_tokens")),
        cached_input_tokens=_int(get(usage, details, "cached_tokens")),
        model=model,
    )
    return True


def _chunk_usage(chunk: Any) -> Any:
    """The usage a stream chunk or event carries: a chat chunk's ``usage``, a Responses terminal event's."""
    if get(chunk, "type") in ("response.completed", "response.incomplete", "response.failed"):
        return get(chunk, "response", "usage")
    return get(chunk, "usage")


def _charge_if_streamed(step: Step, received: bool) -> None:
    """A stream that failed after the server began sending spent tokens nobody reported: they are charged as the
    reservation (its counted input, the rest as output), as the step API charges a step that completed without usage.
    One that failed before any chunk spent nothing: its reservation is released."""
    if received and not step.usage_recorded and step.reservation_id:
        reserved_input = min(step.input_tokens, step.max_context_tokens or step.input_tokens, step.granted_tokens)
        step.record_usage(input_tokens=reserved_input, output_tokens=step.granted_tokens - reserved_input)


def exc_info(error: BaseException | None) -> tuple[Any, BaseException | None, Any]:
    return (type(error) if error else None, error, error.__traceback__ if error else None)


# --- streams --------------------------------------------------------------------------------------------------------


class _StreamState:
    """What ``BudgetedStream`` and ``AsyncBudgetedStream`` share: the step, and what each chunk and a failure mean
    for it. Everything else is the wrapped stream's (``response``, ...)."""

    def __init__(self, stream: Any, step: Step) -> None:
        self._stream = stream
        self.step = step
        """The budget step of the call (``step.granted_tokens``: what an early close is charged)."""
        self._done = False
        self._received = False

    def _seen(self, chunk: Any) -> Any:
        record_usage(self.step, _chunk_usage(chunk))
        self._received = True
        return chunk

    def _failed(self) -> None:
        _charge_if_streamed(self.step, self._received)

    def _ending(self) -> bool:
        """True the first time only: the step ends once."""
        ending, self._done = not self._done, True
        return ending

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class BudgetedStream(_StreamState):
    """An SDK ``Stream`` whose step is reported when it ends: at its usage chunk's end, on ``close()`` or leaving its
    ``with``, or when a ``for`` loop over it is left early (the loop's iterator is then closed)."""

    def __init__(self, stream: Any, step: Step, scope: StepScope) -> None:
        super().__init__(stream, step)
        self._scope = scope
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A fresh generator the loop alone holds: leaving the loop early finalizes it, which ends the step.
        return self._chunks()

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._chunks()
        return next(self._iterator)

    def _chunks(self) -> Iterator[Any]:
        error: BaseException | None = None
        try:
            for chunk in self._stream:
                yield self._seen(chunk)
        except GeneratorExit:
            raise
        except BaseException as exc:
            error = exc
            self._failed()
            raise
        finally:
            self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        if self._ending():
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
            self._scope.__exit__(*exc_info(error))

    def close(self) -> None:
        self._finish(None)

    def __enter__(self) -> BudgetedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncBudgetedStream(_StreamState):
    """The asyncio twin of :class:`BudgetedStream`. An ``async for`` left early ends the step when asyncio finalizes
    the loop's iterator (soon after the ``break``); ``await stream.close()`` or ``async with`` end it at once."""

    def __init__(self, stream: Any, step: Step, scope: AsyncStepScope) -> None:
        super().__init__(stream, step)
        self._scope = scope
        self._iterator: AsyncIterator[Any] | None = None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._chunks()

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._chunks()
        return await anext(self._iterator)

    async def _chunks(self) -> AsyncIterator[Any]:
        error: BaseException | None = None
        try:
            async for chunk in self._stream:
                yield self._seen(chunk)
        except GeneratorExit:
            raise
        except BaseException as exc:
            error = exc
            self._failed()
            raise
        finally:
            await self._finish(error)

    async def _finish(self, error: BaseException | None) -> None:
        if self._ending():
            await self._stream.close()
            await self._scope.__aexit__(*exc_info(error))

    async def close(self) -> None:
        await self._finish(None)

    async def __aenter__(self) -> AsyncBudgetedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
