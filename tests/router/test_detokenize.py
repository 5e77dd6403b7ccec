"""Incremental detokenization with stop strings: every delta is final, stops cut exactly."""

from __future__ import annotations

import random
from collections.abc import Callable

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


class FullDecodeAssembler:
    """The specification: decode the whole output at every step (O(n) a step)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self.decode, self.stop, self.ids, self.sent = decode, stop, [], 0
        self.hold = max((len(s) - 1 for s in stop), default=0)
        self.stopped = False

    def add(self, token_ids: list[int], finished: bool) -> str:
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        text = self.decode(self.ids)
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            text, finished, self.stopped = text[: min(found)], True, True
        if not finished:
            partial = max(
                (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
            )
            safe = len(text) - partial
            while safe > self.sent and text[safe - 1] == "\ufffd":
                safe -= 1
            text = text[: max(safe, self.sent)]
        delta, self.sent = text[self.sent :], len(text)
        return delta


def test_windowed_decoding_streams_exactly_what_decoding_everything_would() -> None:
    """Tokens of 1-3 bytes (as a BPE vocabulary has), multi-byte characters split over
    tokens, invalid bytes, stop strings across steps: every step's delta equals the
    full decode's."""
    rng = random.Random(5)
    vocab = [bytes([b]) for b in range(256)]
    vocab += ["é".encode(), "€".encode()[:2], "€".encode()[2:], b"ab", b"E", b"ND", b"\xf0\x9f"]

    def decode(ids: list[int]) -> str:
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    alphabet = [*range(97, 100), 0xC3, 0xA9, *range(256, len(vocab))]
    for _ in range(400):
        ids = [rng.choice(alphabet) for _ in range(rng.randrange(1, 40))]
        stop = rng.choice([[], ["END"], ["b", "cab"], ["é!"]])
        cuts = sorted(rng.sample(range(1, len(ids) + 1), k=min(len(ids), rng.randrange(1, 6))))
        steps = [ids[a:b] for a, b in zip([0, *cuts], cuts, strict=False)]
        fast, spec = TextAssembler(decode, stop), FullDecodeAssembler(decode, stop)
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            assert fast.add(step, last) == spec.add(step, last), (ids, stop, steps)
