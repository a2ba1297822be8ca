"""Corpora read from disk and their token streams (datamodules/corpora.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_forget.datamodules.text import corpus_name, load_corpus, token_stream
from tests.helpers.text import text_file  # noqa: F401 (fixture)


@pytest.mark.parametrize("name", ["python_docs", "python_code"])
def test_builtin_corpora_load_deterministically(name: str) -> None:
    docs = load_corpus(name, 50_000)
    assert docs and all(isinstance(d, str) for d in docs)
    assert sum(len(d) for d in docs) == 50_000
    assert load_corpus(name, 50_000) == docs
    stream = token_stream(name, 50_000)
    assert stream.dtype == torch.long and stream.numel() >= 50_000
    assert token_stream(name, 50_000) is stream  # cached
    if name == "python_code":
        assert "import" in "".join(docs)
    else:
        assert "statement" in "".join(docs)

def test_local_corpora(tmp_path: Path, text_file: str) -> None:
    assert load_corpus(text_file)[0].startswith("Ein kleiner")
    assert load_corpus("path:" + text_file, 10) == ["Ein kleine"]
    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second", encoding="utf-8")
    (folder / "a.md").write_text("first", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG")
    assert load_corpus(str(folder)) == ["first", "second", "third"]
    assert corpus_name("path:" + str(folder)) == "dir"
    # Documents are joined by the EOS id.
    stream = token_stream(str(folder))
    assert stream.tolist().count(256) == 2
    with pytest.raises(ValueError, match="Unknown corpus"):
        load_corpus("wikipedia")
