"""Incremental detokenization: token ids in, text out, a piece at a time.

Decoding one token at a time is wrong twice over: byte-level BPE splits a multi-byte UTF-8 character
across tokens (a lone piece decodes to U+FFFD), and SentencePiece-style tokenizers drop or add a leading
space depending on the token before. So each request keeps a small window of tokens: the text of the new
tokens is decode(window + new) minus decode(window), and it is committed only when it does not end in an
incomplete character. The window then moves up to the new tokens.

Stop strings (this is their one owner while serving: the scheduler decodes no text): text that could be
the start of a stop string is held back until it is clear, and a complete stop string cuts the text where
it starts; it is never sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minisgl.core.stop_strings import first_stop

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DecodeState:
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    # ids[window_start:text_end] decode to context already in `text`; ids[text_end:] are not in it yet.
    window_start: int = 0
    text_end: int = 0
    text: str = ""
    sent: int = 0  # characters of text already handed out
    stopped: bool = False  # a stop string was found: text ends before it and nothing more is added

    @property
    def longest_stop(self) -> int:
        return max((len(s) for s in self.stop), default=0)


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}

    def add_tokens(self, state: DecodeState, new_ids: list[int]) -> None:
        """Append tokens and commit whatever text they complete."""
        self.add_tokens_batch([(state, new_ids)])

    def add_tokens_batch(self, updates: list[tuple[DecodeState, list[int]]]) -> None:
        """add_tokens for many requests at once: two batched decode calls for all of them (the fast
        tokenizers decode a batch in Rust), instead of two Python calls per request."""
        pending: dict[bool, list[DecodeState]] = {True: [], False: []}
        for state, new_ids in updates:
            if new_ids and not state.stopped:
                state.ids.extend(new_ids)
                pending[state.skip_special_tokens].append(state)
        for skip, states in pending.items():
            self._commit_batch(states, skip)

    def _commit_batch(self, states: list[DecodeState], skip_special_tokens: bool) -> None:
        """Decode the windows of requests that share skip_special_tokens, and commit their new text."""
        if not states:
            return
        befores = self._decode_batch(
            [s.ids[s.window_start : s.text_end] for s in states], skip_special_tokens
        )
        afters = self._decode_batch([s.ids[s.window_start :] for s in states], skip_special_tokens)
        for state, before, after in zip(states, befores, afters, strict=True):
            self._commit(state, before, after, final=False)

    def finish(self, state: DecodeState) -> None:
        """Commit the rest: no more tokens will come, so an incomplete character is dropped."""
        if state.stopped or state.text_end == len(state.ids):
            return
        before, after = self._decode_batch(
            [state.ids[state.window_start : state.text_end], state.ids[state.window_start :]],
            state.skip_special_tokens,
        )
        self._commit(state, before, after, final=True)

    def _decode_batch(self, sequences: list[list[int]], skip_special_tokens: bool) -> list[str]:
        texts: list[str] = self.tokenizer.batch_decode(
            sequences, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
        return texts

    def _commit(self, state: DecodeState, before: str, after: str, final: bool) -> None:
        """before / after: the window decoded without / with the tokens not yet in the text."""
        if final:
            after = after.rstrip(REPLACEMENT_CHAR)
        elif after.endswith(REPLACEMENT_CHAR):
            return  # the last token ends inside a character: wait for the rest of it
        # Committed text is never taken back: if the new token changed how the window decodes (rare),
        # only the part past the old length is new.
        new_text = after[len(before) :]
        if not new_text and not final:
            return  # e.g. a special token that is skipped: keep the window as it is
        search_from = max(0, len(state.text) - state.longest_stop + 1)
        state.text += new_text
        state.window_start, state.text_end = state.text_end, len(state.ids)
        _cut_at_stop(state, search_from)

    def take_text(self, state: DecodeState, final: bool) -> str:
        """Text not handed out yet, less a tail that may still become a stop string (unless final)."""
        end = len(state.text)
        if not final and not state.stopped and state.stop:
            end -= stop_prefix_len(state.text, state.stop)
        end = max(end, state.sent)
        piece = state.text[state.sent : end]
        state.sent = end
        return piece

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own, for logprobs."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._decode_batch([[token_id]], skip_special_tokens=False)[0]
            if len(self._token_text) < 1 << 18:
                self._token_text[token_id] = text
        return text


def _cut_at_stop(state: DecodeState, search_from: int) -> None:
    """End the text before its first stop string, if the new text completed one."""
    cut = first_stop(state.text, state.stop, search_from) if state.stop else None
    if cut is not None:
        state.text = state.text[:cut]
        state.stopped = True


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
