"""The corpus of bad requests (data/bad_requests.jsonl), shared by the app's tests and the live server's.

One JSON object per line: `path`, the body as `json` (its "MODEL" model name is replaced by the served
one, and a "@long" value by `long.unit` repeated `long.times` times), `raw` text (sent as UTF-8, lone
surrogates kept), `raw_hex` bytes, or `nest` (that many nested arrays); the expected `status` and, when
not null, the `param` the error must name; `engine` (or `long`) when only the engine can tell (prompt
length, vocabulary, context).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "data" / "bad_requests.jsonl"


@dataclass
class BadRequest:
    path: str
    content: bytes
    status: int
    param: str | None
    engine: bool  # only the engine can refuse it (prompt length, token ids beyond the vocabulary)

    def __str__(self) -> str:
        return f"{self.path} {self.content[:100]!r}"


def load_corpus(model: str) -> list[BadRequest]:
    return [_request(json.loads(line), model) for line in CORPUS.read_text().splitlines() if line.strip()]


def _request(entry: dict[str, Any], model: str) -> BadRequest:
    if "json" in entry:
        body = _fill(entry["json"], model, entry.get("long"))
        content = json.dumps(body).encode()
    elif "raw" in entry:
        content = entry["raw"].encode("utf-8", "surrogatepass")
    elif "raw_hex" in entry:
        content = bytes.fromhex(entry["raw_hex"])
    else:
        content = b"[" * entry["nest"] + b"]" * entry["nest"]
    return BadRequest(
        entry["path"],
        content,
        entry["status"],
        entry.get("param"),
        "long" in entry or bool(entry.get("engine")),
    )


def _fill(value: Any, model: str, long: dict[str, Any] | None) -> Any:
    if value == "MODEL":
        return model
    if value == "@long" and long is not None:
        return long["unit"] * long["times"]
    if isinstance(value, dict):
        return {k: _fill(v, model, long) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, model, long) for v in value]
    return value
