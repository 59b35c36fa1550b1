"""The one error a refused request raises: which field is wrong, and why."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine refuses. `param` names the offending field ("temperature", "max_tokens",
    "prompt", ...; None when no single field is to blame), so that a server reports it as OpenAI's
    errors do without reading it back out of the message."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
