"""Token counting and cutting with tiktoken, never splitting a character."""

from __future__ import annotations

from dataclasses import dataclass

import tiktoken

MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens the chat format spends per message besides its content (role and separators)."""


@dataclass(frozen=True)
class TokenCounter:
    encoding: tiktoken.Encoding

    @classmethod
    def named(cls, name: str) -> TokenCounter:
        return cls(tiktoken.get_encoding(name))

    def count(self, text: str) -> int:
        return len(self.encoding.encode(text, disallowed_special=()))

    def cut_prefix(self, text: str, max_tokens: int) -> str:
        """The longest prefix of `text` that fits `max_tokens`, cut on a token boundary.

        A token can end inside a multi-byte character (Chinese often does); such a cut
        would decode to U+FFFD, so we drop tokens until the bytes are valid UTF-8.
        """
        if max_tokens <= 0:
            return ""
        tokens = self.encoding.encode(text, disallowed_special=())
        if len(tokens) <= max_tokens:
            return text
        for end in range(max_tokens, 0, -1):
            try:
                return self.encoding.decode_bytes(tokens[:end]).decode("utf-8")
            except UnicodeDecodeError:
                continue
        return ""
