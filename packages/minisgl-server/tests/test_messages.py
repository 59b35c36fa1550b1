"""minisgl.server.messages: one registry, msgpack on the wire, token arrays as raw bytes, never pickle."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest

from minisgl.core.sampling_params import SamplingParams
from minisgl.server import messages as msg


def _examples() -> list[object]:
    params = SamplingParams(
        max_tokens=7, temperature=0.5, top_k=3, stop=["\n\n"], logprobs=2, seed=11, min_tokens=2,
        logit_bias={5: -100.0, 49151: 2.5}, prompt_logprobs=True,
    )  # fmt: skip
    ids = msg.int32_array([1, 2, 3, 49151])
    return [
        params,
        msg.GenerateGroup(
            [
                msg.GenerateRequest(1, params, prompt="hi"),
                msg.GenerateRequest(2, params, messages=[{"role": "user", "content": "héllo ✓"}]),
                msg.GenerateRequest(
                    3, dataclasses.replace(params, max_tokens=None), prompt_ids=ids, skip_special_tokens=False
                ),
                msg.GenerateRequest(4, params, prompt="x", echo=True, score_only=True),
            ]
        ),
        msg.AbortRequests([1, 2]),
        msg.AbortRequests([3], reason="stop"),
        msg.StatsQuery(9),
        msg.TokenizedGroup([msg.TokenizedRequest(4, ids, params)]),
        msg.StepOutputs(
            msg.int64_array([4, 5]),
            msg.int32_array([10, 20]),
            [msg.TokenLogprobs(4, -0.5, msg.int32_array([10, 11]), [-0.5, -1.5])],
            [msg.FinishedRequest(5, "length", 12, 4, 3, False)],
            [msg.PromptLogprobs(4, [-1.5, -0.25], [[7, 8], [9, 1]], [[-0.5, -1.5], [-0.25, -3.0]])],
        ),
        msg.TokenizeQuery(3, prompt="héllo", add_special_tokens=False),
        msg.TokenizeQuery(4, messages=[{"role": "user", "content": "hi"}]),
        msg.DetokenizeQuery(5, ids),
        msg.TokenizerReply(5, {"prompt": "hi"}),
        msg.TokenizerReply(6, error="no tokenizer"),
        msg.StatsReply(9, {"num_running": 1, "cache_hit_rate": 0.5, "name": "x"}),
        msg.OutputBatch([msg.RequestOutput(4, "Par", 1, [["Par", -0.1, [["Par", -0.1]]]], "stop", 12, 4, 3)]),
        msg.RequestError([1, 2], 503, "full", None, "queue_full"),
    ]


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("message", _examples(), ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    assert _same(msg.decode(msg.encode(message)), message)


def test_every_registered_type_has_an_example() -> None:
    seen: set[type] = set()

    def walk(obj: object) -> None:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            seen.add(type(obj))
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)

    for example in _examples():
        walk(example)
    assert seen == set(msg.MESSAGE_TYPES)


def test_token_arrays_travel_as_raw_bytes() -> None:
    ids = msg.int32_array(range(1000))
    data = msg.encode(msg.TokenizedRequest(1, ids, SamplingParams()))
    assert ids.tobytes() in data  # 4 bytes a token, not msgpack integers one by one
    assert len(data) < 4000 + 200


def test_unregistered_objects_are_refused() -> None:
    @dataclasses.dataclass
    class Sneaky:
        x: int = 1

    with pytest.raises(TypeError, match="not a registered message"):
        msg.encode(Sneaky())
    with pytest.raises(TypeError, match="not a registered message"):
        msg.encode(msg.StatsReply(1, {"obj": Sneaky()}))
    with pytest.raises(TypeError):
        msg.encode({"a": 1})  # a bare dict is not a message
    with pytest.raises(TypeError, match="int32 or int64"):
        msg.encode(msg.TokenizedRequest(1, np.zeros(3, dtype=np.float32), SamplingParams()))


def test_unknown_type_ids_are_refused() -> None:
    inner = msgpack.packb([len(msg.MESSAGE_TYPES) + 5, 1, 2])
    with pytest.raises(ValueError, match="unknown message type id"):
        msg.decode(msgpack.packb(msgpack.ExtType(1, inner)))
    with pytest.raises(ValueError, match="expected a message"):
        msg.decode(msgpack.packb([1, 2, 3]))


def test_decoded_sampling_params_are_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only our own processes are on the wire, and they built the params with the checks: decoding does
    not check them again (test_checked_once counts the whole path), but a field set later still is."""
    from minisgl.core.request_error import InvalidRequestError

    good = SamplingParams(max_tokens=5, stop="x", stop_token_ids=[7], json_schema={"type": "object"})
    monkeypatch.setattr(SamplingParams, "validate", lambda self: pytest.fail("validated again"))
    decoded = msg.decode(msg.encode(good))
    assert decoded == good and decoded.stop == ["x"] and decoded.stop_token_id_set == frozenset({7})
    decoded.ensure_valid()  # a no-op: nothing changed since the sender checked them
    monkeypatch.undo()
    decoded.temperature = 7.0
    with pytest.raises(InvalidRequestError, match="temperature"):
        decoded.ensure_valid()
    with pytest.raises(TypeError, match="exactly the fields"):
        SamplingParams.trusted(max_tokens=5)
