"""``TextStreamDataModule``: one corpus per task, packed into token blocks, with token replay.

The corpora come from :mod:`.corpora` and the ids from :mod:`.tokenizers`; this module cuts the
token streams into fixed-length blocks (:class:`TokenBlockDataset`) and composes each task's
training set with a compute-equivalent replay of the earlier corpora.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset

from lightning_forget.datamodules.base import ContinualDataModule
from lightning_forget.datamodules.corpora import BUILTIN_CORPORA, corpus_name, is_path_spec, token_stream
from lightning_forget.datamodules.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["TextStreamDataModule", "TokenBlockDataset"]


class TokenBlockDataset(Dataset):
    """Fixed-length blocks cut from token streams, addressed by ``(stream, block)`` pairs.

    Item ``i`` is ``{"input_ids": LongTensor[block_size], "labels": LongTensor[block_size]}``
    where ``labels`` equals ``input_ids``: the model shifts them (position ``j`` predicts token
    ``j + 1``), as Hugging Face causal LMs do.

    Args:
        streams: one 1-D token tensor per source.
        index: ``(N, 2)`` integer array; row ``i`` = (source, block number) of item ``i``; the
            block covers tokens ``[block * block_size, (block + 1) * block_size)`` of its stream.
        block_size: tokens per block.
    """

    def __init__(self, streams: Sequence[Tensor], index: np.ndarray, block_size: int) -> None:
        self.streams = list(streams)
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 2)
        self.block_size = block_size

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        source, block = (int(v) for v in self.index[i])
        start = block * self.block_size
        ids = self.streams[source][start : start + self.block_size].clone()
        return {"input_ids": ids, "labels": ids.clone()}


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _draw(rng: np.random.Generator, population: int, count: int) -> np.ndarray:
    """``count`` indices of ``range(population)``: without replacement when ``count <= population``,
    otherwise whole shuffled passes over the population followed by a partial one."""
    if count <= 0 or population <= 0:
        return np.empty(0, dtype=np.int64)
    passes = [rng.permutation(population) for _ in range(count // population)]
    rest = count % population
    if rest:
        passes.append(rng.choice(population, size=rest, replace=False))
    return np.concatenate(passes).astype(np.int64)


# ---------------------------------------------------------------------------------- datamodule
class TextStreamDataModule(ContinualDataModule):
    """A sequence of text corpora, one per task, for continual pre-training with token replay.

    Implements the data side of "Simple and Scalable Strategies to Continually Pre-train Large
    Language Models" (Ibrahim, Thérien, Gupta, Richter, Anthony, Lesort, Belilovsky, Rish;
    TMLR 2024): when a model moves on to a new corpus, a fraction of the new corpus's tokens is
    *replaced* by tokens replayed from the earlier corpora, so each task costs the same compute
    with or without replay (paired with LR re-warming and re-decaying, see ``LRRewarming``).

    Mechanism:

    - **Tokens.** Each corpus (:func:`load_corpus`) is tokenised once (:func:`token_stream`;
      documents joined by the tokenizer's EOS id) and its stream split into a training head and a
      held-out, contiguous validation tail of ``ceil(val_fraction * tokens / block_size)`` blocks.
    - **Blocks.** Both parts are cut into non-overlapping blocks of ``block_size`` tokens (the
      last partial block is dropped). An item is ``{"input_ids", "labels"}``, both
      ``LongTensor[block_size]`` and equal: the model shifts the labels, so a block gives
      ``block_size - 1`` next-token predictions (what :class:`CausalLMModule` expects).
    - **Budget.** Task ``t`` trains on ``n_t = blocks_per_task`` blocks per epoch (default: the
      number of training blocks of corpus ``t``).
    - **Replay.** For ``t > 0``, exactly ``r_t = round(replay_fraction * n_t)`` (half rounded
      up) of those blocks are drawn uniformly from the union of the training blocks of corpora
      ``0..t-1`` (without replacement while the union is large enough), and ``n_t - r_t`` come
      from corpus ``t`` (a random subset; whole shuffled passes if ``n_t`` exceeds the corpus).
      Task 0 has no replay. The mixture is shuffled by the loader, so a batch holds replayed
      blocks in proportion ``replay_fraction`` in expectation (not exactly per batch).
    - **Determinism.** The index lists depend only on ``(seed, task)``, never on the rank or
      the order of calls: every DDP rank builds the same lists and Lightning's
      ``DistributedSampler`` shards them.
    - **Joint baseline** (``joint=True``): one training phase on the union of every corpus's own
      blocks, ``n_t`` of corpus ``t`` each, without replay. Its budget per epoch is the sum of the
      task budgets, i.e. the same number of blocks (tokens) as the whole sequential stream, which
      is the "re-train on the union" baseline at equal compute.

    Args:
        corpora: the corpora, one task each, in order (see :func:`load_corpus`).
        block_size: tokens per block (the model's context length).
        max_chars_per_corpus: read at most this many characters of each corpus (``None`` = all;
            ``python_code`` is then tens of MB).
        val_fraction: fraction of each corpus's tokens held out (from its end) for validation;
            at least one block is held out.
        replay_fraction: fraction of each later task's blocks replayed from earlier corpora, in
            ``[0, 1)``.
        tokenizer: ``None`` for :class:`ByteTokenizer` (vocabulary 257), or the local path of a
            Hugging Face tokenizer.
        blocks_per_task: training blocks per task and epoch (the token budget divided by
            ``block_size``); ``None`` = each corpus's own number of training blocks.
        epochs_per_task: training epochs per task.
        batch_size: training batch size.
        num_workers: ``DataLoader`` workers.
        joint: train once on the union of all corpora (see above).
        task: serve only this task's training data (for one-``fit``-per-task use).
        seed: seed of the block selection and of the loaders' shuffling.
        eval_batch_size: validation batch size (defaults to ``batch_size``).
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: an argument is out of range (the message names it), a corpus is unknown, or a
            corpus is too short for one training and one validation block (raised at
            :meth:`setup`, naming the corpus and its token count).

    Note:
        Exposes :attr:`vocab_size`, :attr:`corpus_names` and :attr:`block_size` for linking to
        the model (``CausalLMModule(vocab_size=..., block_size=..., corpus_names=...)``), and
        :meth:`task_indices`, :meth:`replay_counts`, :meth:`num_train_blocks` for inspection.
        The datamodule has no state to checkpoint: everything is recomputed from ``seed``.
    """

    def __init__(
        self,
        corpora: Sequence[str] = ("python_docs", "python_code"),
        block_size: int = 128,
        max_chars_per_corpus: Optional[int] = 250_000,
        val_fraction: float = 0.05,
        replay_fraction: float = 0.0,
        tokenizer: Optional[str] = None,
        blocks_per_task: Optional[int] = None,
        epochs_per_task: int = 1,
        batch_size: int = 16,
        num_workers: int = 0,
        joint: bool = False,
        task: Optional[int] = None,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        if isinstance(corpora, str):
            raise TypeError(
                f"`corpora` must be a list of corpus names or paths, got the string {corpora!r}. "
                f"Fix: `corpora=[{corpora!r}]`."
            )
        corpora = list(corpora)
        if not corpora or not all(isinstance(c, str) and c for c in corpora):
            raise ValueError(
                f"`corpora` must be a non-empty list of corpus names or paths, got {corpora!r}. "
                f"Built-in names: {list(BUILTIN_CORPORA)}."
            )
        for corpus in corpora:
            if corpus not in BUILTIN_CORPORA and not is_path_spec(corpus):
                raise ValueError(
                    f"`corpora` holds {corpus!r}, which is neither a built-in corpus {list(BUILTIN_CORPORA)} "
                    "nor an existing file or directory. Fix the name or the path."
                )
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2:
            raise ValueError(f"`block_size` must be an int >= 2 (tokens per block), got {block_size!r}.")
        if max_chars_per_corpus is not None and (
            not isinstance(max_chars_per_corpus, int) or isinstance(max_chars_per_corpus, bool) or max_chars_per_corpus < 1
        ):
            raise ValueError(
                f"`max_chars_per_corpus` must be a positive int or None (no cap), got {max_chars_per_corpus!r}."
            )
        if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"`val_fraction` must be in (0, 1) (each corpus needs validation blocks), got {val_fraction!r}."
            )
        if not isinstance(replay_fraction, (int, float)) or not 0.0 <= replay_fraction < 1.0:
            raise ValueError(
                f"`replay_fraction` must be in [0, 1) (0 = no replay; e.g. 0.05 or 0.25), got {replay_fraction!r}."
            )
        if blocks_per_task is not None and (
            not isinstance(blocks_per_task, int) or isinstance(blocks_per_task, bool) or blocks_per_task < 1
        ):
            raise ValueError(
                f"`blocks_per_task` must be a positive int or None (= each corpus's own blocks), got {blocks_per_task!r}."
            )
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise TypeError(
                f"`tokenizer` must be None (bytes) or the path of a local tokenizer, got {type(tokenizer).__name__}."
            )
        super().__init__(
            num_tasks=len(corpora),
            epochs_per_task=epochs_per_task,
            batch_size=batch_size,
            num_workers=num_workers,
            joint=joint,
            task=task,
            seed=seed,
            eval_batch_size=eval_batch_size,
            drop_last=drop_last,
        )
        self.corpora = corpora
        self.block_size = block_size
        self.max_chars_per_corpus = max_chars_per_corpus
        self.val_fraction = float(val_fraction)
        self.replay_fraction = float(replay_fraction)
        self.tokenizer = tokenizer
        self.blocks_per_task = blocks_per_task
        self._train_streams: Optional[list[Tensor]] = None
        self._val_streams: list[Tensor] = []
        self._task_index: dict[tuple[int, bool], np.ndarray] = {}

    # ------------------------------------------------------------------ properties for linking
    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (257 for bytes)."""
        return load_tokenizer(self.tokenizer).vocab_size

    @property
    def corpus_names(self) -> list[str]:
        """Short names of the corpora, in task order (for logs)."""
        return [corpus_name(c) for c in self.corpora]

    @property
    def tokenizer_object(self) -> Union[ByteTokenizer, HFTokenizer]:
        """The tokenizer instance (to decode blocks)."""
        return load_tokenizer(self.tokenizer)

    # ------------------------------------------------------------------ building
    @override
    def prepare_data(self) -> None:
        # Local files only: tokenising here warms the per-process cache; state is built in setup().
        for corpus in self.corpora:
            token_stream(corpus, self.max_chars_per_corpus, self.tokenizer)

    @override
    def setup(self, stage: str) -> None:
        self._build()

    def _build(self) -> None:
        if self._train_streams is not None:
            return
        train, val = [], []
        for corpus in self.corpora:
            stream = token_stream(corpus, self.max_chars_per_corpus, self.tokenizer)
            n_tokens = int(stream.numel())
            n_val_blocks = max(1, math.ceil(self.val_fraction * n_tokens / self.block_size))
            n_val_tokens = n_val_blocks * self.block_size
            if n_tokens - n_val_tokens < self.block_size:
                raise ValueError(
                    f"Corpus {corpus!r} has {n_tokens} tokens: too few for one training block and "
                    f"{n_val_blocks} validation block(s) of block_size={self.block_size}. Fix: raise "
                    f"`max_chars_per_corpus` (now {self.max_chars_per_corpus}), lower `block_size`, or "
                    "use a longer corpus."
                )
            train.append(stream[: n_tokens - n_val_tokens])
            val.append(stream[n_tokens - n_val_tokens :])
        self._train_streams, self._val_streams = train, val
        if self.blocks_per_task is not None:
            short = [
                (name, n) for name, n in zip(self.corpus_names, self._num_blocks()) if n < self.blocks_per_task
            ]
            if short:
                rank_zero_info(
                    f"TextStreamDataModule: blocks_per_task={self.blocks_per_task} exceeds the training "
                    f"blocks of {short}; their blocks repeat within a task."
                )

    def _num_blocks(self) -> list[int]:
        assert self._train_streams is not None
        return [int(s.numel()) // self.block_size for s in self._train_streams]

    def num_train_blocks(self, corpus: int) -> int:
        """Number of distinct training blocks of corpus ``corpus``."""
        self._build()
        return self._num_blocks()[corpus]

    def num_val_blocks(self, corpus: int) -> int:
        """Number of validation blocks of corpus ``corpus``."""
        self._build()
        return int(self._val_streams[corpus].numel()) // self.block_size

    def task_budget(self, task: int) -> int:
        """Training blocks per epoch of ``task`` (replayed ones included)."""
        self._check_task(task)
        return self.blocks_per_task if self.blocks_per_task is not None else self.num_train_blocks(task)

    def replay_counts(self, task: int) -> tuple[int, int]:
        """``(own, replayed)`` numbers of blocks in the training set of ``task`` (without joint)."""
        budget = self.task_budget(task)
        replayed = 0 if task == 0 else _round_half_up(self.replay_fraction * budget)
        return budget - replayed, replayed

    def _check_task(self, task: int) -> None:
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= task < self.num_tasks:
            raise ValueError(f"`task` must be in [0, {self.num_tasks - 1}], got {task!r}.")

    def _index(self, task: int, with_replay: bool) -> np.ndarray:
        key = (task, with_replay)
        if key not in self._task_index:
            self._task_index[key] = self._make_index(task, with_replay)
        return self._task_index[key]

    def _make_index(self, task: int, with_replay: bool) -> np.ndarray:
        own_count, replay_count = self.replay_counts(task)
        if not with_replay:
            own_count, replay_count = own_count + replay_count, 0
        rng = np.random.default_rng([self.seed, task, 7283])
        sizes = self._num_blocks()
        own = _draw(rng, sizes[task], own_count)
        parts = [np.stack([np.full_like(own, task), own], axis=1)]
        if replay_count:
            offsets = np.cumsum([0] + sizes[:task])
            drawn = _draw(rng, int(offsets[-1]), replay_count)
            source = np.searchsorted(offsets, drawn, side="right") - 1
            parts.append(np.stack([source, drawn - offsets[source]], axis=1))
        return np.concatenate(parts).astype(np.int64)

    def task_indices(self, task: int, with_replay: bool = True) -> list[tuple[int, int]]:
        """The ``(corpus, block)`` pairs of the training set of ``task``: its own blocks first,
        then the replayed ones. ``with_replay=False`` gives the joint-mode set (own blocks only)."""
        self._check_task(task)
        self._build()
        return [(int(c), int(b)) for c, b in self._index(task, with_replay)]

    # ------------------------------------------------------------------ datasets
    @override
    def train_dataset(self, task: int) -> TokenBlockDataset:
        """Task ``task``'s training blocks: own plus replayed (own only in joint mode)."""
        self._check_task(task)
        self._build()
        assert self._train_streams is not None
        return TokenBlockDataset(self._train_streams, self._index(task, not self.joint), self.block_size)

    @override
    def val_dataset(self, task: int) -> TokenBlockDataset:
        """The held-out tail of corpus ``task``, in order."""
        self._check_task(task)
        self._build()
        blocks = np.arange(self.num_val_blocks(task), dtype=np.int64)
        index = np.stack([np.zeros_like(blocks), blocks], axis=1)
        return TokenBlockDataset([self._val_streams[task]], index, self.block_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(corpora={self.corpora}, block_size={self.block_size}, "
            f"replay_fraction={self.replay_fraction}, blocks_per_task={self.blocks_per_task}, joint={self.joint})"
        )
