"""Output token ids to text, incrementally, with OpenAI's `stop` strings.

The whole output is decoded again at each step and only the new suffix is sent:
a token can change how earlier bytes decode (a multi-byte character split over
tokens), so decoding token by token would be wrong. Text that could still turn
out to be the start of a stop string, or an incomplete character (U+FFFD at the
end), is held back until the next step or the end.

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
        self._sent = 0
        self.stopped = False
        self.text = ""

    def add(self, token_ids: Sequence[int], finished: bool) -> str:
        """Take a step's new tokens; return the text that is now certain. After a stop
        string is found, `stopped` is True and later calls return nothing."""
        if self.stopped:
            return ""
        self._token_ids.extend(token_ids)
        text = self._decode(self._token_ids)
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
