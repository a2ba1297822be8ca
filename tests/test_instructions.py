"""InstructionStreamDataModule: built-in tasks, user files, padding, and CausalLMModule's exact match."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lightning_forget.datamodules import InstructionStreamDataModule
from lightning_forget.datamodules.instructions import (
    _SURELY_AVAILABLE,
    BUILTIN_INSTRUCTION_TASKS,
    builtin_capacity,
    builtin_examples,
    pad_token_batch,
)
from lightning_forget.modules import CausalLMModule


def test_builtin_tasks_have_distinct_formats_and_correct_answers() -> None:
    category = dict(builtin_examples("category", limit=400))
    assert category["Kind of `lambda`:"] == " keyword" and category["Kind of `len`:"] == " function" and category["Kind of `zip`:"] == " type"
    assert category["Kind of `KeyError`:"] == " exception" and category["Kind of `json`:"] == " module"
    for prompt, answer in builtin_examples("next_word", limit=50):
        words = prompt.split("\n")[0][len("Text: "):].split()
        asked = prompt.split('"')[1]
        assert words.count(asked) == 1 and answer == " " + words[words.index(asked) + 1]
    for prompt, answer in builtin_examples("length_sum", limit=50):
        a, b = prompt.split('"')[1], prompt.split('"')[3]
        assert int(answer) == len(a) + len(b)
    assert builtin_examples("next_word", seed=3, limit=20) == builtin_examples("next_word", seed=3, limit=20)
    assert builtin_examples("next_word", seed=3, limit=20) != builtin_examples("next_word", seed=4, limit=20)


def test_splits_are_disjoint_and_labels_mark_the_answer_only() -> None:
    dm = InstructionStreamDataModule(examples_per_task=40, val_examples_per_task=10)
    dm.setup("fit")
    assert dm.num_tasks == 3 and dm.corpus_names == list(BUILTIN_INSTRUCTION_TASKS)
    for t in range(3):
        train, val = dm.train_dataset(t), dm.val_dataset(t)
        assert len(train) == 40 and len(val) == 10
        assert not {p for p, _ in train.pairs} & {p for p, _ in val.pairs}
        row, (prompt, answer) = train[0], train.pairs[0]
        predicted = row["labels"] != -100
        assert int(predicted.sum()) == len(answer.encode()) + 1  # the answer and the end id
        assert bytes(row["labels"][predicted][:-1].tolist()).decode() == answer and row["labels"][-1] == dm.end_id
        assert bytes(row["input_ids"][~predicted].tolist()).decode() == prompt


def test_collate_pads_ids_masks_and_minus_100_labels() -> None:
    rows = [
        {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long), "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long), "labels": torch.tensor([8])},
    ]
    batch = pad_token_batch(rows, pad_id=256)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 256, 256]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    dm = InstructionStreamDataModule(examples_per_task=8, val_examples_per_task=4, batch_size=4)
    dm.setup("fit")
    loaded = next(iter(dm.train_dataloader()))
    assert set(loaded) == {"input_ids", "attention_mask", "labels"}
    assert (loaded["labels"][loaded["attention_mask"] == 0] == -100).all()


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_user_files(tmp_path: Path, suffix: str) -> None:
    records = [{"q": f"Capital of land {i}?", "a": f" city{i}"} for i in range(20)]
    path = tmp_path / f"capitals{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["q", "a"])
            writer.writeheader()
            writer.writerows(records)
    dm = InstructionStreamDataModule(tasks=[str(path), "length_sum"], prompt_field="q", answer_field="a",
                                     examples_per_task=30, val_examples_per_task=12)
    dm.setup("fit")
    assert dm.corpus_names == ["capitals", "length_sum"]
    train, val = dm.task_pairs(0)
    assert len(val) == 4 and len(train) == 16  # 20 records < 2 x 12: a fifth to validation
    assert sorted(train + val) == sorted((r["q"], r["a"]) for r in records)
    with pytest.raises(ValueError, match="prompt_field"):
        InstructionStreamDataModule(tasks=[str(path)]).setup("fit")


def test_bad_arguments_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tasks"):
        InstructionStreamDataModule(tasks=["nope"])
    with pytest.raises(TypeError, match="tasks"):
        InstructionStreamDataModule(tasks="category")
    with pytest.raises(ValueError, match="num_tasks"):
        InstructionStreamDataModule(num_tasks=4)
    with pytest.raises(ValueError, match="max_length"):
        InstructionStreamDataModule(tasks=["next_word"], max_length=20, examples_per_task=4, val_examples_per_task=2).setup("fit")
    assert InstructionStreamDataModule(num_tasks=2).num_tasks == 2


class _Fixed(torch.nn.Module):
    """Logits that predict token ``t + 1`` after token ``t`` (so the "count up" answer is right)."""

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        logits = torch.nn.functional.one_hot((input_ids + 1) % 10, 10).float() * 5

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_exact_match_is_every_answer_token_right() -> None:
    module = CausalLMModule(vocab_size=10, block_size=8, n_embd=8, n_head=2, exact_match=True)
    module.model = _Fixed()
    module._exact_match_on = True
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0], [3, 4, 5, 6]]),
        "labels": torch.tensor([[-100, -100, 3, 4], [-100, -100, 5, -100], [-100, 4, 9, 6]]),
    }
    module.on_validation_epoch_start()
    module.validation_step(batch, 0, 0)
    # row 0: 2 -> 3, 3 -> 4 right; row 1: 2 -> 3 but the label is 5; row 2: 4 -> 5 but the label is 9.
    assert float(module.val_match_metrics[0].compute()) == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", [0, 2, 5])
def test_builtin_examples_fit_the_default_max_length(seed: int) -> None:
    dm = InstructionStreamDataModule(seed=seed, examples_per_task=192, val_examples_per_task=48)
    dm.setup("fit")  # a longer example would raise here
    assert max(len(r["input_ids"]) for t in range(3) for r in dm.train_dataset(t).rows) <= dm.max_length


@pytest.mark.parametrize(
    "task, examples",
    [("category", 2000), ("length_sum", 100_000), ("next_word", 1_000_000)],
)
def test_asking_more_examples_than_a_builtin_task_has_is_refused_with_the_limit(task: str, examples: int) -> None:
    # next_word and length_sum used to loop forever; category silently served fewer.
    limit = builtin_capacity(task)
    assert limit < examples + 64
    with pytest.raises(ValueError, match=rf"examples_per_task \+ val_examples_per_task.*at most the {limit} distinct"):
        InstructionStreamDataModule(tasks=[task], examples_per_task=examples)
    with pytest.raises(ValueError, match=f"at most the {limit}"):
        InstructionStreamDataModule(tasks=[task], examples_per_task=limit - 63, val_examples_per_task=64)
    assert InstructionStreamDataModule(tasks=[task], examples_per_task=limit - 64, val_examples_per_task=64)


def test_the_sizes_assumed_without_counting_are_below_what_the_tasks_have() -> None:
    for task, assumed in _SURELY_AVAILABLE.items():
        assert builtin_capacity(task) >= assumed, task


def test_a_task_listed_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tasks\[0\] and tasks\[2\] are both 'category'"):
        InstructionStreamDataModule(tasks=["category", "next_word", "category"])
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "Q:", "answer": " A"}) + "\n")
    with pytest.raises(ValueError, match=r"tasks\[0\] and tasks\[1\]"):
        InstructionStreamDataModule(tasks=[str(path), str(tmp_path / "." / "qa.jsonl")])


def test_a_malformed_json_record_names_the_file_and_line(tmp_path: Path) -> None:
    lines = tmp_path / "qa.jsonl"
    lines.write_text('{"prompt": "Q1:", "answer": " A"}\n\n{"prompt": "Q2:", "answer": " B",}\n')
    with pytest.raises(ValueError, match=r"qa\.jsonl, line 3: not a JSON record"):
        InstructionStreamDataModule(tasks=[str(lines)]).setup("fit")
    whole = tmp_path / "qa.json"
    whole.write_text('[\n  {"prompt": "Q1:", "answer": " A"}\n  {"prompt": "Q2:", "answer": " B"}\n]\n')
    with pytest.raises(ValueError, match=r"qa\.json, line 3, column 3"):
        InstructionStreamDataModule(tasks=[str(whole)]).setup("fit")
