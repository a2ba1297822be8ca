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


def tiny_token_stream(epochs_per_task: int = 1, **kwargs) -> TextStreamDataModule:
    """Two corpora (Python docs, Python code) of 16 blocks of 16 bytes each, batches of 4."""
    kwargs.setdefault("corpora", ["python_docs", "python_code"])
    kwargs.setdefault("block_size", 16)
    kwargs.setdefault("max_chars_per_corpus", 3000)
    kwargs.setdefault("blocks_per_task", 16)
    kwargs.setdefault("batch_size", 4)
    return TextStreamDataModule(epochs_per_task=epochs_per_task, **kwargs)


TINY_INSTRUCTIONS = {"examples_per_task": 24, "val_examples_per_task": 4, "batch_size": 4}


def tiny_instruction_stream(epochs_per_task: int = 1, **kwargs):
    """The three built-in instruction tasks, 24 training examples each (6 batches of 4)."""
    from lightning_forget.datamodules import InstructionStreamDataModule

    for key, value in TINY_INSTRUCTIONS.items():
        kwargs.setdefault(key, value)
    return InstructionStreamDataModule(epochs_per_task=epochs_per_task, **kwargs)


TINY_LM = {"vocab_size": 257, "block_size": 96, "n_layer": 2, "n_embd": 32, "n_head": 2}


def tiny_lm(dm=None, model: str = "gpt2"):
    """A 2-layer GPT-2 (or Llama) causal LM of width 32 over bytes with 96 positions, built from a config."""
    from lightning_forget.modules import CausalLMModule

    return CausalLMModule(model=model, **TINY_LM)
