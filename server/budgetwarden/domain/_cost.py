"""Cost arithmetic in integer micro-USD. Prices are micro-USD per million tokens; every cost rounds up."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # _policy prices its limits with usd_to_micros
    from ._policy import ModelPolicy

_MTOK = 1_000_000
MICROS_PER_USD = 1_000_000


def usd_to_micros(usd: float) -> int:
    """Dollars to integer micro-USD, rounded to the nearest micro-dollar (counters never hold floats)."""
    return round(usd * MICROS_PER_USD)


def micros_to_usd(micros: int) -> float:
    return micros / MICROS_PER_USD


def usd_text(micros: int) -> str:
    """Micro-USD as dollars with all six decimals, as every message and table shows them: ``0.001500``."""
    return f"{micros_to_usd(micros):.6f}"


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def estimate_micros(model: ModelPolicy, input_tokens: int, output_tokens: int) -> int:
    """What a check reserves: the estimate at the model's prices, all input taken as uncached."""
    return _ceil_div(input_tokens * model.input_micros_per_mtok + output_tokens * model.output_micros_per_mtok, _MTOK)


def actual_micros(model: ModelPolicy, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> int:
    """What a report charges: uncached input, cached input and output, each at its own price."""
    uncached = input_tokens - cached_input_tokens
    total = (
        uncached * model.input_micros_per_mtok
        + cached_input_tokens * model.cached_input_micros_per_mtok
        + output_tokens * model.output_micros_per_mtok
    )
    return _ceil_div(total, _MTOK)
