"""ContinualClassifier: plain fits, its report callback across fits, and bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_forget.modules import ContinualClassifier
from tests.helpers.data import BlobStream
from tests.helpers.harness import quiet_trainer


def test_default_single_task_fit_validates(tmp_path: Path) -> None:
    # num_tasks=1 (the default): the 1x1 accuracy matrix is indexed at every validation end.
    stream = BlobStream(num_tasks=3)
    model = ContinualClassifier(num_classes=6, input_shape=(8,), hidden_sizes=[8], report=False)
    trainer = quiet_trainer(tmp_path, [], max_epochs=1)
    trainer.fit(model, DataLoader(stream.train_dataset(0), batch_size=8), DataLoader(stream.val_dataset(0), batch_size=8))
    assert "val/acc/task_0" in trainer.callback_metrics
    assert model.val_matrix.compute().shape == (1, 1)


def _fit_tasks_with_new_trainers(tmp_path: Path, model: ContinualClassifier, stream: BlobStream, **kwargs: Any) -> list[Any]:
    trainers = []
    for task in range(stream.num_tasks):
        trainer = quiet_trainer(tmp_path / f"fit{task}", [], max_epochs=1, **kwargs)
        val = [DataLoader(stream.val_dataset(t), batch_size=4) for t in range(task + 1)]
        trainer.fit(model, DataLoader(stream.train_dataset(task), batch_size=8), val)
        trainers.append(trainer)
    return trainers


def test_report_callback_is_one_instance_across_fits(tmp_path: Path) -> None:
    # report=True with a new Trainer per task: configure_callbacks must hand the same
    # ContinualMetrics to every fit, so the tasks count up and the matrix grows (issue 8 A2).
    from lightning_forget.callbacks import ContinualMetrics

    stream = BlobStream(num_tasks=3)
    model = ContinualClassifier(num_classes=6, input_shape=(8,), num_tasks=3, hidden_sizes=[8], report=True)
    trainers = _fit_tasks_with_new_trainers(tmp_path, model, stream)
    found = [[cb for cb in trainer.callbacks if isinstance(cb, ContinualMetrics)] for trainer in trainers]
    assert all(len(cbs) == 1 for cbs in found)
    assert found[0][0] is found[1][0] is found[2][0]
    metrics = found[2][0]
    assert metrics.task == 2
    assert torch.isfinite(metrics.matrix.tril()).all()
    torch.testing.assert_close(metrics.matrix.float(), model.val_matrix.compute(), equal_nan=True)
    import json

    payload = json.loads(next((tmp_path / "fit2").rglob("metrics.json")).read_text())
    assert payload["summary"]["tasks_trained"] == 3


def test_sanity_check_does_not_overwrite_the_previous_row(tmp_path: Path) -> None:
    # Lightning's default num_sanity_val_steps=2 with one fit per task: the 2 sanity batches
    # ran before the task counter advanced and replaced the previous task's row (issue 8 A4).
    stream = BlobStream(num_tasks=3)
    model = ContinualClassifier(num_classes=6, input_shape=(8,), num_tasks=3, hidden_sizes=[8], report=False)
    from lightning_forget.callbacks import ContinualMetrics

    metrics = ContinualMetrics(report=False)
    for task in range(3):
        trainer = quiet_trainer(tmp_path / f"fit{task}", [metrics], max_epochs=1)
        assert trainer.num_sanity_val_steps == 2
        val = [DataLoader(stream.val_dataset(t), batch_size=4) for t in range(task + 1)]
        trainer.fit(model, DataLoader(stream.train_dataset(task), batch_size=8), val)
    # 24 validation samples per task, all counted in every measured cell
    assert model.val_matrix.total.tolist() == [[24, 0, 0], [24, 24, 0], [24, 24, 24]]
    torch.testing.assert_close(metrics.matrix.float(), model.val_matrix.compute(), equal_nan=True)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"input_shape": []}, ValueError, "input_shape"),
        ({"input_shape": (-1, 28)}, ValueError, "input_shape"),
        ({"input_shape": "28"}, TypeError, "input_shape"),
        ({"hidden_sizes": [0]}, ValueError, "hidden_sizes"),
        ({"backbone": "resnet", "resnet_width": 0}, ValueError, "resnet_width"),
        ({"optimizer": "adam"}, TypeError, "optimizer"),
        ({"num_classes": 2.5}, TypeError, "num_classes"),
        ({"num_tasks": 0}, ValueError, "num_tasks"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, error, name) -> None:
    from lightning_forget.modules import ContinualClassifier

    with pytest.raises(error, match=name):
        ContinualClassifier(**kwargs)


@pytest.mark.parametrize("sanity_steps", [None, 0], ids=["lightning-default-sanity-check", "no-sanity-check"])
@pytest.mark.parametrize("bad, name", [({"input_shape": (5,)}, "input_shape"), ({"num_classes": 3}, "num_classes")])
def test_data_that_contradict_the_arguments_fail_at_the_first_batch(tmp_path, bad, name, sanity_steps) -> None:
    from tests.helpers.data import BlobStream
    from tests.helpers.harness import quiet_trainer
    from lightning_forget.modules import ContinualClassifier

    dm = BlobStream(num_tasks=2)
    kwargs = {"num_classes": dm.num_classes, "input_shape": dm.input_shape, "num_tasks": dm.num_tasks,
              "hidden_sizes": [8], "report": False}
    kwargs.update(bad)
    model = ContinualClassifier(**kwargs)
    extra = {} if sanity_steps is None else {"num_sanity_val_steps": sanity_steps}
    trainer = quiet_trainer(tmp_path, [], max_epochs=dm.max_epochs, **extra)
    # With Lightning's default the sanity check's validation batches come first: they are
    # checked too, so the message is ours, not a raw shape or index error from torch.
    with pytest.raises(ValueError, match=name):
        trainer.fit(model, dm)
    if name == "input_shape":
        assert trainer.global_step == 0  # every batch has the wrong shape: the first one fails
    # (labels >= 3 first appear in task 1's data: the fit stops there, with our message)


def test_a_test_loader_after_validation_is_checked_too(tmp_path) -> None:
    """`test` after a fit whose validation checked loader 0: the test loader's first batch is checked
    afresh (a bad label gets our message, not torch's raw index error)."""
    from torch.utils.data import DataLoader, TensorDataset

    from tests.helpers.harness import quiet_trainer
    from lightning_forget.modules import ContinualClassifier

    model = ContinualClassifier(num_classes=2, input_shape=(8,), hidden_sizes=[4], report=False)
    good = DataLoader(TensorDataset(torch.randn(8, 8), torch.tensor([0, 1] * 4)), batch_size=4)
    trainer = quiet_trainer(tmp_path, [], max_epochs=1)
    trainer.fit(model, good, good)
    bad = DataLoader(TensorDataset(torch.randn(8, 8), torch.tensor([0, 1, 5, 0, 1, 0, 1, 0])), batch_size=4)
    with pytest.raises(ValueError, match="`num_classes` is 2, but the data has label 5"):
        trainer.test(model, bad)


def test_a_label_outside_num_classes_fails_at_the_first_training_batch(tmp_path) -> None:
    from lightning_forget.modules import ContinualClassifier

    model = ContinualClassifier(num_classes=2, input_shape=(8,), hidden_sizes=[4], report=False)
    x, y = torch.randn(8, 8), torch.tensor([0, 1, 2, 0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="num_classes"):
        model._check_first_batch(x, y)
