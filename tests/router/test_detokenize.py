"""Incremental detokenization with stop strings: every delta is final, stops cut exactly."""

from __future__ import annotations

from kvroute.router.openai.detokenize import TextAssembler
from kvroute.router.openai.tokenizer import ByteTokenizer

DECODE = ByteTokenizer().decode


def feed(assembler: TextAssembler, steps: list[bytes], finish: bool = True) -> list[str]:
    deltas = [assembler.add(list(step), False) for step in steps]
    if finish:
        deltas.append(assembler.add([], True))
    return deltas


def test_without_stops_every_step_sends_its_text() -> None:
    assembler = TextAssembler(DECODE)
    assert feed(assembler, [b"Hel", b"lo"]) == ["Hel", "lo", ""]
    assert assembler.text == "Hello"


def test_a_stop_string_cuts_the_text_before_it_even_across_steps() -> None:
    assembler = TextAssembler(DECODE, ["END"])
    assert feed(assembler, [b"abc E", b"N", b"D tail"], finish=False) == ["abc ", "", ""]
    assert (assembler.stopped, assembler.text) == (True, "abc ")
    assert assembler.add(list(b"more"), True) == ""


def test_text_that_might_start_a_stop_string_is_held_then_released() -> None:
    assembler = TextAssembler(DECODE, ["END"])
    assert feed(assembler, [b"xE", b"Nx"]) == ["x", "ENx", ""]
    assert (assembler.stopped, assembler.text) == (False, "xENx")


def test_the_earliest_of_several_stop_strings_wins() -> None:
    assembler = TextAssembler(DECODE, ["zz", "b"])
    assert "".join(feed(assembler, [b"a b zz"])) == "a "


def test_a_character_split_over_tokens_is_sent_whole() -> None:
    e_acute = "é".encode()
    assembler = TextAssembler(DECODE)
    assert feed(assembler, [e_acute[:1], e_acute[1:], b"!"]) == ["", "é", "!", ""]


def test_the_deltas_add_up_to_the_final_text() -> None:
    assembler = TextAssembler(DECODE, ["<|end|>"])
    deltas = feed(assembler, [b"one <", b"|e", b"nd", b"|> two"], finish=False)
    assert "".join(deltas) == assembler.text == "one "
