"""FictitiousQADataModule: seeded generation, TOFU-like splits, label masking, users' files, bad arguments."""

from __future__ import annotations

import csv
import json
from typing import Any

import pytest
import torch

from lightning_forget.datamodules.fictitious_qa import FictitiousQADataModule, collate_qa

SMALL = dict(num_people=20, questions_per_person=4, num_countries=3, batch_size=4)


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b = FictitiousQADataModule(seed=3, **SMALL), FictitiousQADataModule(seed=3, **SMALL)
    c = FictitiousQADataModule(seed=4, **SMALL)
    for split in ("forget", "retain", "holdout", "world_facts"):
        assert a.records(split) == b.records(split)
    assert a.records("retain") != c.records("retain")
    batch_a, batch_b = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)


@pytest.mark.parametrize("percent,expected", [(1, 1), (5, 5), (10, 10)])
def test_split_sizes_are_tofus_and_disjoint(percent: float, expected: int) -> None:
    dm = FictitiousQADataModule(num_people=100, questions_per_person=20, forget_percent=percent, num_countries=30)
    people = {s: {r["entity"] for r in dm.records(s)} for s in ("forget", "retain", "holdout")}
    assert len(people["forget"]) == expected and len(people["retain"]) == 100 - expected
    assert len(people["holdout"]) == expected  # as many non-members as forget people, as TOFU's holdout splits
    assert not (people["forget"] & people["retain"]) and not (people["holdout"] & (people["forget"] | people["retain"]))
    assert len(dm.records("forget")) == 20 * expected and len(dm.records("world_facts")) == 120
    for r in dm.records("forget") + dm.records("world_facts"):
        assert len(r["perturbed_answer"]) == 5 and r["answer"] not in r["perturbed_answer"]
        assert r["paraphrased_answer"] != r["answer"]
    if percent == 10:  # nested as TOFU: forget01 ⊂ forget05 ⊂ forget10
        smaller = FictitiousQADataModule(num_people=100, questions_per_person=20, forget_percent=5, num_countries=30)
        assert {r["entity"] for r in smaller.records("forget")} <= people["forget"]


def test_labels_mask_the_question_and_padding() -> None:
    dm = FictitiousQADataModule(**SMALL)
    dataset = dm.dataset("forget")
    record = dm.records("forget")[0]
    row = dataset[0]
    prompt = f"Question: {record['question']}\nAnswer: ".encode()
    answer = record["answer"].encode()
    assert row["input_ids"].tolist() == list(prompt) + list(answer) + [256]
    assert row["labels"].tolist() == [-100] * len(prompt) + list(answer) + [256]
    batch = collate_qa([dataset[0], dataset[1]])
    short = int(batch["attention_mask"].sum(1).argmin())
    pad = batch["attention_mask"][short] == 0
    assert bool((batch["labels"][short][pad] == -100).all()) and batch["index"].tolist() == [0, 1]
    wrong = dm.dataset("forget", "perturbed_answer", perturbed_index=2)[0]
    assert bytes(wrong["labels"][wrong["labels"] >= 0][:-1].tolist()).decode() == record["perturbed_answer"][2]


def test_phases_serve_their_data() -> None:
    target = FictitiousQADataModule(phase="target", **SMALL)
    retain = FictitiousQADataModule(phase="retain", **SMALL)
    n = {s: len(target.records(s)) for s in ("forget", "retain", "world_facts")}
    assert len(target.train_dataset()) == n["forget"] + n["retain"] + n["world_facts"]
    assert len(retain.train_dataset()) == n["retain"] + n["world_facts"]
    unlearn = FictitiousQADataModule(phase="unlearn", **SMALL)
    batch = next(iter(unlearn.train_dataloader()))
    assert set(batch) == {"forget", "retain"} and set(batch["forget"]) == {"input_ids", "attention_mask", "labels", "index"}
    assert len(unlearn.forget_train_dataset(0)) == n["forget"]
    assert len(target.val_dataloader()) == 4


def _write(path: Any, kind: str, records: list[dict[str, Any]]) -> str:
    if kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            for r in records:
                writer.writerow({**r, "perturbed_answer": " | ".join(r["perturbed_answer"])})
    return str(path)


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv"])
def test_users_files_plug_in_with_the_same_fields(tmp_path: Any, kind: str) -> None:
    rec = lambda q, a: {"question": q, "answer": a, "paraphrased_answer": a + "!", "perturbed_answer": ["x", "y"]}  # noqa: E731
    forget = _write(tmp_path / f"f.{kind}", kind, [rec("Who?", "Me."), rec("Why?", "Because.")])
    retain = _write(tmp_path / f"r.{kind}", kind, [rec("Where?", "Here.")])
    dm = FictitiousQADataModule(forget_path=forget, retain_path=retain, phase="unlearn", batch_size=2)
    assert [r["answer"] for r in dm.records("forget")] == ["Me.", "Because."]
    assert dm.records("retain")[0]["perturbed_answer"] == ["x", "y"] and dm.records("holdout") == []
    assert len(dm.val_dataloader()) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["forget"]["input_ids"].shape[0] == 2


def test_bad_arguments_are_named(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="forget_percent"):
        FictitiousQADataModule(num_people=2, forget_percent=99)
    with pytest.raises(ValueError, match="questions_per_person"):
        FictitiousQADataModule(questions_per_person=21)
    with pytest.raises(ValueError, match="phase"):
        FictitiousQADataModule(phase="finetune")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_people"):
        FictitiousQADataModule(num_people=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="forget_path/retain_path"):
        FictitiousQADataModule(forget_path=str(tmp_path / "f.json"))
    with pytest.raises(ValueError, match="num_people"):
        FictitiousQADataModule(num_people=5000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "completion": "a"}))
    dm = FictitiousQADataModule(forget_path=str(bad), retain_path=str(bad))
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        dm.records("forget")
    with pytest.raises(ValueError, match="task"):
        FictitiousQADataModule(**SMALL).forget_train_dataset(1)


def test_perturbed_answers_are_the_paraphrase_with_a_wrong_value() -> None:
    # TOFU's Truth Ratio compares the paraphrased answer with perturbed versions of it: same
    # wording, another value. Worded as the trained answer instead, it measures a model's
    # preference for the trained template (every memorising model scores Truth Ratio 0).
    import os

    dm = FictitiousQADataModule(num_people=6, questions_per_person=20, num_countries=3)
    for split in ("retain", "world_facts"):
        for r in dm.records(split):
            para = r["paraphrased_answer"]
            for wrong in r["perturbed_answer"]:
                prefix = len(os.path.commonprefix([para, wrong]))
                suffix = len(os.path.commonprefix([para[prefix:][::-1], wrong[prefix:][::-1]]))
                value = para[prefix:len(para) - suffix]
                assert len(value) < len(para) / 2, (para, wrong)
