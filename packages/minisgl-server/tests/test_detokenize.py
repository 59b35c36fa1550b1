"""Incremental detokenization with the embedded model's real tokenizer: the pieces add up to the full
decode, never hold a broken character, and stop strings are cut without ever being sent."""

from __future__ import annotations

from typing import Any

import pytest

from minisgl.server.detokenize import REPLACEMENT_CHAR, DecodeState, Detokenizer

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "naïve café — déjà vu; 日本語のテキスト, 中文, 한국어 🎉🚀👍🏽 done",
    "  leading spaces,\ttabs\nnew\n\nlines and trailing   ",
    "emoji at the end 🧑‍🚀",
]


def stream(
    detok: Detokenizer, ids: list[int], stop: list[str] | None = None
) -> tuple[list[str], DecodeState]:
    state = DecodeState(stop=stop or [])
    pieces = []
    for token in ids:
        detok.add_tokens(state, [token])
        pieces.append(detok.take_text(state, final=False))
        if state.stopped:
            break
    detok.finish(state)
    pieces.append(detok.take_text(state, final=True))
    return pieces, state


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_full_decode(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, _ = stream(Detokenizer(tokenizer), ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_the_texts_do_split_characters_across_tokens(tokenizer: Any) -> None:
    # Proves the test above exercises partial UTF-8: some single tokens decode to a broken character.
    ids = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    assert any(REPLACEMENT_CHAR in tokenizer.decode([token]) for token in ids)


def test_a_cut_off_character_at_the_end_is_dropped(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok 🚀", add_special_tokens=False)
    partial = next(i for i in range(1, len(ids) + 1) if REPLACEMENT_CHAR in tokenizer.decode(ids[:i]))
    pieces, _ = stream(Detokenizer(tokenizer), ids[:partial])
    assert "".join(pieces) == "ok "


def test_special_tokens_are_skipped(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    ids = [
        *tokenizer.encode("one", add_special_tokens=False),
        eos,
        *tokenizer.encode(" two", add_special_tokens=False),
    ]
    pieces, _ = stream(Detokenizer(tokenizer), ids)
    assert "".join(pieces) == "one two"


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("The answer is 42. END of the story", ["END"], "The answer is 42. "),
        ("The answer is 42. END of the story", ["story", "42"], "The answer is "),
        ("abc\n\nUser: hi", ["\n\nUser:"], "abc"),
        ("no stop string here", ["zzz"], "no stop string here"),
        ("Paris 🎉 party", ["🎉"], "Paris "),
    ],
)
def test_stop_strings_are_cut_and_never_sent(
    tokenizer: Any, text: str, stop: list[str], expected: str
) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, state = stream(Detokenizer(tokenizer), ids, stop)
    assert "".join(pieces) == expected
    assert state.stopped == (expected != text)


def test_a_possible_stop_string_is_held_back(tokenizer: Any) -> None:
    detok = Detokenizer(tokenizer)
    state = DecodeState(stop=["42!"])
    detok.add_tokens(state, tokenizer.encode("The answer is 4", add_special_tokens=False))
    assert detok.take_text(state, final=False) == "The answer is "  # "4" may start "42!"
    detok.add_tokens(state, tokenizer.encode("3", add_special_tokens=False))
    assert detok.take_text(state, final=False) == "43"
    detok.finish(state)
    assert detok.take_text(state, final=True) == ""


def test_token_text(tokenizer: Any) -> None:
    detok = Detokenizer(tokenizer)
    token = tokenizer.encode(" Paris", add_special_tokens=False)[0]
    assert detok.token_text(token) == tokenizer.decode([token])


def test_a_batch_gives_what_one_by_one_gives(tokenizer: Any) -> None:
    detok = Detokenizer(tokenizer)
    streams = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    batched = [
        DecodeState(stop=["zz"] if i % 2 else [], skip_special_tokens=i != 2) for i in range(len(TEXTS))
    ]
    pieces: list[list[str]] = [[] for _ in TEXTS]
    for step in range(max(map(len, streams))):
        updates = [(state, ids[step : step + 1]) for state, ids in zip(batched, streams, strict=True)]
        detok.add_tokens_batch(updates)
        for i, state in enumerate(batched):
            pieces[i].append(detok.take_text(state, final=False))
    for i, state in enumerate(batched):
        detok.finish(state)
        pieces[i].append(detok.take_text(state, final=True))
        alone, _ = stream(detok, streams[i], state.stop)
        assert "".join(pieces[i]) == "".join(alone)
