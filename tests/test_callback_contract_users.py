"""The contract every callback keeps when run the ways users run it (one row per callback: ROWS).

For each row, a plain LightningModule written without the library (``training_step`` calls
``self.net(x)``; a ``forward`` only where the callback still needs one: :data:`NEEDS_FORWARD`),
plain DataLoaders, one ``fit`` per task, and Lightning's default ``ModelCheckpoint``:

- the checkpoint each fit leaves holds the weights and callback state the fit ends with (task-end
  work included);
- resuming with each constructor argument changed in turn (the saved state loaded into a callback
  built with the changed argument, as Lightning does) either goes on with the saved state and a
  warning naming the argument, or refuses naming it;
- ``Trainer.validate``/``test`` with ``ckpt_path`` work after the fits;
- a second run writing into the same folder changes no file of the first.

One run per row (two fits, then one fit of the second run) serves every check.
"""

from __future__ import annotations

import copy
import hashlib
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader

from lightning_forget.arguments import plain_value
from lightning_forget.tasks import ContinualCallback
from tests.helpers.data import BlobStream
from tests.helpers.harness import same_state
from tests.helpers.models import TinyConvNet
from tests.test_callback_contract import ROWS, Row, _FORGET_DATA, _ids
from tests.helpers.diffusion import TINY_UNET, DigitImageStream
from lightning_forget.modules import DiffusionModule

#: Rows whose callback still runs the module's forward. A row leaves this set when its callback
#: works with a module that has none (training_step calling ``self.net(x)``).
NEEDS_FORWARD = {"DarkExperienceReplay", "RefreshLearning", "KFPF", "KFPF-auto", "FPF", "GSLoRA",
                 "ForgetRetainEvaluation", "AdaB2N", "ContinualEvaluation"}

NUM_TASKS = 2


class UserModule(pl.LightningModule):
    """What a user writes: a network in ``self.net``, cross-entropy, SGD; accuracy per val loader."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(-1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("test_acc", (self.net(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class UserModuleWithForward(UserModule):
    """The same with a ``forward``, which its ``training_step`` calls (``self(x)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss


class UserLM(pl.LightningModule):
    """A user's causal LM: a Hugging Face GPT-2 in ``self.model``, dict batches."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=96, n_layer=2, n_embd=32, n_head=2))

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", self._loss(batch))

    test_step = validation_step

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class UserQALM(UserLM):
    """The same user LM with room for the fictitious-QA rows (160 positions, one block of width 16)."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        from transformers import GPT2Config, GPT2LMHeadModel

        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=160, n_layer=1, n_embd=16, n_head=2))


# ---------------------------------------------------------------------------- data per task
@dataclass
class TaskData:
    train: Any = None
    val: Any = None
    datamodule: Any = None

    def fit_kwargs(self) -> dict[str, Any]:
        if self.datamodule is not None:
            return {"datamodule": self.datamodule}
        return {"train_dataloaders": self.train, "val_dataloaders": self.val}

    def eval_kwargs(self) -> dict[str, Any]:
        return {"datamodule": self.datamodule} if self.datamodule is not None else {"dataloaders": self.val}


def blob_tasks() -> list[TaskData]:
    dm = BlobStream(num_tasks=NUM_TASKS)
    vals = [DataLoader(dm.val_dataset(t), batch_size=16) for t in range(NUM_TASKS)]
    generator = torch.Generator().manual_seed(0)
    return [TaskData(DataLoader(dm.train_dataset(t), batch_size=8, shuffle=True, generator=generator), vals)
            for t in range(NUM_TASKS)]


def forget_tasks(retain_only: bool = False) -> list[TaskData]:
    """GS-LoRA's two-stream batches from a user's own CombinedLoader; ForgetRetainEvaluation's
    fixed-task datamodule (it reads the forget/retain/MIA sets from it)."""
    from lightning_forget.datamodules import ForgetRetainDataModule

    tasks = []
    for t in range(NUM_TASKS):
        dm = ForgetRetainDataModule(epochs_per_task=1, task=t, **{**_FORGET_DATA, "num_tasks": NUM_TASKS},
                                    retain_only=retain_only)
        if retain_only:
            tasks.append(TaskData(datamodule=dm))
            continue
        dm.prepare_data()
        dm.setup("fit")
        tasks.append(TaskData(dm.train_dataloader(), dm.val_dataloader()))
    return tasks


def instruction_tasks() -> list[TaskData]:
    from tests.helpers.text import tiny_instruction_stream

    dm = tiny_instruction_stream()
    dm.prepare_data()
    dm.setup("fit")
    vals = [DataLoader(dm.val_dataset(t), batch_size=4, collate_fn=dm.collate_fn) for t in range(NUM_TASKS)]
    return [TaskData(DataLoader(dm.train_dataset(t), batch_size=4, collate_fn=dm.collate_fn), vals)
            for t in range(NUM_TASKS)]


def qa_tasks(datamodule: bool = False) -> list[TaskData]:
    """The LM unlearning rows: per task a plain DataLoader of two-stream QA rows (person t forgotten);
    ``datamodule=True``: per task the stream fixed to that task (LMUnlearningEvaluation reads its splits)."""
    from lightning_forget.datamodules.fictitious_qa import collate_qa
    from tests.helpers.qa_stream import QAForgetStream

    if datamodule:
        return [TaskData(datamodule=QAForgetStream(num_tasks=NUM_TASKS, task=t, retain_only=True)) for t in range(NUM_TASKS)]

    dm = QAForgetStream(num_tasks=NUM_TASKS)
    vals = [DataLoader(dm.val_dataset(t), batch_size=2, collate_fn=collate_qa) for t in range(NUM_TASKS)]
    generator = torch.Generator().manual_seed(0)
    return [TaskData(DataLoader(dm.train_dataset(t), batch_size=2, shuffle=True, generator=generator, collate_fn=collate_qa),
                     vals) for t in range(NUM_TASKS)]


def mlp(hidden: list[int], out: int = 6, dim: int = 8) -> nn.Module:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(dim, width), nn.ReLU()]
        dim = width
    return nn.Sequential(nn.Flatten(), *layers, nn.Linear(dim, out))


@dataclass
class UserWay:
    """How a user runs a row: the network, the tasks, and argument overrides (files on, plain names)."""

    make_module: Callable[[str], pl.LightningModule]
    make_tasks: Callable[[], list[TaskData]] = blob_tasks
    kwargs: Optional[dict[str, Any]] = None


def user_module(make_net: Callable[[], nn.Module]) -> Callable[[str], pl.LightningModule]:
    def make(row_id: str) -> pl.LightningModule:
        cls = UserModuleWithForward if row_id in NEEDS_FORWARD else UserModule
        return cls(make_net())

    return make


_MLP = user_module(lambda: mlp([16]))
_FORGET_MLP = user_module(lambda: mlp([16, 16], out=10, dim=64))
USER_WAYS: dict[str, UserWay] = {
    "ContinualMetrics": UserWay(_MLP, kwargs={"key": None, "report": True}),
    "ContinualEvaluation": UserWay(_MLP, kwargs={"save_csv": True}),
    "ILoRA": UserWay(lambda row_id: UserLM(), instruction_tasks, kwargs={"save_adapters": True}),
    "ForgetRetainEvaluation": UserWay(_FORGET_MLP, lambda: forget_tasks(retain_only=True), kwargs={"report": True}),
    "GSLoRA": UserWay(_FORGET_MLP, forget_tasks, kwargs={"target_modules": ["net.1", "net.3"]}),
    "AdaB2N": UserWay(user_module(lambda: nn.Sequential(TinyConvNet(8), nn.Linear(16, 6))),
                      kwargs={"num_tasks": NUM_TASKS, "classes_per_task": 2}),
    # The unlearning methods on the user's own CombinedLoader({"forget", "retain"}) (SalUn's mask
    # reads the forget stream's dataset), a module without forward: `forward_fn="net"`.
    **{row_id: UserWay(_FORGET_MLP, forget_tasks, kwargs={"forward_fn": "net"})
       for row_id in ("GradientAscent", "GradDiff", "GradDiff-kl", "RandomLabels", "L1Sparse", "SCRUB", "SalUn", "FineTune")},
    # The LM methods on a user's module keeping a Hugging Face GPT-2 in `self.model` (no forward).
    **{row_id: UserWay(lambda row_id: UserQALM(), qa_tasks, kwargs={"forward_fn": "model"})
       for row_id in ("NPO", "SimNPO", "IdkPO", "RMU")},
    # The LM evaluation reads its splits from a fixed-task datamodule; the user's module keeps the
    # Hugging Face GPT-2 in `self.model` and has no forward.
    "LMUnlearningEvaluation": UserWay(lambda row_id: UserQALM(), lambda: qa_tasks(datamodule=True)),
    "UnlearningEvaluation": UserWay(_FORGET_MLP, lambda: forget_tasks(retain_only=True),
                                    kwargs={"forward_fn": "net", "report": True}),
}


class UserDiffusion(DiffusionModule):
    """A user's diffusion module: the library's model with the user's own ``training_step`` calling the UNet."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        generator = torch.Generator().manual_seed(batch_idx)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x.shape[0],), generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        x_t = self.noise_scheduler.add_noise(x, noise, t)
        if self.kind == "conditional":
            prediction = self.unet(x_t, t, encoder_hidden_states=self.concept_embeddings[y]).sample
        else:
            prediction = self.unet(x_t, t, class_labels=y).sample
        return F.mse_loss(prediction, noise)


def diffusion_tasks() -> list[TaskData]:
    dm = DigitImageStream(num_tasks=NUM_TASKS)
    vals = [DataLoader(dm.val_dataset(t), batch_size=16) for t in range(NUM_TASKS)]
    generator = torch.Generator().manual_seed(0)
    return [TaskData(DataLoader(dm.train_dataset(t), batch_size=8, shuffle=True, generator=generator), vals)
            for t in range(NUM_TASKS)]


USER_WAYS.update({
    row_id: UserWay(lambda row_id, unet=unet: UserDiffusion(**{**TINY_UNET, "unet": unet, "num_classes": 6}), diffusion_tasks)
    for row_id, unet in (("ESD", "conditional"), ("ESD-u-lora-class", "class"), ("ConceptAblation", "conditional"),
                         ("UCE", "conditional"), ("ErasureEvaluation", "conditional"), ("DoCo", "conditional"),
                         ("SalUnDiffusion-class", "class"), ("SFD-lora", "conditional"))
})


#: User-mode erasure rows kept in the slow suite (their contract, resume and DDP rows run by default in
#: tests/test_callback_contract.py; the default suite's time budget does not take both).
_SLOW_USER_ROWS = {"ESD-u-lora-class", "ConceptAblation", "UCE", "ErasureEvaluation"}
USER_ROWS = [pytest.param(row, marks=pytest.mark.slow) if row.id in _SLOW_USER_ROWS else row for row in ROWS]


def user_way(row: Row) -> UserWay:
    return USER_WAYS.get(row.id, UserWay(_MLP))


def user_kwargs(row: Row) -> dict[str, Any]:
    return {**row.kwargs, **(user_way(row).kwargs or {})}


# ---------------------------------------------------------------------------- the shared run
def user_trainer(root: Path, callback: ContinualCallback, **kwargs: Any) -> pl.Trainer:
    """Lightning's defaults (its ModelCheckpoint included), on CPU, quiet, no logger."""
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(default_root_dir=str(root), callbacks=[callback], accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class UserRun:
    module: pl.LightningModule
    callback: ContinualCallback
    tasks: list[TaskData]
    fits: list[dict[str, Any]]  # per fit: checkpoint path, weights and callback state after it
    first_run_files: dict[str, str]
    root: Path
    error: Optional[BaseException] = None


_USER_RUNS: dict[str, UserRun] = {}


def user_run(row: Row, tmp_path_factory: Any) -> UserRun:
    """Two fits (one per task) of a row the user's way, then a second run's first fit in the same folder."""
    if row.id in _USER_RUNS:
        return _USER_RUNS[row.id]
    way = user_way(row)
    root = tmp_path_factory.mktemp(f"user-{row.id}")
    pl.seed_everything(0)
    tasks = way.make_tasks()
    module = way.make_module(row.id)
    callback = row.cls(**user_kwargs(row))
    fits = []
    for task in tasks:
        trainer = user_trainer(root, callback)
        trainer.fit(module, **task.fit_kwargs())
        fits.append({
            "ckpt": trainer.checkpoint_callback.best_model_path,
            "weights": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "state": copy.deepcopy(callback.state_dict()),
            "key": callback.state_key,
        })
    first_files = file_hashes(root)
    pl.seed_everything(1)
    second_cb = row.cls(**user_kwargs(row))
    user_trainer(root, second_cb).fit(way.make_module(row.id), **way.make_tasks()[0].fit_kwargs())
    run = UserRun(module, callback, tasks, fits, first_files, root)
    _USER_RUNS[row.id] = run
    return run



#: Rows whose fit still leaves the module different from its checkpoint (known gaps, to close in the
#: callback); none today (ILoRA's checkpoints hold the slow learner in the weights, the fast one in its state).
CHECKPOINT_GAPS: dict[str, str] = {}


@pytest.mark.parametrize(
    "row",
    [pytest.param(r, marks=pytest.mark.xfail(reason=CHECKPOINT_GAPS[r.id], strict=True)) if r.id in CHECKPOINT_GAPS else r
     for r in USER_ROWS],
    ids=_ids(ROWS),
)
def test_user_fit_checkpoint_holds_the_state_after_the_fit(row: Row, tmp_path_factory: Any) -> None:
    run = user_run(row, tmp_path_factory)
    assert run.callback._ended == NUM_TASKS - 1
    for number, fit in enumerate(run.fits):
        checkpoint = torch.load(fit["ckpt"], map_location="cpu", weights_only=False)
        saved = checkpoint["state_dict"]
        assert sorted(saved) == sorted(fit["weights"]), f"fit {number}"
        for name, value in fit["weights"].items():
            assert torch.equal(saved[name], value), f"fit {number}: {name} differs from the model the fit left"
        state = checkpoint["callbacks"][fit["key"]]
        assert state["protocol"]["ended"] == number, f"fit {number}: the checkpoint misses the task's end"
        assert same_state(state, fit["state"]), f"fit {number}: the checkpoint's callback state is not the fit's"


@pytest.mark.parametrize("row", USER_ROWS, ids=_ids(ROWS))
def test_user_second_run_in_the_same_folder_changes_no_file_of_the_first(row: Row, tmp_path_factory: Any) -> None:
    run = user_run(row, tmp_path_factory)
    now = file_hashes(run.root)
    changed = [name for name, digest in run.first_run_files.items() if now.get(name) != digest]
    assert not changed, f"the second run replaced or removed {changed}"


@pytest.mark.parametrize("row", USER_ROWS, ids=_ids(ROWS))
def test_user_validate_and_test_from_the_checkpoint(row: Row, tmp_path_factory: Any, tmp_path: Path) -> None:
    run = user_run(row, tmp_path_factory)
    way = user_way(row)
    task = way.make_tasks()[-1]
    for stage in ("validate", "test"):
        callback = row.cls(**user_kwargs(row))  # a fresh callback, as a new script builds it
        trainer = user_trainer(tmp_path / stage, callback)
        results = getattr(trainer, stage)(way.make_module(row.id), ckpt_path=run.fits[-1]["ckpt"], **task.eval_kwargs())
        assert results, stage


# ---------------------------------------------------------------------------- changed arguments
def _literal_choices(cls: type, name: str) -> tuple[Any, ...]:
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # pragma: no cover - unresolvable annotations: no Literal to read
        return ()
    choices: list[Any] = []

    def visit(tp: Any) -> None:
        if typing.get_origin(tp) is typing.Literal:
            choices.extend(typing.get_args(tp))
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is not None:
                visit(arg)

    visit(hints.get(name))
    return tuple(choices)


def changed_values(cls: type, name: str, value: Any) -> list[Any]:
    """Candidate other values for an argument, most plausible first."""
    return [other for other in _candidates(cls, name, value) if plain_value(other) != plain_value(value)]


def _candidates(cls: type, name: str, value: Any) -> list[Any]:
    literal = [c for c in _literal_choices(cls, name) if c != value]
    if literal:
        return literal
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2, max(value - 1, 0)]
    if isinstance(value, float):
        return [value * 0.5, value + 0.25, 0.5]
    if isinstance(value, str):
        return [value + "_other"]
    if isinstance(value, (list, tuple)) and value:
        return [type(value)(list(value)[:-1]) if len(value) > 1 else type(value)(list(value) * 2)]
    if isinstance(value, dict) and value:
        key = next(iter(value))
        return [{**value, key: v} for v in changed_values(cls, key, value[key])]
    if value is None:
        return [2, 0.5, True, "x"]
    return []


def restore_into(callback: ContinualCallback, checkpoint: dict[str, Any], root: Path) -> None:
    """Lightning's own restore of callback states, for a fit."""
    trainer = user_trainer(root, callback)
    trainer.state.fn = TrainerFn.FITTING
    call._call_callbacks_on_load_checkpoint(trainer, checkpoint)
    call._call_callbacks_load_state_dict(trainer, checkpoint)


@pytest.mark.parametrize("row", USER_ROWS, ids=_ids(ROWS))
def test_user_resume_with_each_argument_changed_continues_or_refuses_naming_it(
    row: Row, tmp_path_factory: Any, tmp_path: Path
) -> None:
    run = user_run(row, tmp_path_factory)
    checkpoint = torch.load(run.fits[-1]["ckpt"], map_location="cpu", weights_only=False)
    base = run.callback.arguments
    tried = []
    for name, value in base.items():
        for other in changed_values(row.cls, name, value):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    callback = row.cls(**{**base, name: other})
            except Exception:  # not a valid value for this argument: try the next
                continue
            if type(callback) is row.cls:  # (a deprecated `mode` may build another class)
                break
        else:
            continue
        tried.append(name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                restore_into(callback, copy.deepcopy(checkpoint), tmp_path)
            except RuntimeError as error:
                assert f"`{name}`" in str(error) and repr(plain_value(value)) in str(error), (name, str(error))
                assert name in row.cls.state_arguments, f"{name} was refused but is not declared in state_arguments"
                continue
        assert callback._ended == NUM_TASKS - 1, f"changing `{name}` dropped the saved state"
        messages = [str(w.message) for w in caught]
        assert any(f"`{name}`" in m for m in messages), f"changing `{name}` went on without a warning naming it: {messages}"
    assert tried, "no argument could be changed"


def test_resume_refusal_names_only_the_changed_argument(tmp_path: Path) -> None:
    from lightning_forget.callbacks import KFPF

    saved = KFPF(k=4, buffer_size=16).state_dict()
    fresh = KFPF(k=4, buffer_size=32)
    with pytest.raises(RuntimeError) as error:
        restore_into(fresh, {"callbacks": {"KFPF{old}": saved}, "pytorch-lightning_version": pl.__version__}, tmp_path)
    message = str(error.value)
    assert "`buffer_size`: 16 in the checkpoint, 32 now" in message
    for other in ("`k`", "`seed`", "`kd`", "`interval`"):
        assert other not in message


def test_two_instances_of_a_class_each_find_their_state(tmp_path: Path) -> None:
    from lightning_forget.callbacks import ExperienceReplay

    first, second = ExperienceReplay(buffer_size=4, seed=1), ExperienceReplay(buffer_size=8, seed=2)
    first._ended, second._ended = 3, 5
    checkpoint = {"callbacks": {first.state_key: first.state_dict(), second.state_key: second.state_dict()},
                  "pytorch-lightning_version": pl.__version__}
    a, b = ExperienceReplay(buffer_size=4, seed=1), ExperienceReplay(buffer_size=8, seed=3)  # b's seed changed
    trainer = pl.Trainer(default_root_dir=str(tmp_path), callbacks=[a, b], logger=False, accelerator="cpu")
    trainer.state.fn = TrainerFn.FITTING
    with pytest.warns(UserWarning, match="`seed`: 2 in the checkpoint, 3 now"):
        call._call_callbacks_on_load_checkpoint(trainer, checkpoint)
        call._call_callbacks_load_state_dict(trainer, checkpoint)
    assert (a._ended, b._ended) == (3, 5)


def test_user_unlearning_report_writes_task_indices_as_integers(tmp_path_factory: Any) -> None:
    import csv

    row = next(r for r in ROWS if r.id == "ForgetRetainEvaluation")
    run = user_run(row, tmp_path_factory)
    lines = list(csv.reader((run.root / "unlearning.csv").open()))
    assert [line[0] for line in lines[1:]] == [str(t) for t in range(NUM_TASKS)]
