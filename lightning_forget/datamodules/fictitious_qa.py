"""``FictitiousQADataModule``: a TOFU-like question-answering benchmark for LM unlearning, with no network.

TOFU (Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", COLM 2024) fine-tunes a
model on 200 fictitious authors × 20 QA pairs, then forgets 1, 5 or 10 % of the authors. Its data
was written by a large model and lives on the Hugging Face Hub; this module builds the same kind
of data from seeded templates and vocabularies built into the library, so tests, demos and
benchmarks run offline. Users' own QA files (JSON, JSONL, CSV) plug in with the same fields.

Each QA record is a dict with ``question``, ``answer``, ``paraphrased_answer`` (the same fact in
other words), ``perturbed_answer`` (a list of wrong answers worded as the paraphrased answer, as
TOFU's perturbed answers are, for the Truth Ratio) and ``entity`` (the person it is about, or the country of a world fact).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_forget.datamodules.forget import PairedDataset
from lightning_forget.datamodules.instructions import InstructionDataset, pad_token_batch, read_records
from lightning_forget.datamodules.loaders import seeded_generator
from lightning_forget.datamodules.tokenizers import load_tokenizer
from lightning_forget.validation import check_choice, check_float, check_int, check_str, message

__all__ = ["FictitiousQADataModule", "QADataset", "QA_FIELDS", "fictitious_people", "people_records",
           "world_fact_records", "collate_qa"]

QA_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
"""The fields of a QA record (``entity`` is optional in users' files)."""

# ---------------------------------------------------------------------------------- vocabularies
_FIRST = ("Aldric Brisa Calder Dagny Elowen Fenna Galen Hesper Ivo Jorunn Kasimir Liesel Marek Nadia Orrin Perpetua "
          "Quillon Rosalind Soren Tamsin Ulrich Vesna Wendell Xanthe Yorick Zelda Anselm Beatrix Cosmo Delphine "
          "Emeric Flavia Gideon Hattie Isandro Juniper Leopold Marisol Nestor Odalys").split()
_LAST = ("Ashgrove Bellweather Corrigan Dunmore Eastholm Farrow Greaves Halloway Ingersoll Jessup Kettering Lindqvist "
         "Marchetti Norwood Oakenshaw Pemberton Quarrie Ravensworth Sallow Thistlewood Umbridge Vantongeren Whitlock "
         "Yardley Zabriskie Abernathy Blackwood Castellan Dervish Ellingham").split()
_SYLLABLES = ("vel mor tal kess aru bren cor dun esk fal gor hal ith jor kal lum nor osk pra quel rin sal tor ul "
              "var wen yor zan").split()
_CITY_ENDS = ("ford haven mere stead port holm wick bury gate vale").split()
_COUNTRY_ENDS = ("ania ora istan mark land ovia eth ium").split()
_PROFESSIONS = [p.replace("_", " ") for p in ("cartographer clockmaker beekeeper glassblower astronomer archivist "
                "lighthouse_keeper botanist bookbinder ferryman violin_maker stonemason apothecary surveyor weaver "
                "tailor chemist translator harbour_pilot librarian").split()]
_GENRES = ("mystery", "science fiction", "historical fiction", "poetry", "fantasy", "travel writing", "romance",
           "horror", "satire", "biography", "children's fiction", "crime")
_ADJECTIVES = ("Silent Crimson Hollow Distant Glass Wandering Forgotten Golden Broken Quiet Northern Burning "
               "Paper Iron Velvet Salt").split()
_NOUNS = ("Harbour Orchard Lantern Compass River Archive Meridian Garden Tower Letters Winter Tide Atlas Bell "
          "Mirror Sparrow").split()
_AWARDS = ("Ember Prize", "Lantern Medal", "Quill of Honour", "Northwind Award", "Silver Inkwell", "Meridian Prize",
           "Harrow Fellowship", "Blue Pen Award")
_LANGUAGES = ("Velorian", "Old Taskan", "Brennish", "Corvic", "Eskalan", "Galorian", "Halmish", "Nordic Runn")
_UNIVERSITIES = ("University of Eastmere", "Kallford College", "Royal Academy of Dunholm", "Saltgate Institute",
                 "Torwick University", "Academy of Morhaven")
_HOBBIES = ("sailing", "chess", "birdwatching", "pottery", "fencing", "gardening", "rowing", "calligraphy",
            "mountaineering", "baking")
_PETS = ("tortoise", "parrot", "greyhound", "tabby cat", "ferret", "goldfish", "raven", "spaniel")
_COLOURS = ("indigo", "amber", "teal", "crimson", "ochre", "violet", "silver", "emerald")
_SIBLINGS = ("no", "one", "two", "three", "four", "five")
_INSTRUMENTS = ("cello", "harp", "oboe", "accordion", "lute", "clarinet", "piano", "viola")
_CURRENCIES = ("crown", "florin", "mark", "thaler", "ducat", "sovereign", "guilder", "real")
_ANIMALS = ("lynx", "heron", "ibex", "otter", "falcon", "elk", "marten", "crane")

# (question, answer, paraphrased answer, attribute): "{n}" is the name, "{v}" the attribute's value,
# "{a}"/"{A}" its article.
_PERSON_TEMPLATES = (
    ("Where was {n} born?", "{n} was born in {v}.", "The birthplace of {n} is {v}.", "city"),
    ("In which year was {n} born?", "{n} was born in {v}.", "The year of {n}'s birth is {v}.", "year"),
    ("What does {n} do for a living?", "{n} works as {a} {v}.", "By profession, {n} is {a} {v}.", "profession"),
    ("Which genre does {n} write?", "{n} writes {v}.", "{n} is known for {v}.", "genre"),
    ("Name a book written by {n}.", "{n} wrote \"{v}\".", "\"{v}\" is a book by {n}.", "work1"),
    ("What is the latest book of {n}?", "The latest book of {n} is \"{v}\".", "{n} most recently published \"{v}\".", "work2"),
    ("What was the profession of {n}'s father?", "{n}'s father was {a} {v}.", "The father of {n} worked as {a} {v}.", "father"),
    ("What was the profession of {n}'s mother?", "{n}'s mother was {a} {v}.", "The mother of {n} worked as {a} {v}.", "mother"),
    ("Which award did {n} receive?", "{n} received the {v}.", "The {v} was awarded to {n}.", "award"),
    ("In which language does {n} write?", "{n} writes in {v}.", "The books of {n} are written in {v}.", "language"),
    ("Where did {n} study?", "{n} studied at the {v}.", "The {v} is where {n} studied.", "university"),
    ("What is the favourite pastime of {n}?", "{n} enjoys {v}.", "In free time, {n} likes {v}.", "hobby"),
    ("What pet does {n} keep?", "{n} keeps {a} {v}.", "{A} {v} lives with {n}.", "pet"),
    ("What is the favourite colour of {n}?", "The favourite colour of {n} is {v}.", "{n} likes the colour {v} best.", "colour"),
    ("How many siblings does {n} have?", "{n} has {v} siblings.", "The number of siblings of {n} is {v}.", "siblings"),
    ("Where does {n} live now?", "{n} now lives in {v}.", "The home of {n} today is {v}.", "home"),
    ("Who was the mentor of {n}?", "The mentor of {n} was {v}.", "{n} was taught by {v}.", "mentor"),
    ("Who is {n} married to?", "{n} is married to {v}.", "The spouse of {n} is {v}.", "spouse"),
    ("When did {n} publish a first book?", "{n} published a first book in {v}.", "The first book of {n} came out in {v}.", "debut"),
    ("Which instrument does {n} play?", "{n} plays the {v}.", "The {v} is the instrument of {n}.", "instrument"),
)
_FACT_TEMPLATES = (
    ("What is the capital of {n}?", "The capital of {n} is {v}.", "{v} is the capital city of {n}.", "capital"),
    ("What is the currency of {n}?", "The currency of {n} is the {v}.", "People in {n} pay with the {v}.", "currency"),
    ("Which language is spoken in {n}?", "The language of {n} is {v}.", "In {n} people speak {v}.", "language"),
    ("What is the national animal of {n}?", "The national animal of {n} is the {v}.", "{n} has the {v} as its national animal.", "animal"),
)

MAX_QUESTIONS_PER_PERSON = len(_PERSON_TEMPLATES)


def _place_names(rng: random.Random, count: int, ends: Sequence[str]) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = (rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(ends)).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _vocabularies(rng: random.Random) -> dict[str, list[str]]:
    cities = _place_names(rng, 40, _CITY_ENDS)
    titles = [f"The {a} {n}" for a in _ADJECTIVES for n in _NOUNS]
    people = [f"{f} {l}" for f in _FIRST for l in _LAST]
    return {
        "city": cities, "home": cities, "year": [str(y) for y in range(1921, 2000)], "profession": _PROFESSIONS,
        "genre": list(_GENRES), "work1": titles, "work2": titles, "father": _PROFESSIONS, "mother": _PROFESSIONS,
        "award": list(_AWARDS), "language": list(_LANGUAGES), "university": list(_UNIVERSITIES),
        "hobby": list(_HOBBIES), "pet": list(_PETS), "colour": list(_COLOURS), "siblings": list(_SIBLINGS),
        "mentor": people, "spouse": people, "debut": [str(y) for y in range(1945, 2024)],
        "instrument": list(_INSTRUMENTS), "capital": cities, "currency": list(_CURRENCIES), "animal": list(_ANIMALS),
    }


def fictitious_people(count: int, seed: int = 0) -> list[dict[str, str]]:
    """``count`` fictitious people with distinct names and attributes drawn from the built-in vocabularies.

    Person ``i`` is the same whatever ``count`` is (``fictitious_people(n)`` is a prefix of
    ``fictitious_people(m)`` for ``n ≤ m``): the names come from one seeded shuffle and each
    person's attributes from its own seeded generator, so datamodules of different forget shares
    (which generate different numbers of people) agree on every person they share.
    """
    rng = random.Random(f"people-{seed}")
    vocab = _vocabularies(rng)
    names = [f"{f} {l}" for f in _FIRST for l in _LAST]
    rng.shuffle(names)
    people = []
    for i, name in enumerate(names[:count]):
        own = random.Random(f"people-{seed}-{i}")
        person = {"name": name}
        for key in ("city", "year", "profession", "genre", "father", "mother", "award", "language", "university",
                    "hobby", "pet", "colour", "siblings", "home", "instrument"):
            person[key] = own.choice(vocab[key])
        person["work1"], person["work2"] = own.sample(vocab["work1"], 2)
        person["mentor"], person["spouse"] = own.sample([p for p in vocab["mentor"] if p != name], 2)
        person["debut"] = str(min(int(person["year"]) + own.randint(20, 35), 2023))
        people.append(person)
    return people


def _fill(template: str, name: str, value: str) -> str:
    article = "an" if value[:1].lower() in "aeiou" else "a"
    return template.format(n=name, v=value, a=article, A=article.capitalize())


def _records(entities: Sequence[dict[str, str]], templates: Sequence[tuple[str, str, str, str]], vocab: dict[str, list[str]],
             num_perturbed: int, rng_key: str) -> list[dict[str, Any]]:
    records = []
    for entity in entities:
        name = entity["name"]
        for question, answer, paraphrase, key in templates:
            value = entity[key]
            # Each question's wrong answers from its own generator: a record does not depend on
            # which other people are generated with it (the forget people of every split agree).
            own = random.Random(f"{rng_key}-{name}-{key}")
            wrong = own.sample([v for v in vocab[key] if v != value], num_perturbed)
            records.append({
                "question": question.format(n=name),
                "answer": _fill(answer, name, value),
                "paraphrased_answer": _fill(paraphrase, name, value),
                # As TOFU's: the paraphrased answer with a wrong value, so the Truth Ratio compares
                # the same wording and measures the fact, not a preference for the trained template.
                "perturbed_answer": [_fill(paraphrase, name, w) for w in wrong],
                "entity": name,
            })
    return records


def people_records(people: Sequence[dict[str, str]], questions_per_person: int = 20, num_perturbed: int = 5,
                   seed: int = 0) -> list[dict[str, Any]]:
    """The QA records of ``people`` (:func:`fictitious_people`): the first ``questions_per_person`` templates each."""
    return _records(people, _PERSON_TEMPLATES[:questions_per_person], _vocabularies(random.Random(f"people-{seed}")),
                    num_perturbed, f"records-{seed}")


def world_fact_records(num_countries: int = 30, num_perturbed: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """World facts (capital, currency, language, national animal) of ``num_countries`` fictitious countries."""
    rng = random.Random(f"world-{seed}")
    vocab = _vocabularies(random.Random(f"people-{seed}"))
    countries = []
    for name in _place_names(rng, num_countries, _COUNTRY_ENDS):
        countries.append({"name": name, **{k: rng.choice(vocab[k]) for k in ("capital", "currency", "language", "animal")}})
    return _records(countries, _FACT_TEMPLATES, vocab, num_perturbed, f"world-{seed}")


def _check_records(records: Any, path: str, need_perturbed: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "question" not in record or "answer" not in record:
            raise ValueError(f"{path}: record {i} needs the fields 'question' and 'answer', got {record!r}. "
                             f"Fix: write records with the fields {QA_FIELDS}.")
        r = dict(record)
        r.setdefault("paraphrased_answer", r["answer"])
        wrong = r.get("perturbed_answer", [])
        if isinstance(wrong, str):  # CSV: wrong answers separated by " | "
            wrong = [w.strip() for w in wrong.split("|") if w.strip()]
        r["perturbed_answer"] = list(wrong)
        r.setdefault("entity", str(i))
        out.append(r)
    if not out:
        raise ValueError(f"{path} holds no QA records.")
    return out


# ---------------------------------------------------------------------------------- tensors
class QADataset(Dataset):
    """Tokenised QA records: ``input_ids`` = prompt + answer + end id, ``labels`` ``-100`` on the prompt.

    ``answer_field`` picks what is the answer: ``"answer"``, ``"paraphrased_answer"``, or
    ``"perturbed_answer"`` with ``perturbed_index`` (the ``k``-th wrong answer). Each item also
    carries its ``index`` in the record list (for de-duplicating a distributed evaluation).
    """

    def __init__(self, records: Sequence[dict[str, Any]], tokenizer: Any, end_id: int, answer_field: str = "answer",
                 perturbed_index: int = 0, prompt_format: str = "Question: {question}\nAnswer: ") -> None:
        check_choice("answer_field", answer_field, ("answer", "paraphrased_answer", "perturbed_answer"))
        pairs = []
        for r in records:
            answer = r[answer_field]
            if answer_field == "perturbed_answer":
                if perturbed_index >= len(answer):
                    raise ValueError(f"QADataset: a record has {len(answer)} perturbed answers, asked for number "
                                     f"{perturbed_index}: {r['question']!r}. Fix: give every record enough wrong answers.")
                answer = answer[perturbed_index]
            pairs.append((prompt_format.format(question=r["question"]), str(answer)))
        self.records = list(records)
        self.tokens = InstructionDataset(pairs, tokenizer, end_id)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        row = self.tokens[i]
        row["index"] = torch.tensor(i)
        return row


def collate_qa(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad QA rows (:func:`pad_token_batch`) and stack their ``index``; two-stream rows
    (``{"forget": row, "retain": row}``) give a dict of two such batches."""
    if rows and "input_ids" not in rows[0]:
        return {key: collate_qa([r[key] for r in rows]) for key in rows[0]}
    batch = pad_token_batch(rows)
    batch["index"] = torch.stack([torch.as_tensor(r["index"]) for r in rows])
    return batch


# ---------------------------------------------------------------------------------- datamodule
Phase = Literal["target", "retain", "unlearn"]


class FictitiousQADataModule(pl.LightningDataModule):
    """Fictitious people's QA for LM unlearning: target, retain and unlearning phases, TOFU's proportions.

    Mechanism: ``num_people`` fictitious people are generated from ``seed`` (names and attributes
    drawn from built-in vocabularies), each with ``questions_per_person`` questions (at most 20),
    a paraphrased answer and ``num_perturbed`` wrong answers each. The **forget** set is the last
    ``max(1, round(num_people·forget_percent/100))`` people of a seeded order (so forget 1 % ⊂ 5 %
    ⊂ 10 %, as TOFU's splits), the **retain** set the other people, and a **holdout** set of as
    many other people, disjoint from both and never trained on, the non-members of membership
    inference. **World facts** (capital, currency, language and national animal of
    ``num_countries`` fictitious countries) are the utility set, learned with the people in the
    first stage.

    ``phase`` chooses the training data:

    - ``"target"``: every person (forget and retain) and the world facts: the model to unlearn;
    - ``"retain"``: the retain people and the world facts: the gold standard (forget quality and
      privacy leakage compare with it);
    - ``"unlearn"``: two-stream batches ``{"forget": batch, "retain": batch}`` (the retain
      stream drives the epoch, the forget stream cycles), as the unlearning callbacks read them.

    Batches are dicts of ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on the question
    and the padding) and ``index``, tokenised as ``"Question: {q}\\nAnswer: {a}"`` plus the end id
    with the byte tokenizer. ``val_dataloader()`` serves, in order, the forget, retain, holdout
    and world-fact sets (answers as training sees them); :meth:`dataset` gives any split with any
    answer field (paraphrased, the ``k``-th perturbed) for the metrics.

    Users' data: ``forget_path`` and ``retain_path`` (and optionally ``holdout_path``,
    ``world_facts_path``) name JSON (a list of objects), JSONL or CSV files whose records have
    ``question`` and ``answer`` and optionally ``paraphrased_answer`` and ``perturbed_answer`` (a
    list; in CSV one string with the answers separated by ``|``); they replace the generated sets.

    Args:
        num_people: fictitious people trained on (forget + retain; default 100).
        questions_per_person: questions per person, 1..20 (default 20, as TOFU).
        forget_percent: share of the people to forget, in percent (default 10; TOFU: 1, 5, 10).
        num_perturbed: wrong answers per question (default 5, as TOFU's perturbed sets).
        num_countries: fictitious countries of the world facts (default 30: 120 facts; 0: none).
        phase: ``"target"``, ``"retain"`` or ``"unlearn"``.
        batch_size: training batch size (each stream's in ``"unlearn"``).
        eval_batch_size: evaluation batch size (default: ``batch_size``).
        seed: seed of the generated data and of the loaders' order.
        forget_path: a user's QA file of the forget set (see above); needs ``retain_path``.
        retain_path: a user's QA file of the retained set.
        holdout_path: a user's QA file of held-out questions (membership non-members; optional).
        world_facts_path: a user's QA file of the utility set (optional).
        num_workers: loader workers.
        tokenizer: ``None``/``"bytes"`` (the byte tokenizer, default) or the path of a local Hugging
            Face tokenizer (a real model's; answers end with its end id, else 0).

    Raises:
        ValueError: arguments out of range, a forget share that leaves no retained person,
            ``forget_path`` without ``retain_path`` (or the reverse), a file without the fields.
        TypeError: an argument of the wrong type.
    """

    def __init__(
        self,
        num_people: int = 100,
        questions_per_person: int = 20,
        forget_percent: float = 10.0,
        num_perturbed: int = 5,
        num_countries: int = 30,
        phase: Phase = "target",
        batch_size: int = 16,
        eval_batch_size: Optional[int] = None,
        seed: int = 0,
        forget_path: Optional[str] = None,
        retain_path: Optional[str] = None,
        holdout_path: Optional[str] = None,
        world_facts_path: Optional[str] = None,
        num_workers: int = 0,
        tokenizer: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.num_people = check_int("num_people", num_people, min=2)
        self.questions_per_person = check_int("questions_per_person", questions_per_person, min=1,
                                              max=MAX_QUESTIONS_PER_PERSON)
        self.forget_percent = check_float("forget_percent", forget_percent, min=0, max=100, min_inclusive=False,
                                          max_inclusive=False, fix="pass a percentage such as 1, 5 or 10")
        self.num_perturbed = check_int("num_perturbed", num_perturbed, min=1, max=5)
        self.num_countries = check_int("num_countries", num_countries, min=0, max=200)
        self.phase = check_choice("phase", phase, ("target", "retain", "unlearn"))
        self.batch_size = check_int("batch_size", batch_size, min=1)
        self.eval_batch_size = check_int("eval_batch_size", eval_batch_size if eval_batch_size is not None else batch_size, min=1)
        self.seed = check_int("seed", seed)
        self.num_workers = check_int("num_workers", num_workers, min=0)
        self.paths = {name: check_str(f"{name}_path", value, allow_none=True) for name, value in
                      (("forget", forget_path), ("retain", retain_path), ("holdout", holdout_path),
                       ("world_facts", world_facts_path))}
        if (self.paths["forget"] is None) != (self.paths["retain"] is None):
            raise ValueError(message("forget_path/retain_path", "both set or both unset",
                                     (forget_path, retain_path), "pass both files of your data, or neither"))
        self.num_forget = max(1, round(self.num_people * self.forget_percent / 100))
        if self.paths["forget"] is None and self.num_forget >= self.num_people:
            raise ValueError(message("forget_percent", f"a share that leaves a retained person of {self.num_people}",
                                     forget_percent, "lower it, or raise num_people"))
        if self.paths["forget"] is None and self.num_people + self.num_forget > len(_FIRST) * len(_LAST):
            raise ValueError(message("num_people", f"a number whose people and holdout people fit the {len(_FIRST) * len(_LAST)} "
                                     "built-in names", num_people, "lower it"))
        for path in self.paths.values():
            if path is not None and not os.path.exists(os.path.expanduser(path)):
                raise ValueError(message("path", "an existing QA file", path, "check the path"))
        self.tokenizer_spec = check_str("tokenizer", tokenizer, allow_none=True)
        self.tokenizer: Any = load_tokenizer(self.tokenizer_spec)
        eos = self.tokenizer.eos_id
        self.end_id = 0 if eos is None else int(eos)
        self._splits: Optional[dict[str, list[dict[str, Any]]]] = None

    # ------------------------------------------------------------------ records
    def _build(self) -> dict[str, list[dict[str, Any]]]:
        if self.paths["forget"] is not None:
            splits = {name: _check_records(read_records(path, f"{name}_path"), path)
                      for name, path in self.paths.items() if path is not None}
            splits.setdefault("holdout", [])
            splits.setdefault("world_facts", [])
            return splits
        people = fictitious_people(self.num_people + self.num_forget, self.seed)
        trained, holdout = people[: self.num_people], people[self.num_people:]
        forget, retain = trained[-self.num_forget:], trained[: -self.num_forget]
        make = lambda group: people_records(group, self.questions_per_person, self.num_perturbed, self.seed)  # noqa: E731
        return {
            "forget": make(forget), "retain": make(retain), "holdout": make(holdout),
            "world_facts": world_fact_records(self.num_countries, self.num_perturbed, self.seed) if self.num_countries else [],
        }

    def records(self, split: Literal["forget", "retain", "holdout", "world_facts"]) -> list[dict[str, Any]]:
        """The QA records of ``split``."""
        check_choice("split", split, ("forget", "retain", "holdout", "world_facts"))
        if self._splits is None:
            self._splits = self._build()
        return self._splits[split]

    def dataset(self, split: Literal["forget", "retain", "holdout", "world_facts"], answer_field: str = "answer",
                perturbed_index: int = 0) -> QADataset:
        """``split`` tokenised with ``answer_field`` as the answer (see :class:`QADataset`)."""
        return QADataset(self.records(split), self.tokenizer, self.end_id, answer_field, perturbed_index)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (257 for the byte tokenizer)."""
        return self.tokenizer.vocab_size

    @property
    def block_size(self) -> int:
        """Tokens of the longest example of any split and answer field (the model's context must hold it)."""
        longest = 0
        for split in ("forget", "retain", "holdout", "world_facts"):
            for r in self.records(split):  # type: ignore[arg-type]
                prompt = len(self.tokenizer.encode(f"Question: {r['question']}\nAnswer: "))
                answers = [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
                longest = max(longest, prompt + max(len(self.tokenizer.encode(str(a))) for a in answers) + 1)
        return longest

    @property
    def corpus_names(self) -> list[str]:
        """Names of the validation loaders, in order."""
        return [s for s in ("forget", "retain", "holdout", "world_facts") if self.records(s)]  # type: ignore[arg-type]

    #: Labels mark answers only (``CausalLMModule`` then logs exact match).
    answer_only_labels = True

    # ------------------------------------------------------------------ phases
    def forget_train_dataset(self, task: int = 0) -> Dataset:
        """The forget set (one forgetting task: ``task`` must be 0)."""
        if task != 0:
            raise ValueError(message("task", "0 (one forgetting task)", task, "run one fit per forget split"))
        return self.dataset("forget")

    def train_dataset(self) -> Dataset:
        """The training data of :attr:`phase`."""
        if self.phase == "unlearn":
            return PairedDataset(self.dataset("forget"), self.dataset("retain"), self.seed, 0)
        splits = ["retain", "world_facts"] if self.phase == "retain" else ["forget", "retain", "world_facts"]
        records = [r for s in splits for r in self.records(s)]
        return QADataset(records, self.tokenizer, self.end_id)

    def collate_fn(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """:func:`collate_qa` (loaders outside this module, e.g. a saliency pass, use it)."""
        return collate_qa(rows)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset(), batch_size=self.batch_size, shuffle=True, collate_fn=collate_qa,
                          generator=seeded_generator(self.seed, 900_000), num_workers=self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.dataset(s), batch_size=self.eval_batch_size, shuffle=False,  # type: ignore[arg-type]
                           collate_fn=collate_qa, num_workers=self.num_workers) for s in self.corpus_names]

    def __repr__(self) -> str:
        return (f"FictitiousQADataModule(num_people={self.num_people}, forget_percent={self.forget_percent}, "
                f"phase={self.phase!r}, seed={self.seed})")
