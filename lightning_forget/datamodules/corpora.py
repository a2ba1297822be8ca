"""Corpora for the text streams: real text read from disk, never downloaded, in a fixed order.

:func:`load_corpus` reads the documents of a corpus: Python's own help topics
(``"python_docs"``), the standard library's sources (``"python_code"``) or any local text file
or directory. :func:`token_stream` tokenises a corpus once per process into one stream of ids.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_forget.datamodules.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["BUILTIN_CORPORA", "corpus_name", "is_path_spec", "load_corpus", "token_stream"]

BUILTIN_CORPORA = ("python_docs", "python_code")
"""Names of the corpora that ship with Python itself (no download)."""

# Folders of the standard library that are not the library's own code (or are its test suite).
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
# Suffixes read when a corpus is a directory.
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".tex", ".html", ".xml", ".yaml", ".yml")


def is_path_spec(corpus: str) -> bool:
    """Whether ``corpus`` names a local file or directory (``"path:..."`` or an existing path)."""
    return corpus.startswith("path:") or (corpus not in BUILTIN_CORPORA and os.path.exists(corpus))


def _resolve_path(corpus: str) -> str:
    path = corpus[len("path:") :] if corpus.startswith("path:") else corpus
    return os.path.abspath(os.path.expanduser(path))


def corpus_name(corpus: str) -> str:
    """A short name of ``corpus`` for logs: the built-in name, or the file/directory base name."""
    if corpus in BUILTIN_CORPORA:
        return corpus
    return os.path.basename(os.path.normpath(_resolve_path(corpus))) or corpus


def _capped(documents: Any, max_chars: Optional[int]) -> list[str]:
    """Take documents in order until ``max_chars`` characters (the last one is cut)."""
    out: list[str] = []
    total = 0
    for doc in documents:
        if not doc:
            continue
        if max_chars is not None and total + len(doc) > max_chars:
            rest = max_chars - total
            if rest > 0:
                out.append(doc[:rest])
            break
        out.append(doc)
        total += len(doc)
    return out


def _python_docs() -> Any:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _walk_sorted(root: str, suffixes: tuple[str, ...], skip_dirs: frozenset[str] = frozenset()) -> Any:
    """Paths of files under ``root`` with one of ``suffixes``, in a platform-independent order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(suffixes) and not name.startswith("."):
                yield os.path.join(dirpath, name)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def _python_code() -> Any:
    stdlib = os.path.dirname(os.__file__)
    for path in _walk_sorted(stdlib, (".py",), _SKIPPED_STDLIB_DIRS):
        yield _read_text(path)


def _local_text(path: str) -> Any:
    if os.path.isfile(path):
        yield _read_text(path)
        return
    for file in _walk_sorted(path, _TEXT_SUFFIXES):
        yield _read_text(file)


def load_corpus(corpus: str, max_chars: Optional[int] = None) -> list[str]:
    """The documents of ``corpus``, read from disk (never downloaded), deterministic.

    Args:
        corpus: ``"python_docs"`` (English prose: every topic of Python's help system,
            ``pydoc_data.topics``, in sorted topic order); ``"python_code"`` (the ``.py`` files of
            the standard library next to ``os.py``, walked in sorted order, without
            ``site-packages`` and the test suites); ``"path:/some/file_or_dir"`` or just an
            existing path (a text file is one document; a directory gives every text file under
            it, sorted, one document each).
        max_chars: stop after this many characters (the last document is cut); ``None`` reads
            everything (``python_code`` is then tens of MB).

    Raises:
        ValueError: ``corpus`` is neither a built-in name nor an existing path, or it is empty.
    """
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"`max_chars` must be a positive int or None, got {max_chars!r}.")
    if corpus == "python_docs":
        documents = _capped(_python_docs(), max_chars)
    elif corpus == "python_code":
        documents = _capped(_python_code(), max_chars)
    elif is_path_spec(corpus):
        path = _resolve_path(corpus)
        if not os.path.exists(path):
            raise ValueError(f"Corpus {corpus!r}: the path {path!r} does not exist.")
        documents = _capped(_local_text(path), max_chars)
    else:
        raise ValueError(
            f"Unknown corpus {corpus!r}: use one of {list(BUILTIN_CORPORA)}, or the path of a local "
            "text file or directory (optionally prefixed with 'path:')."
        )
    if not documents:
        raise ValueError(f"Corpus {corpus!r} holds no text (no readable text files or an empty file).")
    return documents


def _corpus_key(corpus: str) -> str:
    return f"path:{_resolve_path(corpus)}" if is_path_spec(corpus) else corpus


@functools.lru_cache(maxsize=32)
def _token_stream_cached(corpus_key: str, max_chars: Optional[int], tokenizer: Optional[str]) -> Tensor:
    tok = load_tokenizer(tokenizer)
    documents = load_corpus(corpus_key, max_chars)
    eos = tok.eos_id
    pieces: list[Tensor] = []
    iterator: Any = documents
    if isinstance(tok, HFTokenizer) and len(documents) > 50:
        from tqdm.auto import tqdm

        from lightning.fabric.utilities.rank_zero import rank_zero_only

        iterator = tqdm(documents, desc=f"tokenising {corpus_name(corpus_key)}", disable=rank_zero_only.rank != 0)
    for i, doc in enumerate(iterator):
        if i > 0 and eos is not None:
            pieces.append(torch.tensor([eos], dtype=torch.long))
        if isinstance(tok, ByteTokenizer):
            pieces.append(tok.encode_tensor(doc))
        else:
            pieces.append(torch.tensor(tok.encode(doc), dtype=torch.long))
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    return stream


def token_stream(corpus: str, max_chars: Optional[int] = None, tokenizer: Optional[str] = None) -> Tensor:
    """The token ids of ``corpus`` as one 1-D ``LongTensor``, documents joined by the tokenizer's
    EOS id (concatenated directly when it has none).

    Tokenised once per ``(corpus, max_chars, tokenizer)`` and cached for the process (do not
    modify the returned tensor). See :func:`load_corpus` and :func:`load_tokenizer`.
    """
    return _token_stream_cached(_corpus_key(corpus), max_chars, tokenizer)
