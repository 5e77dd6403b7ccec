"""Text <-> token ids for the HTTP API.

The seeded model needs no download: one token per UTF-8 byte (ids 0-255). A
checkpoint's `tokenizer.json` (or the file `model.tokenizer` names) is read
through the `tokenizers` package, imported only then; which file applies is
`tokenizer_file`'s rule, shared with the replicas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kvroute.replicas.model.config import tokenizer_file

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer", "tokenizer_file"]


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens. Ids beyond 255 (the simulated model's samples)
    decode as their low byte, so any output renders as text."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t & 0xFF for t in token_ids).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as exc:
            raise ValueError(
                f"model.tokenizer names {path}, but the `tokenizers` package is not installed"
            ) from exc
        if not Path(path).is_file():
            raise ValueError(f"model.tokenizer: no such file {path}")
        try:
            self._tokenizer = _Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers package raises a bare Exception
            raise ValueError(f"{path}: not a tokenizer.json ({exc})") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; a rendered chat template already holds its special
        tokens, so it is encoded with `add_special_tokens=False`."""
        # The batch form without offsets: the same ids for about 60% of `encode`'s CPU,
        # paid once per prompt the router routes.
        (encoding,) = self._tokenizer.encode_batch_fast(
            [text], add_special_tokens=add_special_tokens
        )
        return list(encoding.ids)

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids))


def load_tokenizer(path: str | None) -> Tokenizer:
    return ByteTokenizer() if path is None else HFTokenizer(path)
