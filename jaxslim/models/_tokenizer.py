"""A thin wrapper over the ``tokenizers`` package (a ``tokenizer.json``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "jaxslim.models.Tokenizer needs the 'tokenizers' package: pip install 'jaxslim[models]'"
        ) from e
    return tokenizers


class Tokenizer:
    """Text <-> token ids with a HF ``tokenizer.json`` (the ``tokenizers`` package).

    ``encode`` applies the file's post-processor by default (e.g. Llama's BOS), as
    ``transformers``' ``tokenizer(text)`` does.

    >>> from tokenizers import Tokenizer as Raw, models as tm, pre_tokenizers
    >>> raw = Raw(tm.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    >>> raw.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> from jaxslim import models
    >>> tok = models.Tokenizer.from_str(raw.to_str())
    >>> tok.encode("hello world"), tok.decode([2, 1])
    ([1, 2], 'world hello')
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    @classmethod
    def from_str(cls, json_text: str) -> Tokenizer:
        """From the text of a ``tokenizer.json``."""
        return cls(_tokenizers().Tokenizer.from_str(json_text))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """From a ``tokenizer.json`` file."""
        return cls(_tokenizers().Tokenizer.from_file(os.fspath(path)))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        if not isinstance(text, str):
            raise TypeError(f"models.Tokenizer.encode: text must be a str, got {type(text)}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (any int sequence or 1-D array)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (``None`` when absent)."""
        return self._tok.token_to_id(token)
