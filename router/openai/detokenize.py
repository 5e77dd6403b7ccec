"""Output token ids to text, incrementally, with OpenAI's `stop` strings.

A token can change how earlier bytes decode (a multi-byte character split over
tokens), so decoding token by token would be wrong; decoding the whole output
again at every step is right but costs O(n) a step, O(n^2) a request. So, as
vLLM's detokenizer does, each step decodes a short window twice: from
`prefix_offset` to `read_offset` (text already sent) and from `prefix_offset` to
the end; the difference is the new text, kept once it no longer ends in an
incomplete character (U+FFFD), and decoded again with the next step's otherwise.
Starting both decodes at the same earlier token keeps a tokenizer's word-start
rules (a leading space) the same in both.
Text that could still turn out to be the start of a stop string is held back
until the next step or the end.

Invariant: the concatenation of every `delta` equals the final text, which is the
decoded output cut just before the first stop string, stop string excluded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextAssembler:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._hold = max((len(s) - 1 for s in self._stop), default=0)
        self._token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._decoded = ""  # the text of _token_ids[:_read_offset]
        self._sent = 0
        self.stopped = False
        self.text = ""

    def add(self, token_ids: Sequence[int], finished: bool) -> str:
        """Take a step's new tokens; return the text that is now certain. After a stop
        string is found, `stopped` is True and later calls return nothing."""
        if self.stopped:
            return ""
        self._token_ids.extend(token_ids)
        text = self._read_new(finished)
        cut = self._first_stop(text)
        if cut is not None:
            text, finished = text[:cut], True
            self.stopped = True
        final = text
        if not finished:
            safe = len(text) - self._partial_stop(text)
            while safe > self._sent and text[safe - 1 : safe] == REPLACEMENT:
                safe -= 1
            text = text[: max(safe, self._sent)]
        delta = text[self._sent :]
        self._sent = len(text)
        self.text = final if finished else text
        return delta

    def _read_new(self, finished: bool) -> str:
        """The whole output's text. The tokens past `read_offset` join `_decoded` unless
        their text ends in an incomplete character and more may come; then they are
        decoded again, with the next step's, until it is complete."""
        ids = self._token_ids
        if self._read_offset == len(ids):
            return self._decoded
        start = self._prefix_offset
        known = self._decode(ids[start : self._read_offset]) if self._read_offset > start else ""
        new = self._decode(ids[start:])[len(known) :]
        if not finished and (not new or new.endswith(REPLACEMENT)):
            return self._decoded + new
        self._decoded += new
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return self._decoded

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _first_stop(self, text: str) -> int | None:
        # A stop string may end inside text already sent only if it began in the
        # held-back tail, so the search starts there.
        start = max(0, self._sent - self._hold)
        found = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(found) if found else None
