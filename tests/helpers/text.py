"""Helpers of the text-stream tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_forget.datamodules.text import TextStreamDataModule

SMALL = 20_000  # characters per corpus in these tests


def small_text_dm(**kwargs) -> TextStreamDataModule:
    """A set-up TextStreamDataModule over ``SMALL`` characters per corpus, blocks of 32."""
    kwargs.setdefault("max_chars_per_corpus", SMALL)
    kwargs.setdefault("block_size", 32)
    dm = TextStreamDataModule(**kwargs)
    dm.setup("fit")
    return dm


@pytest.fixture()
def text_file(tmp_path: Path) -> str:
    path = tmp_path / "notes.txt"
    path.write_text("Ein kleiner deutscher Text über Bäume und Flüsse. " * 400, encoding="utf-8")
    return str(path)
