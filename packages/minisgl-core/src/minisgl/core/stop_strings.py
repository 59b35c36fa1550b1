"""Stop strings: a request ends when its decoded output contains one of its stop strings. Only the tail
of the output is decoded each step, so the check costs the same at token 10 and at token 10,000."""

from __future__ import annotations

from typing import Any

from minisgl.core.request import Request

# Tokens decoded beyond the longest stop string: a token decodes to at least one character except
# for partial UTF-8 bytes and special tokens, which this margin absorbs.
_MARGIN_TOKENS = 8


class StopStringChecker:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer

    def find(self, req: Request) -> int | None:
        """If a stop string occurs in req's output text, the character offset where the first one starts."""
        stops = req.params.stop or []
        if not stops or self.tokenizer is None:
            return None
        outputs = req.resolved_output_ids()
        window = max(len(s) for s in stops) + _MARGIN_TOKENS
        tail = self.tokenizer.decode(outputs[-window:], skip_special_tokens=True)
        if not any(s in tail for s in stops):
            return None
        # Found in the tail: locate it exactly in the whole output (rare, so the full decode is fine).
        text = self.tokenizer.decode(outputs, skip_special_tokens=True)
        offsets = [text.find(s) for s in stops if s in text]
        return min(offsets) if offsets else None
