"""Tokenizers of the text streams (datamodules/tokenizers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_forget.datamodules.text import ByteTokenizer, load_corpus, load_tokenizer
from tests.helpers.text import small_text_dm


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    for text in ["", "hello world", "Grüße, 世界! 🙂\n\ttabs", "x" * 1000]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode_tensor(text).tolist() == ids
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.decode([104, 256, 105]) == "hi"  # EOS is dropped
    assert tok.decode(torch.tensor([104, 105])) == "hi"
    assert load_tokenizer(None) is load_tokenizer(None)

def test_hf_tokenizer_by_local_path(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(load_corpus("python_docs", 30_000), vocab_size=300, special_tokens=["<eos>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    hf.save_pretrained(tmp_path / "tok")

    tok = load_tokenizer(str(tmp_path / "tok"))
    text = "The with statement is used to wrap the execution of a block."
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == hf.eos_token_id
    dm = small_text_dm(corpora=["python_docs"], tokenizer=str(tmp_path / "tok"))
    assert dm.vocab_size == len(hf)
    block = dm.train_dataset(0)[0]["input_ids"]
    assert int(block.max()) < dm.vocab_size
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
