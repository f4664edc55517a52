"""Incremental detokenising: token ids in, complete characters out."""

from __future__ import annotations


class Detokenizer:
    """Incremental decoding that only ever emits complete characters.

    Decodes a short window of recent tokens twice (without and with the new
    ones) and emits the difference: a window keeps the cost per token
    constant, and starting it at an earlier token keeps tokenizer-specific
    spacing of the window's first token out of the delta. A delta ending in
    U+FFFD is an unfinished multi-byte character: wait for more tokens.
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._start = 0  # window start
        self._done = 0  # tokens whose text has been emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is left, unfinished characters included (the row is ending)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self._ids[self._start : self._done])
        after = self._decode(self._ids[self._start :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
