"""A tiny stream of LM forgetting tasks for the LM unlearning rows of the callback contract."""

from __future__ import annotations

from typing import Any, Optional

from torch.utils.data import Dataset

from lightning_forget.datamodules import ContinualDataModule
from lightning_forget.datamodules.fictitious_qa import QADataset, collate_qa, fictitious_people, people_records
from lightning_forget.datamodules.forget import PairedDataset
from lightning_forget.datamodules.tokenizers import ByteTokenizer

#: A one-block GPT-2 of width 16 (CausalLMModule's arguments; vocab and block size linked from the data).
TINY_QA_LM = {"n_layer": 1, "n_embd": 16, "n_head": 2}


class QAForgetStream(ContinualDataModule):
    """Task ``t`` forgets fictitious person ``t`` (two questions); six other people are retained.

    Training batches are two-stream ``{"forget", "retain"}`` dicts of causal-LM sub-batches (the
    retained stream drives the epoch: 12 questions, 6 batches of 2); validation serves each task's
    forget questions. ``forget_train_dataset(task)`` gives the forget set (forget-pass budget, mask).
    ``records(split)``/``dataset(split)`` serve the current task's ``forget`` person, the ``retain``
    people and one ``holdout`` person never trained on (LMUnlearningEvaluation reads them);
    ``retain_only=True`` trains on plain batches of the retained people instead.
    """

    collate_fn = staticmethod(collate_qa)

    def __init__(self, num_tasks: int = 3, epochs_per_task: int = 1, batch_size: int = 2, seed: int = 0,
                 joint: bool = False, task: Optional[int] = None, retained_people: int = 6,
                 retain_only: bool = False) -> None:
        super().__init__(num_tasks=num_tasks, epochs_per_task=epochs_per_task, batch_size=batch_size, seed=seed,
                         joint=joint, task=task)
        self.tokenizer = ByteTokenizer()
        self.retain_only = retain_only
        people = fictitious_people(num_tasks + retained_people + 1, seed=0)
        self._forget = [people_records([p], questions_per_person=2) for p in people[:num_tasks]]
        self._retain = people_records(people[num_tasks:-1], questions_per_person=2)
        self._holdout = people_records(people[-1:], questions_per_person=2)
        self.vocab_size = self.tokenizer.vocab_size
        self.block_size = 160
        self.corpus_names = [f"forget{t}" for t in range(num_tasks)]

    def _qa(self, records: list[dict[str, Any]]) -> QADataset:
        return QADataset(records, self.tokenizer, self.tokenizer.eos_id)

    def records(self, split: str) -> list[dict[str, Any]]:
        return {"forget": self._forget[self.current_task], "retain": self._retain, "holdout": self._holdout,
                "world_facts": []}[split]

    def dataset(self, split: str) -> QADataset:
        return self._qa(self.records(split))

    def forget_train_dataset(self, task: int) -> Dataset:
        return self._qa(self._forget[task])

    def train_dataset(self, task: int) -> Dataset:
        if self.retain_only:  # plain batches of the retained people (fine-tuning; for the evaluation row)
            return self._qa(self._retain)
        return PairedDataset(self.forget_train_dataset(task), self._qa(self._retain), self.seed, 0)

    def val_dataset(self, task: int) -> Dataset:
        return self._qa(self._forget[task])
