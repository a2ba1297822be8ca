"""Regression tests for the replay hardening: batch layouts, composition, precision, resume, copies."""

from __future__ import annotations

import copy
from collections import namedtuple
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_forget.buffers import TASK_KEY
from lightning_forget.callbacks import DarkExperienceReplay, ExperienceReplay
from lightning_forget.distributed import _pack_rows, _unpack_rows, _field_layout, gather_batch, unshare_memory
from lightning_forget.losses import step_context
from lightning_forget.tasks import ContinualCallback
from tests.helpers.data import BlobStream
from tests.helpers.harness import quiet_trainer, tiny_classifier

Triple = namedtuple("Triple", ["image", "label", "task"])


class Net(pl.LightningModule):
    """Reads its batch by `layout`; records what each step saw."""

    def __init__(self, layout: str = "tuple", output: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)
        self.layout, self.output = layout, output
        self.seen: list[Any] = []

    def forward(self, x: torch.Tensor) -> Any:
        z = self.net(x)
        if self.output == "dict":
            return {"logits": z}
        if self.output == "object":
            return _Out(z)
        return z

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.layout == "dict":
            x, y, t = batch["image"], batch["label"], batch["task"]
        else:
            x, y, t = batch[0], batch[1], batch[2]
        assert x.shape[0] == y.shape[0] == t.shape[0]
        self.seen.append((x.clone(), y.clone(), t.clone()))
        out = self(x)
        z = out if isinstance(out, torch.Tensor) else (out["logits"] if isinstance(out, dict) else out.logits)
        return nn.functional.cross_entropy(z, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class DictData(Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": self.y[i], "task": torch.tensor(i % 2)}


def _loader(layout: str, n: int = 16, collate: Any = None) -> DataLoader:
    if layout == "dict":
        return DataLoader(DictData(n), batch_size=4, collate_fn=collate)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), torch.arange(n) % 2)
    if layout == "namedtuple":
        return DataLoader(ds, batch_size=4, collate_fn=lambda items: Triple(*[torch.stack(c) for c in zip(*items)]))
    return DataLoader(ds, batch_size=4)


@pytest.mark.parametrize("layout", ["tuple", "namedtuple", "dict"])
@pytest.mark.parametrize("make", [lambda **k: ExperienceReplay(buffer_size=8, replay_batch_size=2, **k),
                                  lambda **k: DarkExperienceReplay(buffer_size=8, replay_batch_size=2, **k)])
def test_any_batch_layout_is_stored_and_replayed_whole(tmp_path: Any, layout: str, make: Any) -> None:
    keys = {"input_key": "image", "target_key": "label"} if layout == "dict" else {}
    callback = make(**keys)
    model = Net(layout)
    quiet_trainer(tmp_path, [callback], max_epochs=2).fit(model, _loader(layout))
    # DER++'s reservoir counts each epoch's visit; ER's default (a task-end policy) each sample once
    assert callback.buffer.num_seen == (16 if isinstance(callback, ExperienceReplay) else 32)
    assert TASK_KEY in callback.buffer.fields  # every row's task id is stored beside the batch's fields
    assert len(callback.buffer.fields) == 4 + isinstance(callback, DarkExperienceReplay)
    if isinstance(callback, ExperienceReplay):
        assert max(x.shape[0] for x, _, _ in model.seen) == 6  # the third field was joined too


def test_per_sample_lists_are_refused_and_missing_fields_named(tmp_path: Any) -> None:
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        out: dict[str, Any] = {k: torch.stack([i[k] for i in items]) for k in items[0]}
        out["path"] = [f"f{i}" for i in range(len(items))]
        return out

    with pytest.raises(TypeError, match=r"per-sample field\(s\) \['path'\] are lists"):
        quiet_trainer(tmp_path, [ExperienceReplay(buffer_size=8)], max_epochs=1).fit(Net("dict"), _loader("dict", collate=collate))
    with pytest.raises(KeyError, match="`target_key`='y'.*Fix: pass `target_key=`"):
        quiet_trainer(tmp_path, [DarkExperienceReplay(buffer_size=8, target_key="y")], max_epochs=1).fit(Net("dict"), _loader("dict"))


@pytest.mark.parametrize("output", ["dict", "object"])
def test_derpp_reads_logits_from_dict_and_object_outputs(tmp_path: Any, output: str) -> None:
    der = DarkExperienceReplay(buffer_size=8)
    quiet_trainer(tmp_path, [der], max_epochs=2).fit(Net("tuple", output), _loader("tuple"))
    assert der.buffer.contents()["logits"].shape == (8, 3)


class ContextProbe(pl.Callback):
    def __init__(self) -> None:
        self.records: list[tuple[int, list[int]]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        context = step_context(pl_module)
        self.records.append((batch[0].shape[0], context.replay_rows().tolist()))


@pytest.mark.parametrize("er_first", [True, False])
def test_er_and_derpp_compose(tmp_path: Any, er_first: bool) -> None:
    dm = BlobStream(num_tasks=2, batch_size=8)
    er = ExperienceReplay(buffer_size=16, replay_batch_size=4, seed=1, update="reservoir", draw="step")
    der = DarkExperienceReplay(buffer_size=16, seed=2)
    probe = ContextProbe()
    callbacks = [er, der] if er_first else [der, er]
    quiet_trainer(tmp_path, [*callbacks, probe], max_epochs=dm.max_epochs).fit(tiny_classifier(dm), dm)
    assert er.buffer.num_seen == der.buffer.num_seen == len(dm.train_dataset(0)) + len(dm.train_dataset(1))
    n, rows = probe.records[5]
    assert rows == list(range(n, n + 4))  # ER's rows follow the loader's and are in the context
    assert probe.records[0][1] == []  # empty buffer: nothing replayed


class FrozenNet(Net):
    """`Net` with a zero learning rate: the logits a step saw are the network's logits now."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_derpp_after_er_stores_the_logits_of_the_rows_it_stores(tmp_path: Any) -> None:
    # ER runs first and joins its rows to the batch; DER++ captures the forward of the joined
    # batch and must store, with each loader row, that row's logits (checked by value).
    er = ExperienceReplay(buffer_size=16, replay_batch_size=4, seed=1)
    der = DarkExperienceReplay(buffer_size=16, seed=2)
    model = FrozenNet()
    quiet_trainer(tmp_path, [er, der], max_epochs=1).fit(model, _loader("tuple"))
    assert [x.shape[0] for x, _, _ in model.seen] == [4, 8, 8, 8]  # ER's rows joined from the second step
    stored = der.buffer.contents()
    assert len(der.buffer) == 16
    with torch.no_grad():
        assert torch.allclose(stored["logits"], model(stored["x"]), atol=1e-6)


def test_derpp_stores_fp32_logits_under_bf16_mixed(tmp_path: Any) -> None:
    dm = BlobStream(num_tasks=2)
    der = DarkExperienceReplay(buffer_size=16)
    quiet_trainer(tmp_path, [der], max_epochs=dm.max_epochs, precision="bf16-mixed").fit(tiny_classifier(dm), dm)
    assert der.buffer.storage["logits"].dtype == torch.float32


@pytest.mark.parametrize("name", ["alpha", "beta"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1])
def test_derpp_weights_must_be_finite_and_non_negative(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        DarkExperienceReplay(**{name: value})


def test_resume_with_another_buffer_size_is_refused(tmp_path: Any) -> None:
    dm = BlobStream(num_tasks=2)
    trainer = quiet_trainer(tmp_path, [ExperienceReplay(buffer_size=16)], max_epochs=1, enable_checkpointing=True)
    trainer.fit(tiny_classifier(dm), dm)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    dm2 = BlobStream(num_tasks=2)
    with pytest.raises(RuntimeError, match="cannot resume with changed `buffer_size` \\(`buffer_size`: 16 in the checkpoint, 8 now\\)"):
        quiet_trainer(tmp_path, [ExperienceReplay(buffer_size=8)], max_epochs=2).fit(tiny_classifier(dm2), dm2, ckpt_path=str(ckpt))


class Snapshot(pl.Callback):
    def __init__(self) -> None:
        self.copies: list[Any] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.copies.append(copy.deepcopy(pl_module))


def test_deepcopy_of_the_module_mid_fit_leaves_callbacks_behind(tmp_path: Any) -> None:
    dm = BlobStream(num_tasks=2)
    der = DarkExperienceReplay(buffer_size=4000)
    snap = Snapshot()
    model = tiny_classifier(dm)
    quiet_trainer(tmp_path, [der, snap], max_epochs=1).fit(model, dm)
    clone = snap.copies[0]
    assert "training_step" not in clone.__dict__ or not hasattr(clone.__dict__["training_step"], "transforms")
    memo_free = [hook for hook in clone._forward_hooks.values()]
    assert all(getattr(hook, "owner", None) is None for hook in memo_free)
    x = dm.train_dataset(0).tensors[0][:3]
    assert torch.allclose(clone(x), model(x))


def test_unshare_memory_reaches_modules_held_by_callbacks() -> None:
    class Teacher(ContinualCallback):
        def __init__(self) -> None:
            super().__init__()
            self.teacher = nn.BatchNorm1d(2)

    callback = Teacher()
    callback.teacher.share_memory()
    weight = callback.teacher.weight
    unshare_memory(callback)
    assert not callback.teacher.weight.is_shared() and not callback.teacher.running_mean.is_shared()
    assert callback.teacher.weight is weight  # same Parameter object, private storage


class _FakeStrategy:
    def __init__(self) -> None:
        self.calls = 0

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.stack([tensor, tensor])


class _FakeTrainer:
    world_size = 2

    def __init__(self) -> None:
        self.strategy = _FakeStrategy()


def test_gather_is_two_collectives_whatever_the_fields() -> None:
    fields = {
        "x": torch.randn(3, 2, 2),
        "y": torch.tensor([1, 2, 3]),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(3, 5).bfloat16(),
        "empty": torch.zeros(3, 0),
    }
    trainer = _FakeTrainer()
    out = gather_batch(trainer, fields)  # type: ignore[arg-type]
    assert trainer.strategy.calls == 2
    for key, value in fields.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], torch.cat([value, value]))
    rows = _pack_rows(fields, 3, torch.device("cpu"))
    assert rows.dtype == torch.uint8
    back = _unpack_rows(rows, _field_layout(fields))
    assert all(torch.equal(back[k], v) for k, v in fields.items())


def test_gather_drops_the_padding_of_a_smaller_batch_on_another_rank() -> None:
    # Two ranks (threads meeting in an all_gather, which needs equal shapes as torch.distributed
    # does) hold 3 and 2 rows: the gathered batch is exactly rank 0's rows then rank 1's, with no
    # padding row.
    import threading

    barrier = threading.Barrier(2)
    slots: list[Any] = [None, None]

    class Strategy:
        def __init__(self, rank: int) -> None:
            self.rank = rank

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            slots[self.rank] = tensor
            barrier.wait()
            assert slots[0].shape == slots[1].shape, "all_gather needs the same shape on every rank"
            out = torch.stack([slots[0], slots[1]])
            barrier.wait()
            return out

    class Rank:
        world_size = 2

        def __init__(self, rank: int) -> None:
            self.strategy = Strategy(rank)

    fields = [
        {"x": torch.arange(1, 7).float().reshape(3, 2), "y": torch.tensor([1, 2, 3])},
        {"x": torch.arange(7, 11).float().reshape(2, 2), "y": torch.tensor([4, 5])},
    ]
    out: list[Any] = [None, None]

    def run(rank: int) -> None:
        out[rank] = gather_batch(Rank(rank), fields[rank])  # type: ignore[arg-type]

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for rank in (0, 1):
        assert torch.equal(out[rank]["x"], torch.cat([fields[0]["x"], fields[1]["x"]]))
        assert torch.equal(out[rank]["y"], torch.tensor([1, 2, 3, 4, 5]))


class TwoStream(Net):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch["stream"]
        self.seen.append((x.shape[0], batch["other"][0].shape[0]))
        return nn.functional.cross_entropy(self(x), y) + 0.0 * self(batch["other"][0]).sum()


def test_replay_joins_one_stream_of_a_combined_loader_batch(tmp_path: Any) -> None:
    er = ExperienceReplay(buffer_size=8, replay_batch_size=2, stream="stream")
    model = TwoStream()
    loaders = {"stream": _loader("tuple"), "other": _loader("tuple")}
    quiet_trainer(tmp_path, [er], max_epochs=2).fit(model, train_dataloaders=loaders)
    assert model.seen[0] == (4, 4) and model.seen[-1] == (6, 4)  # replay joined "stream" only
    assert er.buffer.num_seen == 16  # "stream"'s samples, each once (the default is a task-end policy)


def test_gather_with_a_keep_mask_is_one_collective() -> None:
    fields = {"x": torch.randn(4, 3), "y": torch.tensor([0, 1, 2, 3]), "half": torch.randn(4, 2).bfloat16()}
    keep = torch.tensor([True, False, True, True])
    trainer = _FakeTrainer()
    out = gather_batch(trainer, fields, keep=keep)  # type: ignore[arg-type]
    assert trainer.strategy.calls == 1
    for key, value in fields.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], torch.cat([value[keep], value[keep]]))


class PaddingProbe(pl.Callback):
    """Counts ``strategy.all_gather`` calls per training batch and writes rank 0's buffer facts."""

    def __init__(self, er: ExperienceReplay, out: str) -> None:
        self.er, self.out = er, out
        self.calls = 0
        self.per_batch: list[int] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        gather = trainer.strategy.all_gather

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return gather(*args, **kwargs)

        trainer.strategy.all_gather = counted  # type: ignore[method-assign]

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.before = self.calls

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.per_batch.append(self.calls - self.before)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        x = self.er.buffer.contents()["x"]
        facts = {
            "num_seen": int(self.er.buffer.num_seen),
            "stored": len(self.er.buffer),
            "distinct": int(torch.unique(x, dim=0).shape[0]),
            "per_batch": self.per_batch,
            "padded_total": int(trainer.train_dataloader.sampler.total_size),
        }
        if trainer.global_rank == 0:
            import json
            from pathlib import Path

            Path(self.out).write_text(json.dumps(facts))


@pytest.mark.ddp
def test_ddp_sampler_padding_never_enters_the_buffer_and_each_batch_is_one_gather(tmp_path: Any) -> None:
    import json

    # 3 classes x 25 samples = 75 per task: not divisible by 2 ranks x batch 8, and odd, so the
    # DistributedSampler repeats one sample per epoch to give both ranks 38 rows (5 batches).
    pl.seed_everything(0)
    dm = BlobStream(num_tasks=2, classes_per_task=3, samples_per_class=25, batch_size=8)
    er = ExperienceReplay(buffer_size=400, replay_batch_size=4, seed=1)
    out = str(tmp_path / "facts.json")
    probe = PaddingProbe(er, out)
    trainer = quiet_trainer(tmp_path, [er, probe], max_epochs=dm.max_epochs, devices=2, strategy="ddp_spawn")
    trainer.fit(tiny_classifier(dm), dm)
    facts = json.loads(open(out).read())
    assert facts["padded_total"] == 76  # the sampler did pad
    assert facts["num_seen"] == 150 and facts["stored"] == 150  # each sample offered once per epoch
    assert facts["distinct"] == 150  # no repeated row in the buffer
    assert facts["per_batch"] == [1] * 10  # one collective per training batch (5 batches x 2 tasks)
