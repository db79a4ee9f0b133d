"""Incremental detokenization: characters split across tokens, stop strings, hold-back."""

from __future__ import annotations

from distserve.model.tokenizer import Tokenizer
from distserve.runtime.detokenizer import IncrementalDetokenizer

TOK = Tokenizer.bytes_only(512)  # one token per UTF-8 byte: characters span tokens


def _feed(detok: IncrementalDetokenizer, text: str) -> list[str]:
    return [detok.add([b]) for b in text.encode("utf-8")]


def test_multibyte_characters_wait_until_complete() -> None:
    d = IncrementalDetokenizer(TOK)
    pieces = _feed(d, "a€b")  # '€' is three bytes
    assert pieces == ["a", "", "", "€", "b"]
    assert d.text == "a€b"


def test_stop_string_cuts_text_and_is_not_emitted() -> None:
    d = IncrementalDetokenizer(TOK, stop=("STOP",))
    out = "".join(_feed(d, "hello STOP world"))
    assert d.stopped
    assert out == "hello " and d.text == "hello "
    assert d.add([65]) == ""  # nothing after the stop


def test_prefix_of_stop_string_is_held_back_then_released() -> None:
    d = IncrementalDetokenizer(TOK, stop=("###",))
    pieces = _feed(d, "ab##")
    assert "".join(pieces) == "ab"  # '##' might still become '###'
    assert "".join(_feed(d, "c")) == "##c"
    assert not d.stopped


def test_flush_releases_a_held_back_tail() -> None:
    d = IncrementalDetokenizer(TOK, stop=("END",))
    assert "".join(_feed(d, "xyEN")) == "xy"
    assert d.flush() == "EN"
    assert d.text == "xyEN"


def test_earliest_of_several_stop_strings_wins() -> None:
    d = IncrementalDetokenizer(TOK, stop=("cd", "b"))
    "".join(_feed(d, "abcd"))
    assert d.text == "a"


def test_stop_string_spanning_many_tokens_found_across_calls() -> None:
    d = IncrementalDetokenizer(TOK, stop=("the end",))
    for ch in "and that was the end of it":
        d.add(list(ch.encode()))
    assert d.stopped and d.text == "and that was "


def test_ids_past_the_bytes_are_visible() -> None:
    # A random-weight model samples ids >= 256 most of the time: its text must not be blank.
    d = IncrementalDetokenizer(TOK)
    pieces = [d.add([i]) for i in (104, 300, 105, 511)]
    assert pieces == ["h", "<300>", "i", "<511>"]
    assert TOK.decode([0xE2, 0x82, 0xAC, 400]) == "€<400>"
