"""A continual instruction stream for language models: prompt/answer tasks of distinct formats.

:class:`InstructionStreamDataModule` serves one task per training phase. Each example is a prompt
followed by its answer; the model is trained on the answer tokens only (prompt and padding
labels are ``-100``) and evaluated per task by the loss on the answer and by **exact match**
(every answer token, end-of-answer included, is the model's top prediction given the prompt and
the answer so far: exactly when greedy decoding would write the answer).

Built-in tasks (no download: the words come from the running Python itself — its keyword list,
the names in :mod:`builtins`, ``sys.stdlib_module_names`` and the text of its help topics,
``pydoc_data.topics``):

- ``"category"`` (classification): ``"Kind of `len`:"`` → ``" function"`` — one of keyword,
  function, exception, type, module;
- ``"next_word"`` (extraction): ``"Text: ...six words...\\nWord after \\"w\\":"`` → the word that
  follows ``w`` in the text;
- ``"length_sum"`` (arithmetic): ``"len(\\"lambda\\") + len(\\"yield\\") ="`` → ``" 11"``.

Users' own tasks are files of prompt/answer pairs: JSON (a list of objects), JSON Lines, or CSV
with a header, passed as paths in ``tasks``.
"""

from __future__ import annotations

import builtins
import csv
import functools
import json
import keyword
import os
import re
import sys
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_forget.datamodules.base import ContinualDataModule
from lightning_forget.datamodules.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer
from lightning_forget.validation import check_int, check_str, message

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = [
    "BUILTIN_INSTRUCTION_TASKS",
    "builtin_capacity",
    "InstructionDataset",
    "InstructionStreamDataModule",
    "builtin_examples",
    "load_examples",
    "pad_token_batch",
    "read_records",
]

IGNORE_INDEX = -100

BUILTIN_INSTRUCTION_TASKS = ("category", "next_word", "length_sum")
"""Names of the generated tasks, in their default order."""

_FILE_SUFFIXES = (".json", ".jsonl", ".csv")
#: Longest built-in example in characters (with its end token: within the default ``max_length``).
_MAX_BUILTIN_CHARS = 88


# ---------------------------------------------------------------------------------- words
def _categorised_words() -> dict[str, str]:
    """``{word: kind}`` over Python's keywords, builtins and standard-library modules; a word
    of two kinds (e.g. a module named like a function) is left out."""
    kinds: dict[str, set[str]] = {}

    def add(word: str, kind: str) -> None:
        if word.isidentifier() and not word.startswith("_"):
            kinds.setdefault(word, set()).add(kind)

    for word in keyword.kwlist:
        add(word, "keyword")
    for name in dir(builtins):
        value = getattr(builtins, name)
        if isinstance(value, type):
            add(name, "exception" if issubclass(value, BaseException) else "type")
        elif callable(value):
            add(name, "function")
    for name in getattr(sys, "stdlib_module_names", ()):
        add(name, "module")
    return {word: next(iter(k)) for word, k in sorted(kinds.items()) if len(k) == 1}


def _topic_words() -> list[list[str]]:
    """Runs of lower-case alphabetic words from Python's help topics, in a fixed order."""
    from pydoc_data.topics import topics

    runs = []
    for key in sorted(topics):
        words = re.findall(r"[A-Za-z]+", topics[key])
        runs.append([w.lower() for w in words if 2 <= len(w) <= 10])
    return runs


def _next_word_prompt(text: list[str], i: int) -> tuple[str, str]:
    return f"Text: {' '.join(text)}\nWord after \"{text[i]}\":", f" {text[i + 1]}"


def _length_sum_words() -> list[str]:
    return sorted({w for w in _categorised_words() if len(w) <= 8})


#: Sizes up to which a built-in task is known to have enough distinct examples without counting
#: them (``next_word`` has about 200,000 on CPython 3.11; counting takes seconds, so it is done
#: only for larger requests). ``tests/test_instructions.py`` checks these bounds.
_SURELY_AVAILABLE = {"category": 0, "next_word": 50_000, "length_sum": 0}


@functools.lru_cache(maxsize=None)
def builtin_capacity(task: str) -> int:
    """How many distinct ``(prompt, answer)`` pairs built-in ``task`` has on this Python.

    They come from the running interpreter (its keywords, builtins, standard-library module names
    and help topics), so the number depends on the Python version.
    """
    if task == "category":
        return len(_categorised_words())
    if task == "length_sum":
        return len(_length_sum_words()) ** 2
    if task == "next_word":
        prompts = set()
        for run in _topic_words():
            for start in range(len(run) - 5):
                text = run[start : start + 6]
                for i in range(5):
                    if text.count(text[i]) == 1:
                        prompt, answer = _next_word_prompt(text, i)
                        if len(prompt) + len(answer) <= _MAX_BUILTIN_CHARS:
                            prompts.add(prompt)
        return len(prompts)
    raise ValueError(message("task", f"one of {list(BUILTIN_INSTRUCTION_TASKS)}", task))


def check_builtin_size(task: str, wanted: int, argument: str = "limit") -> None:
    """Raise a ``ValueError`` naming ``argument`` when built-in ``task`` has fewer than ``wanted`` examples."""
    if wanted <= _SURELY_AVAILABLE.get(task, 0):
        return
    available = builtin_capacity(task)
    if wanted > available:
        raise ValueError(message(
            argument, f"at most the {available} distinct examples the built-in task {task!r} has on this Python",
            wanted, f"ask for at most {available} examples of {task!r} (training and validation together), "
                    "or use a task file with more"))


def builtin_examples(task: str, seed: int = 0, limit: int = 2000) -> list[tuple[str, str]]:
    """Distinct ``(prompt, answer)`` pairs of a built-in task, in a seeded order (at most ``limit``).

    Raises:
        ValueError: an unknown task, or a ``limit`` above the number of distinct examples
            ``"next_word"`` or ``"length_sum"`` has (:func:`builtin_capacity`); ``"category"``
            returns all it has when ``limit`` is larger.
    """
    if task in ("next_word", "length_sum"):
        check_builtin_size(task, limit)
    rng = np.random.default_rng([seed, BUILTIN_INSTRUCTION_TASKS.index(task), 4127])
    pairs: dict[str, str] = {}
    if task == "category":
        words = _categorised_words()
        for word in words:
            pairs[f"Kind of `{word}`:"] = f" {words[word]}"
    elif task == "next_word":
        runs = [r for r in _topic_words() if len(r) >= 6]
        while len(pairs) < limit:
            run = runs[int(rng.integers(len(runs)))]
            start = int(rng.integers(len(run) - 5))
            text = run[start : start + 6]
            candidates = [i for i in range(5) if text.count(text[i]) == 1]
            if not candidates:
                continue
            i = candidates[int(rng.integers(len(candidates)))]
            prompt, answer = _next_word_prompt(text, i)
            if len(prompt) + len(answer) <= _MAX_BUILTIN_CHARS:  # fits the default max_length in bytes
                pairs.setdefault(prompt, answer)
    elif task == "length_sum":
        words = _length_sum_words()
        while len(pairs) < limit:
            a, b = (words[int(k)] for k in rng.integers(len(words), size=2))
            pairs.setdefault(f"len(\"{a}\") + len(\"{b}\") =", f" {len(a) + len(b)}")
    else:
        raise ValueError(message("tasks", f"built-in task names {list(BUILTIN_INSTRUCTION_TASKS)} or files", task,
                                 "check the spelling, or pass the path of a .json/.jsonl/.csv file"))
    items = sorted(pairs.items())
    order = rng.permutation(len(items))
    return [items[int(i)] for i in order[:limit]]


def read_records(path: str, argument: str = "tasks") -> list[Any]:
    """The records of a JSON (a list of objects), JSON Lines or CSV (with a header) file.

    Raises:
        ValueError: an unknown suffix (naming ``argument``), or a ``.json`` file that is not a list.
    """
    path = os.path.expanduser(path)
    suffix = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as handle:
        if suffix == ".json":
            try:
                records = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg}). Fix: the file "
                    "must hold one JSON list of objects (use .jsonl for one object per line)."
                ) from error
            if not isinstance(records, list):
                raise ValueError(f"{path}: a .json file must hold a list of objects, got {type(records).__name__}.")
        elif suffix == ".jsonl":
            records = []
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(
                            f"{path}, line {number}: not a JSON record ({error.msg}, column {error.colno}): "
                            f"{line.strip()[:80]!r}. Fix: write one JSON object per line, e.g. "
                            '{"prompt": "...", "answer": " ..."}.'
                        ) from error
        elif suffix == ".csv":
            records = list(csv.DictReader(handle))
        else:
            raise ValueError(message(argument, "a .json, .jsonl or .csv file", path, "convert the file to one of them"))
    return records


def load_examples(path: str, prompt_field: str = "prompt", answer_field: str = "answer") -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs of a JSON (list of objects), JSON Lines or CSV (with a header) file.

    The answer is used as written: start it with a space (``" yes"``) to separate it from the
    prompt with the byte tokenizer.

    Raises:
        ValueError: unknown suffix, a record without one of the fields, or no records.
    """
    path = os.path.expanduser(path)
    records = read_records(path)
    pairs = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or prompt_field not in record or answer_field not in record:
            raise ValueError(
                f"{path}: record {i} lacks the fields {prompt_field!r} and {answer_field!r} (got {record!r}). "
                "Fix: add them, or pass `prompt_field=` / `answer_field=` naming the file's columns."
            )
        pairs.append((str(record[prompt_field]), str(record[answer_field])))
    if not pairs:
        raise ValueError(f"{path} holds no examples.")
    return pairs


# ---------------------------------------------------------------------------------- tensors
def pad_token_batch(rows: Sequence[dict[str, Tensor]], pad_id: int = 0) -> dict[str, Tensor]:
    """Collate variable-length examples: right-pad ``input_ids`` with ``pad_id``,
    ``attention_mask`` with 0 and ``labels`` with ``-100``."""
    width = max(int(r["input_ids"].numel()) for r in rows)
    pads = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key, pad in pads.items():
        out[key] = torch.stack(
            [torch.nn.functional.pad(r[key], (0, width - int(r[key].numel())), value=pad) for r in rows]
        )
    return out


class InstructionDataset(Dataset):
    """Tokenised ``(prompt, answer)`` pairs: ``input_ids`` = prompt + answer + end, ``labels``
    -100 over the prompt, ``attention_mask`` ones (variable length: collate with
    :func:`pad_token_batch`)."""

    def __init__(self, pairs: Sequence[tuple[str, str]], tokenizer: Union[ByteTokenizer, HFTokenizer], end_id: int) -> None:
        self.rows = []
        for prompt, answer in pairs:
            p, a = tokenizer.encode(prompt), tokenizer.encode(answer) + [end_id]
            ids = torch.tensor(p + a, dtype=torch.long)
            labels = torch.tensor([IGNORE_INDEX] * len(p) + a, dtype=torch.long)
            self.rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.rows[i].items()}


# ---------------------------------------------------------------------------------- datamodule
class InstructionStreamDataModule(ContinualDataModule):
    """A sequence of instruction tasks (one prompt/answer format per task) for causal LMs.

    Each task's examples are drawn once, in a seeded order: the first ``val_examples_per_task``
    are its validation set, the next ``examples_per_task`` its training set (disjoint). Batches
    are dicts ``{"input_ids", "attention_mask", "labels"}`` right-padded to the longest example
    of the batch (pad id: the tokenizer's end id, mask 0, labels -100); ``labels`` mark the
    answer and its end token only. Pair it with ``CausalLMModule``, which then logs per task
    ``val/loss/task_{t}`` (the answer-token loss) and ``val/exact_match/task_{t}``.

    Args:
        tasks: built-in task names (:data:`BUILTIN_INSTRUCTION_TASKS`) or paths of JSON / JSON
            Lines / CSV files of prompt/answer records, in task order. Default: the three
            built-in tasks (classification, extraction, arithmetic formats).
        examples_per_task: training examples per task (fewer if a file holds fewer; a built-in
            task must have ``examples_per_task + val_examples_per_task`` distinct examples, see
            :func:`builtin_capacity`).
        val_examples_per_task: validation examples per task; a file of fewer than twice this
            many gives a fifth of its records (at least 1) to validation.
        max_length: the longest example in tokens (the model's context must hold it; read as
            ``block_size``); a longer example is an error.
        tokenizer: ``None`` (bytes, vocabulary 257) or the path of a local Hugging Face
            tokenizer.
        prompt_field: the prompt's field name in task files.
        answer_field: the answer's field name in task files.
        epochs_per_task: training epochs per task.
        batch_size: training batch size.
        num_workers: ``DataLoader`` workers.
        joint: train on every task at once (the upper-bound baseline).
        task: serve only this task's training data.
        seed: seed of the example draws and of shuffling.
        eval_batch_size: evaluation batch size (default ``batch_size``).
        drop_last: drop the last incomplete training batch.
        num_tasks: use only the first ``num_tasks`` entries of ``tasks`` (``None``: all).
            The last eight as in :class:`~lightning_forget.datamodules.ContinualDataModule`.

    Raises:
        TypeError, ValueError: bad arguments, an unknown task name, a missing file, a task listed
            twice, more examples than a built-in task has (``examples_per_task +
            val_examples_per_task``, with the limit), a record without the fields, a malformed
            JSON / JSON Lines file (with its line), or an example longer than ``max_length``.
    """

    #: ``CausalLMModule`` logs exact match for datamodules whose labels mark answers only.
    answer_only_labels = True

    def __init__(
        self,
        tasks: Sequence[str] = BUILTIN_INSTRUCTION_TASKS,
        examples_per_task: int = 256,
        val_examples_per_task: int = 64,
        max_length: int = 96,
        tokenizer: Optional[str] = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        epochs_per_task: int = 1,
        batch_size: int = 16,
        num_workers: int = 0,
        joint: bool = False,
        task: Optional[int] = None,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
        drop_last: bool = False,
        num_tasks: Optional[int] = None,
    ) -> None:
        if isinstance(tasks, str):
            raise TypeError(message("tasks", "a list of task names or file paths", tasks, f"tasks=[{tasks!r}]"))
        tasks = list(tasks)
        if not tasks:
            raise ValueError(message("tasks", "a non-empty list", tasks, f"e.g. {list(BUILTIN_INSTRUCTION_TASKS)}"))
        for i, spec in enumerate(tasks):
            check_str(f"tasks[{i}]", spec)
            if spec not in BUILTIN_INSTRUCTION_TASKS:
                if not spec.lower().endswith(_FILE_SUFFIXES) or not os.path.isfile(os.path.expanduser(spec)):
                    raise ValueError(message(
                        "tasks", f"built-in task names {list(BUILTIN_INSTRUCTION_TASKS)} or existing .json/.jsonl/.csv files",
                        spec, "check the name or the path"))
        seen: dict[str, int] = {}
        for i, spec in enumerate(tasks):
            same = spec if spec in BUILTIN_INSTRUCTION_TASKS else os.path.realpath(os.path.expanduser(spec))
            if same in seen:
                raise ValueError(message(
                    "tasks", "a list of distinct tasks", tasks,
                    f"tasks[{seen[same]}] and tasks[{i}] are both {spec!r} and would serve identical examples; list "
                    "each task once (to train a task again, run another fit on it)"))
            seen[same] = i
        check_int("num_tasks", num_tasks, min=1, allow_none=True, fix="omit it to use every task of `tasks`")
        if num_tasks is not None:
            if num_tasks > len(tasks):
                raise ValueError(message("num_tasks", f"at most the {len(tasks)} tasks of `tasks`", num_tasks,
                                         "add tasks or lower num_tasks"))
            tasks = tasks[:num_tasks]
        check_int("examples_per_task", examples_per_task, min=1)
        check_int("val_examples_per_task", val_examples_per_task, min=1)
        for spec in tasks:
            if spec in BUILTIN_INSTRUCTION_TASKS:
                check_builtin_size(spec, examples_per_task + val_examples_per_task,
                                   "examples_per_task + val_examples_per_task")
        check_int("max_length", max_length, min=2)
        check_str("prompt_field", prompt_field)
        check_str("answer_field", answer_field)
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise TypeError(message("tokenizer", "None (bytes) or the path of a local tokenizer", tokenizer, "tokenizer=None"))
        super().__init__(
            num_tasks=len(tasks), epochs_per_task=epochs_per_task, batch_size=batch_size, num_workers=num_workers,
            joint=joint, task=task, seed=seed, eval_batch_size=eval_batch_size, drop_last=drop_last,
        )
        self.tasks = tasks
        self.examples_per_task = examples_per_task
        self.val_examples_per_task = val_examples_per_task
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self._sets: Optional[list[tuple[InstructionDataset, InstructionDataset]]] = None

    # ------------------------------------------------------------------ properties for linking
    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (257 for bytes)."""
        return load_tokenizer(self.tokenizer).vocab_size

    @property
    def block_size(self) -> int:
        """The longest example the model must hold (``max_length``)."""
        return self.max_length

    @property
    def corpus_names(self) -> list[str]:
        """Short task names, in task order (for logs)."""
        return [t if t in BUILTIN_INSTRUCTION_TASKS else os.path.splitext(os.path.basename(t))[0] for t in self.tasks]

    @property
    def end_id(self) -> int:
        """The id ending every answer (and padding): the tokenizer's end id, else 0."""
        eos = load_tokenizer(self.tokenizer).eos_id
        return 0 if eos is None else int(eos)

    # ------------------------------------------------------------------ building
    def task_pairs(self, task: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """``(train, val)`` prompt/answer pairs of ``task``."""
        spec = self.tasks[task]
        want = self.examples_per_task + self.val_examples_per_task
        if spec in BUILTIN_INSTRUCTION_TASKS:
            pairs = builtin_examples(spec, self.seed, limit=max(want, 1))
        else:
            pairs = load_examples(spec, self.prompt_field, self.answer_field)
            order = np.random.default_rng([self.seed, task, 9151]).permutation(len(pairs))
            pairs = [pairs[int(i)] for i in order]
        n_val = self.val_examples_per_task if len(pairs) >= 2 * self.val_examples_per_task else max(1, len(pairs) // 5)
        if len(pairs) < 2:
            raise ValueError(f"Task {spec!r} has {len(pairs)} example(s): a task needs at least 2 (train and validation).")
        return pairs[n_val : n_val + self.examples_per_task], pairs[:n_val]

    def _build(self) -> list[tuple[InstructionDataset, InstructionDataset]]:
        if self._sets is None:
            tokenizer, end = load_tokenizer(self.tokenizer), self.end_id
            sets = []
            for t in range(self.num_tasks):
                train, val = self.task_pairs(t)
                built = (InstructionDataset(train, tokenizer, end), InstructionDataset(val, tokenizer, end))
                longest = max(int(r["input_ids"].numel()) for d in built for r in d.rows)
                if longest > self.max_length:
                    raise ValueError(message(
                        "max_length", f">= the longest example of task {self.tasks[t]!r} ({longest} tokens)",
                        self.max_length, f"pass max_length={longest} (and a model context at least as long)"))
                sets.append(built)
            self._sets = sets
        return self._sets

    @override
    def setup(self, stage: str) -> None:
        self._build()

    def collate_fn(self, rows: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        return pad_token_batch(rows, self.end_id)

    @override
    def train_dataset(self, task: int) -> InstructionDataset:
        return self._build()[task][0]

    @override
    def val_dataset(self, task: int) -> InstructionDataset:
        return self._build()[task][1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tasks={self.tasks}, examples_per_task={self.examples_per_task})"
