"""Text <-> token ids for the HTTP API.

The default needs no download: one token per UTF-8 byte (ids 0-255). A local
Hugging Face `tokenizer.json` is used when the config names one (through the
`tokenizers` package, imported only then).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


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
        self._tokenizer = _Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; a rendered chat template already holds its special
        tokens, so it is encoded with `add_special_tokens=False`."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids))


def load_tokenizer(path: str | None) -> Tokenizer:
    return ByteTokenizer() if path is None else HFTokenizer(path)


def tokenizer_file(tokenizer: str | None, model_path: str | None) -> str | None:
    """The tokenizer.json the router uses: `model.tokenizer` when set, else the one in
    the model directory `model.path` (the replicas' checkpoint) when there is one."""
    if tokenizer is not None:
        return tokenizer
    if model_path is not None and (Path(model_path) / "tokenizer.json").is_file():
        return str(Path(model_path) / "tokenizer.json")
    return None
