"""Tokenizers for the text streams: bytes (no vocabulary file) or a local Hugging Face tokenizer.

:class:`ByteTokenizer` needs nothing on disk; :class:`HFTokenizer` wraps a tokenizer saved with
``save_pretrained`` (never downloaded); :func:`load_tokenizer` picks one from a string spec.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Optional, Protocol, Union

import torch
from torch import Tensor

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]


class Tokenizer(Protocol):
    """What the datamodule needs of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> Optional[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer: UTF-8 bytes 0..255 plus one end-of-document id 256 (vocabulary 257).

    Every string round-trips exactly (``decode(encode(s)) == s``) and no vocabulary file is
    needed. The end-of-document id :attr:`eos_id` (= 256) is never produced by :meth:`encode`;
    :class:`TextStreamDataModule` puts it between the documents of a corpus so a model sees where
    one file ends and the next begins. :meth:`decode` drops it (and any id outside 0..255), and
    replaces invalid UTF-8 sequences (a block may cut a multi-byte character) with U+FFFD.
    """

    def __init__(self) -> None:
        self._eos_id = 256

    @property
    def vocab_size(self) -> int:
        """257: the 256 byte values and the end-of-document id."""
        return 257

    @property
    def eos_id(self) -> int:
        """The end-of-document id, 256."""
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as ints in 0..255."""
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> Tensor:
        """:meth:`encode` as a ``LongTensor`` (fast: no Python list in between)."""
        data = text.encode("utf-8")
        if not data:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids: Union[Sequence[int], Tensor]) -> str:
        """The text of ``ids``; the end-of-document id and out-of-range ids are dropped."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory, behind the :class:`Tokenizer` API.

    Args:
        path: directory holding the tokenizer files (``tokenizer.json`` / ``tokenizer_config.json``
            ...), as written by ``save_pretrained``. Loaded with ``local_files_only=True``:
            nothing is downloaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """

    def __init__(self, path: str) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"`tokenizer` must be None (bytes) or a local tokenizer directory; {path!r} does not "
                "exist. Save one with `AutoTokenizer.from_pretrained(name).save_pretrained(dir)` on a "
                "machine with network access and pass `dir`."
            )
        from transformers import AutoTokenizer

        self.path = path
        self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)``)."""
        return len(self.hf)

    @property
    def eos_id(self) -> Optional[int]:
        """The tokenizer's end-of-sequence id (``None`` when it has none)."""
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.hf(text, add_special_tokens=False, verbose=False)["input_ids"])

    def decode(self, ids: Union[Sequence[int], Tensor]) -> str:
        """The text of ``ids``, special tokens skipped."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=8)
def load_tokenizer(tokenizer: Optional[str] = None) -> Union[ByteTokenizer, HFTokenizer]:
    """The tokenizer named by ``tokenizer``: ``None`` or ``"bytes"`` = :class:`ByteTokenizer`,
    anything else = the path of a local Hugging Face tokenizer (:class:`HFTokenizer`).

    Cached: the same spec returns the same object.
    """
    if tokenizer is None or tokenizer == "bytes":
        return ByteTokenizer()
    return HFTokenizer(os.path.abspath(os.path.expanduser(tokenizer)))
