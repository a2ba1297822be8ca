"""Text streams for continual pre-training (re-exports; the code lives in three modules).

- :mod:`.tokenizers`: :class:`ByteTokenizer`, :class:`HFTokenizer`, :func:`load_tokenizer`;
- :mod:`.corpora`: :func:`load_corpus` (real text that ships with Python, or local files) and
  :func:`token_stream`;
- :mod:`.text_stream`: :class:`TextStreamDataModule`, one corpus per task packed into
  fixed-length blocks, with a compute-equivalent replay of earlier corpora (Ibrahim et al.,
  "Simple and Scalable Strategies to Continually Pre-train Large Language Models", TMLR 2024).
"""

from lightning_forget.datamodules.corpora import BUILTIN_CORPORA, corpus_name, load_corpus, token_stream
from lightning_forget.datamodules.text_stream import TextStreamDataModule, TokenBlockDataset
from lightning_forget.datamodules.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BUILTIN_CORPORA",
    "ByteTokenizer",
    "HFTokenizer",
    "TextStreamDataModule",
    "TokenBlockDataset",
    "Tokenizer",
    "corpus_name",
    "load_corpus",
    "load_tokenizer",
    "token_stream",
]
