"""ExperienceReplay's insertion policies (update=), draws (draw=), task ids and token sequences."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_forget.callbacks import ExperienceReplay
from lightning_forget.losses import step_context
from lightning_forget.tasks import current_task
from tests.helpers.data import BlobStream
from tests.helpers.harness import flat_tensors, params_vector, quiet_trainer, run_ddp_pair, run_stream, tiny_classifier


class ContextProbe(pl.Callback):
    """Records, after each step, the task trained and the replayed rows' task ids."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, Any, int]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        context = step_context(pl_module)
        self.steps.append((current_task(trainer), trainer.current_epoch, context.replay_task_ids(), int(context.replay_rows().numel())))


def _fit(tmp_path: Any, callback: ExperienceReplay, epochs_per_task: int = 2, probe: Any = None) -> BlobStream:
    pl.seed_everything(0)
    dm = BlobStream(epochs_per_task=epochs_per_task)
    callbacks = [callback] + ([probe] if probe is not None else [])
    quiet_trainer(tmp_path, callbacks, max_epochs=dm.max_epochs).fit(tiny_classifier(dm), dm)
    return dm


@pytest.mark.parametrize("update, offered", [("reservoir", 2 * 144), ("stream", 144), ("task_end", 144)])
def test_a_sample_revisited_in_a_later_epoch_of_its_task_is_not_counted_again(tmp_path: Any, update: str, offered: int) -> None:
    # BlobStream: 3 tasks x 48 training samples, 2 epochs per task.
    callback = ExperienceReplay(buffer_size=30, replay_batch_size=4, update=update)
    _fit(tmp_path, callback)
    assert callback.buffer.num_seen == offered
    stored = callback.buffer.contents()["x"]
    if update != "reservoir":
        assert torch.unique(stored, dim=0).shape[0] == stored.shape[0]  # no sample stored twice


def test_task_end_replays_only_finished_tasks_with_equal_shares(tmp_path: Any) -> None:
    probe = ContextProbe()
    callback = ExperienceReplay(buffer_size=30, replay_batch_size=4, update="task_end")
    _fit(tmp_path, callback, probe=probe)
    for task, _, ids, rows in probe.steps:
        if task == 0:
            assert rows == 0 and ids is None  # nothing stored before the first task ends
        else:
            assert rows == 4 and bool((ids < task).all())  # never the task being trained
    assert torch.bincount(callback.buffer.task_ids()).tolist() == [10, 10, 10]
    labels = callback.buffer.contents()["y"]
    assert torch.equal(callback.buffer.task_ids(), labels // 2)  # the stored task ids are right


def test_reservoir_exposes_the_replayed_rows_task_ids(tmp_path: Any) -> None:
    probe = ContextProbe()
    _fit(tmp_path, ExperienceReplay(buffer_size=200, replay_batch_size=4, update="reservoir"), epochs_per_task=1, probe=probe)
    seen_tasks: set[int] = set()
    for task, _, ids, rows in probe.steps[1:]:
        assert rows == 4 and bool((ids <= task).all())
        seen_tasks |= set(ids.tolist())
    assert seen_tasks == {0, 1, 2}


def test_pass_draws_replay_every_stored_sample_once_per_pass(tmp_path: Any) -> None:
    class Slots(pl.Callback):
        def __init__(self) -> None:
            self.slots: list[torch.Tensor] = []

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            segments = step_context(pl_module).segments
            if segments:
                self.slots.append(callback.buffer.contents()["x"].new_tensor(0))  # placeholder to keep order
                self.slots[-1] = segments[0].fields["x"]

    callback = ExperienceReplay(buffer_size=12, replay_batch_size=4, update="task_end", draw="pass")
    recorder = Slots()
    _fit(tmp_path, callback, epochs_per_task=1, probe=recorder)
    # Task 1: 48 samples / batch 8 = 6 steps x 4 replayed = 24 rows = two passes over the 12 stored.
    task1 = torch.cat(recorder.slots[:6])
    for p in range(2):
        rows = task1[p * 12 : (p + 1) * 12]
        assert torch.unique(rows, dim=0).shape[0] == 12


@pytest.mark.parametrize("kwargs", [{"update": "stream"}, {"update": "task_end"}, {"update": "task_end", "draw": "pass"}])
def test_resume_mid_task_equals_uninterrupted(tmp_path: Any, kwargs: dict[str, Any]) -> None:
    def make() -> ExperienceReplay:
        return ExperienceReplay(buffer_size=16, replay_batch_size=4, seed=3, **kwargs)

    full_model, full_cb = run_stream(tmp_path / "full", make)
    # epochs_per_task=2: the checkpoint after epoch 2 is the first epoch of task 1 (rows staged).
    resumed_model, resumed_cb = run_stream(tmp_path / "resumed", make, resume_after_epoch=2)
    assert torch.allclose(params_vector(full_model), params_vector(resumed_model), atol=1e-6)
    assert torch.allclose(flat_tensors(full_cb.state_dict()), flat_tensors(resumed_cb.state_dict()), atol=1e-6)


def test_resume_with_another_update_is_refused(tmp_path: Any) -> None:
    dm = BlobStream(num_tasks=2)
    trainer = quiet_trainer(tmp_path, [ExperienceReplay(buffer_size=16, update="stream")], max_epochs=1)
    trainer.fit(tiny_classifier(dm), dm)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    dm2 = BlobStream(num_tasks=2)
    with pytest.raises(RuntimeError, match="cannot resume with changed `update` \\(`update`: 'stream' in the checkpoint, 'task_end' now\\)"):
        quiet_trainer(tmp_path, [ExperienceReplay(buffer_size=16, update="task_end")], max_epochs=2).fit(
            tiny_classifier(dm2), dm2, ckpt_path=str(ckpt)
        )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"update": "fifo"}, ValueError, "update"),
        ({"draw": "random"}, ValueError, "draw"),
        ({"buffer": "class_balanced", "update": "task_end"}, ValueError, "class_balanced"),
        ({"pad_values": {"labels": "x"}}, TypeError, "pad_values"),
        ({"pad_values": [0]}, TypeError, "pad_values"),
    ],
)
def test_bad_policy_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ExperienceReplay(**kwargs)


def test_task_end_warns_on_a_first_fit_without_task_boundaries(tmp_path: Any) -> None:
    class Plain(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 8), torch.arange(8) % 2), batch_size=4)

    dm = BlobStream(num_tasks=1)
    with pytest.warns(UserWarning, match="update='reservoir'"):
        quiet_trainer(tmp_path, [ExperienceReplay(buffer_size=4, update="task_end")], max_epochs=1).fit(
            tiny_classifier(dm), datamodule=Plain()
        )


def test_auto_picks_task_end_passes_on_a_task_stream(tmp_path: Any) -> None:
    probe = ContextProbe()
    callback = ExperienceReplay(buffer_size=30, replay_batch_size=4)
    assert (callback.requested_update, callback.requested_draw) == ("auto", "auto")
    _fit(tmp_path, callback, probe=probe)
    assert (callback.update, callback.draw_mode) == ("task_end", "pass")
    assert torch.bincount(callback.buffer.task_ids()).tolist() == [10, 10, 10]  # equal shares
    assert all(rows == 0 for task, _, _, rows in probe.steps if task == 0)  # nothing before task 0 ends
    assert "task_end" in callback.state_key


class UserNet(pl.LightningModule):
    """A user's own module: no forward, its training_step calls the network it holds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _task_loader(task: int, n: int = 16) -> DataLoader:
    gen = torch.Generator().manual_seed(task)
    y = 2 * task + torch.arange(n) % 2
    x = torch.randn(n, 8, generator=gen) + y.unsqueeze(1).float()
    return DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)


def test_auto_with_one_fit_per_task_replays_finished_tasks_only(tmp_path: Any) -> None:
    # README mode 2: a user's module, plain loaders, one fit per task, Lightning's default
    # checkpointing. Each fit's end is a task boundary, so `auto` is the task-end policy: from the
    # second fit on, replay draws only tasks that have ended, each holding an equal share.
    callback = ExperienceReplay(buffer_size=12, replay_batch_size=4)
    probe, model = ContextProbe(), UserNet()
    for task in range(3):
        pl.seed_everything(task)
        trainer = pl.Trainer(
            default_root_dir=str(tmp_path / f"fit{task}"), callbacks=[callback, probe], max_epochs=1, logger=False,
            accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(model, _task_loader(task))
        assert (callback.update, callback.draw_mode) == ("task_end", "pass")
        ids = callback.buffer.task_ids()
        assert torch.bincount(ids).tolist() == [12 // (task + 1)] * (task + 1)  # equal shares of the tasks ended
    steps = probe.steps
    assert len(steps) == 12
    for task, _, ids, rows in steps[4:]:
        assert rows == 4 and bool((ids < task).all()), (task, ids)  # never the task being trained


def test_auto_without_task_boundaries_replays_the_running_stream(tmp_path: Any) -> None:
    # A task-free stream (one fit, plain loader): nothing is known of later fits, so replay draws
    # from what this fit has seen so far (reservoir ER), from the second step on.
    probe = ContextProbe()
    callback = ExperienceReplay(buffer_size=8, replay_batch_size=2)
    quiet_trainer(tmp_path, [callback, probe], max_epochs=2).fit(UserNet(), _task_loader(0))
    assert [rows for *_, rows in probe.steps] == [0] + [2] * 7
    assert all(bool((ids == 0).all()) for _, _, ids, rows in probe.steps[1:])
    # the fit's end ended task 0: its uniform sample is the buffer a next fit would replay
    assert len(callback.buffer) == 8 and callback.buffer.task_ids().tolist() == [0] * 8


def test_auto_first_fit_resumed_from_its_checkpoint_equals_uninterrupted(tmp_path: Any) -> None:
    # The first fit of plain loaders replays its running task's staged rows; the decision lives
    # in no flag, so a fit that crashed and resumed from Lightning's checkpoint (a fresh process:
    # fresh module and callback) ends with the same weights and buffer.
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers.harness import CrashAtStep, SimulatedCrash

    loader = DataLoader(_task_loader(0).dataset, batch_size=4)  # 4 steps per epoch, no shuffling

    def fit(root: Any, extra: list[Any], ckpt: Any = None) -> tuple[UserNet, ExperienceReplay]:
        pl.seed_everything(0)
        model, callback = UserNet(), ExperienceReplay(buffer_size=8, replay_batch_size=2)
        trainer = pl.Trainer(
            default_root_dir=str(root), callbacks=[callback, *extra], max_epochs=3, logger=False, accelerator="cpu",
            devices=1, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        )
        trainer.fit(model, loader, ckpt_path=ckpt)
        return model, callback

    full, full_cb = fit(tmp_path / "full", [])
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    with pytest.raises(SimulatedCrash):
        fit(tmp_path / "crashed", [CrashAtStep(6), saver])  # in epoch 1, after the epoch-0 checkpoint
    resumed, resumed_cb = fit(tmp_path / "resumed", [], ckpt=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert torch.allclose(params_vector(full), params_vector(resumed), atol=1e-6)
    assert torch.allclose(flat_tensors(full_cb.state_dict()), flat_tensors(resumed_cb.state_dict()), atol=1e-6)


@pytest.mark.parametrize("update, draw", [("reservoir", "auto"), ("stream", "pass"), ("task_end", "step")])
def test_explicit_policies_are_kept_on_a_task_stream(tmp_path: Any, update: str, draw: str) -> None:
    callback = ExperienceReplay(buffer_size=30, replay_batch_size=4, update=update, draw=draw)
    _fit(tmp_path, callback, epochs_per_task=1)
    assert callback.update == update
    assert callback.draw_mode == (("pass" if update == "task_end" else "step") if draw == "auto" else draw)


def test_auto_resume_mid_task_equals_uninterrupted(tmp_path: Any) -> None:
    def make() -> ExperienceReplay:
        return ExperienceReplay(buffer_size=16, replay_batch_size=4, seed=3)

    full_model, full_cb = run_stream(tmp_path / "full", make)
    resumed_model, resumed_cb = run_stream(tmp_path / "resumed", make, resume_after_step=15)  # task 1, staging
    assert resumed_cb.update == "task_end"
    assert torch.allclose(params_vector(full_model), params_vector(resumed_model), atol=1e-6)
    assert torch.allclose(flat_tensors(full_cb.state_dict()), flat_tensors(resumed_cb.state_dict()), atol=1e-6)


class Tokens(Dataset):
    """Token sequences of lengths 2..7 (right-padded per batch by the collate below)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = 2 + i % 6
        return {"input_ids": torch.full((n,), 1 + i % 9), "labels": torch.full((n,), 1 + i % 9)}


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(int(i["input_ids"].numel()) for i in items)
    out = {"input_ids": torch.zeros(len(items), width, dtype=torch.long),
           "attention_mask": torch.zeros(len(items), width, dtype=torch.long),
           "labels": torch.full((len(items), width), -100, dtype=torch.long)}
    for row, item in enumerate(items):
        n = int(item["input_ids"].numel())
        out["input_ids"][row, :n] = item["input_ids"]
        out["attention_mask"][row, :n] = 1
        out["labels"][row, :n] = item["labels"]
    return out


class TokenModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)
        self.batches: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches.append({k: v.clone() for k, v in batch.items()})
        logits = self.head(self.embed(batch["input_ids"]))
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_variable_length_token_batches_are_stored_and_re_padded(tmp_path: Any) -> None:
    callback = ExperienceReplay(
        buffer_size=12, replay_batch_size=3, input_key="input_ids", target_key="labels",
        pad_values={"input_ids": 0, "attention_mask": 0, "labels": -100},
    )
    model = TokenModel()
    loader = DataLoader(Tokens(), batch_size=4, collate_fn=_collate)  # widths 5, 7, 7, ...
    quiet_trainer(tmp_path, [callback], max_epochs=2).fit(model, loader)
    joined = [b for b in model.batches if b["input_ids"].shape[0] == 7]
    assert joined
    for batch in joined:
        mask, labels, ids = batch["attention_mask"], batch["labels"], batch["input_ids"]
        assert bool(((mask == 0) == (labels == -100)).all())  # padding agrees across fields, replay rows too
        assert bool((ids[mask == 0] == 0).all())
        lengths = mask.sum(1)
        assert bool((mask.cumsum(1).max(1).values == lengths).all())  # right-padded


@pytest.mark.ddp
def test_ddp_ranks_hold_the_same_task_end_buffer(tmp_path: Any) -> None:
    def make() -> ExperienceReplay:
        return ExperienceReplay(buffer_size=16, replay_batch_size=4, seed=3, update="task_end", draw="pass")

    result = run_ddp_pair(tmp_path, make)
    assert result["equal_length"] and result["world_size"] == 2 and result["global_step"] > 0, result
    assert result["max_param_diff"] == 0.0 and result["max_state_diff"] == 0.0, result


class _Rank:
    """What `ExperienceReplay.draw` reads of a trainer: the step and this process's place."""

    def __init__(self, rank: int, world_size: int = 2, global_step: int = 0) -> None:
        self.global_rank, self.world_size, self.global_step = rank, world_size, global_step


def _filled(update: str, draw: str, rows: int) -> ExperienceReplay:
    callback = ExperienceReplay(buffer_size=rows, seed=5, update=update, draw=draw)
    callback.buffer.add({"x": torch.arange(rows).float().unsqueeze(1), "y": torch.zeros(rows, dtype=torch.long)}, task=0)
    callback.on_task_end(None, None, 0)  # type: ignore[arg-type]  # commits the staged rows (task_end)
    return callback


def test_step_draws_are_independent_across_ranks() -> None:
    # Two GPUs at the same step must not replay the same rows: each rank's generator is seeded
    # with its rank. Computed here for both ranks of a 2-process run, step by step.
    callback = _filled("reservoir", "step", rows=40)
    same = 0
    for step in range(20):
        drawn = [callback.draw(_Rank(rank, global_step=step), 0, 6)["index"].tolist() for rank in (0, 1)]  # type: ignore[arg-type]
        same += int(drawn[0] == drawn[1])
        overlap = len(set(drawn[0]) & set(drawn[1]))
        assert overlap < 6, (step, drawn)
    assert same == 0


def test_pass_draws_reshuffle_on_every_pass() -> None:
    # draw="pass" is a DataLoader(shuffle=True) over the buffer: each pass has a new order.
    callback = _filled("task_end", "pass", rows=12)
    trainer = _Rank(0, world_size=1)
    passes = [callback.draw(trainer, 0, 12)["index"].tolist() for _ in range(3)]  # type: ignore[arg-type]
    assert all(sorted(order) == list(range(12)) for order in passes)  # each pass covers the buffer once
    assert passes[0] != passes[1] and passes[1] != passes[2] and passes[0] != passes[2], passes


_USER_DDP_SCRIPT = '''
import json, sys
import torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from lightning_forget.callbacks import ExperienceReplay
from lightning_forget.losses import step_context
from tests.helpers.harness import RankFingerprint
from tests.test_replay_policy import UserNet, _task_loader


class Steps(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        context = step_context(pl_module)
        ids = context.replay_task_ids()
        self.rows.append([int(context.replay_rows().numel()), [] if ids is None else ids.tolist()])


if __name__ == "__main__":
    out = sys.argv[1]
    callback, model = ExperienceReplay(buffer_size=8, replay_batch_size=2, seed=1), UserNet()
    for task in range(2):
        pl.seed_everything(task)
        steps = Steps()
        loader = DataLoader(_task_loader(task).dataset, batch_size=2)
        trainer = pl.Trainer(default_root_dir=out, accelerator="cpu", devices=2, strategy="ddp", max_epochs=2,
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback, steps, RankFingerprint(callback, f"{out}/fit{task}.json")])
        trainer.fit(model, loader)
        with open(f"{out}/steps{task}_rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"steps": steps.rows, "policy": [callback.update, callback.draw_mode],
                       "buffer_tasks": callback.buffer.task_ids().tolist()}, handle)
    # End the process group before the interpreter exits: gloo's threads torn down at exit can abort
    # the process ("terminate called without an active exception") after the work is done.
    torch.distributed.destroy_process_group()
'''


@pytest.mark.ddp
def test_auto_under_ddp_one_fit_per_task_first_fit_replays_and_ranks_agree(tmp_path: Any) -> None:
    """The user's way under `strategy="ddp"` (each rank runs the script): plain loaders, one fit per
    task. The first fit replays its running stream from the second step on, the second fit only the
    ended task; after each fit both ranks hold the same weights and the same buffer."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "user_ddp.py"
    script.write_text(_USER_DDP_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=400,
                         env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    for task in range(2):
        ranks = json.loads((tmp_path / f"fit{task}.json").read_text())
        assert ranks["equal_length"] and ranks["world_size"] == 2, ranks
        assert ranks["max_param_diff"] == 0.0 and ranks["max_state_diff"] == 0.0, ranks
        per_rank = [json.loads((tmp_path / f"steps{task}_rank{rank}.json").read_text()) for rank in range(2)]
        assert per_rank[0]["buffer_tasks"] == per_rank[1]["buffer_tasks"]
        for seen in per_rank:
            assert seen["policy"] == ["task_end", "pass"]
            rows = [count for count, _ in seen["steps"]]
            assert len(rows) == 8  # 16 samples / 2 ranks / batch 2, two epochs
            if task == 0:
                assert rows[0] == 0 and all(count == 2 for count in rows[1:]), rows  # the running stream
            else:
                assert all(count == 2 for count in rows) and all(ids == [0, 0] for _, ids in seen["steps"])
    assert per_rank[0]["buffer_tasks"] == [0] * 4 + [1] * 4  # equal shares of the two ended tasks
