"""A prompt the sidecar counts (domain/_tokens.py): its size, its count and its estimate."""

from __future__ import annotations

from budgetwarden.domain import ChatMessage, Prompt, TokenCounter, estimate_prompt


def test_a_prompt_is_text_or_chat_messages() -> None:
    text = Prompt(text="hello there")
    chat = Prompt(messages=(ChatMessage("user", "hello there"), ChatMessage("assistant", "hi", name="bot")))
    assert text.size == 11
    assert chat.size == len("user") + 11 + len("assistant") + 2 + 3
    counter = TokenCounter()
    assert counter.count_prompt(text, "cl100k_base") == counter.count_text("hello there", "cl100k_base")
    assert counter.count_prompt(chat, "cl100k_base") == counter.count_chat(list(chat.messages), "cl100k_base")
    estimated = estimate_prompt(text, "o200k_base")
    assert (estimated.tokens, estimated.encoding, estimated.exact) == (3, "o200k_base", False)
    assert estimate_prompt(chat, "cl100k_base").tokens > estimate_prompt(Prompt(messages=()), "cl100k_base").tokens
