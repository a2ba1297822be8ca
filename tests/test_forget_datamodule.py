"""ForgetRetainDataModule: task class sets, the two streams, evaluation roles, MIA split, random mode, resume."""

import pytest
import torch

from lightning_forget.batch import stream_names
from lightning_forget.datamodules import ForgetRetainDataModule


def _labels(dataset):
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


@pytest.fixture(scope="module")
def dm():
    d = ForgetRetainDataModule(builtin="digits", forget_classes=[[8, 9], [6, 7]], batch_size=16, data_ratio=0.2)
    d.setup()
    return d


def test_streams_and_class_sets(dm):
    assert dm.num_tasks == 2 and dm.retained_classes == [0, 1, 2, 3, 4, 5]
    assert set(_labels(dm.forget_train_dataset(0)).tolist()) == {8, 9}
    assert set(_labels(dm.retain_train_dataset(0)).tolist()) == {0, 1, 2, 3, 4, 5, 6, 7}
    assert set(_labels(dm.retain_train_dataset(1)).tolist()) == {0, 1, 2, 3, 4, 5}
    # data_ratio: about 20% of each class of the training pool
    full = _labels(dm.forget_train_dataset(0, subsample=False))
    sub = _labels(dm.forget_train_dataset(0))
    for c in (8, 9):
        assert int((sub == c).sum()) == round(int((full == c).sum()) * 0.2)
    batch = next(iter(dm.train_dataloader()))
    assert stream_names(batch) == ["forget", "retain"]
    assert set(batch["forget"][1].tolist()) <= {8, 9}
    assert not set(batch["retain"][1].tolist()) & {8, 9}
    # the longer stream drives the epoch
    assert len(dm.train_dataset(0)) == max(len(dm.forget_train_dataset(0)), len(dm.retain_train_dataset(0)))


def test_eval_loaders_roles_and_mia_split(dm):
    loaders = dm.val_dataloader()
    assert len(loaders) == 3
    assert set(_labels(loaders[0].dataset).tolist()) == {8, 9}
    assert set(_labels(loaders[1].dataset).tolist()) == {6, 7}
    assert set(_labels(loaders[2].dataset).tolist()) == {0, 1, 2, 3, 4, 5}
    assert dm.loader_roles(1) == {"forget": [1], "old": [0], "retain": [2]}
    mia = dm.mia_datasets(0)
    assert set(_labels(mia["heldout"]).tolist()) == {8, 9}
    # held-out samples are never in the training pool
    pool = dm.pretrain_dataset()
    train_x = torch.stack([pool[i][0] for i in range(len(pool))]).flatten(1)
    held_x = torch.stack([mia["heldout"][i][0] for i in range(len(mia["heldout"]))]).flatten(1)
    assert not (torch.cdist(held_x, train_x).min(1).values == 0).all()
    assert len(pool) + len(dm._heldout) == 1438


def test_few_shot_and_random_mode():
    d = ForgetRetainDataModule(builtin="digits", mode="random", num_tasks=2, forget_fraction=0.05, few_shot=3)
    f0 = _labels(d.forget_train_dataset(0))
    assert all(int((f0 == c).sum()) <= 3 for c in range(10))
    full0 = d.forget_train_dataset(0, subsample=False)
    full1 = d.forget_train_dataset(1, subsample=False)
    x0 = torch.stack([full0[i][0] for i in range(len(full0))]).flatten(1)
    x1 = torch.stack([full1[i][0] for i in range(len(full1))]).flatten(1)
    assert len(full0) == int(len(d.pretrain_dataset()) * 0.05)
    assert torch.cdist(x0, x1).min() > 0  # disjoint tasks
    assert len(d.val_dataloader()) == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="forget_classes"):
        ForgetRetainDataModule(builtin="digits", forget_classes=[])
    with pytest.raises(ValueError, match="repeat"):
        ForgetRetainDataModule(builtin="digits", forget_classes=[[1], [1]])
    with pytest.raises(ValueError, match=r"\[11\]"):
        ForgetRetainDataModule(builtin="digits", forget_classes=[[11]])
    with pytest.raises(ValueError, match="data_ratio"):
        ForgetRetainDataModule(builtin="digits", forget_classes=[[1]], data_ratio=0)
    with pytest.raises(ValueError, match="builtin"):
        ForgetRetainDataModule(builtin="cifar", forget_classes=[[1]])
    with pytest.raises(ValueError, match="train"):
        ForgetRetainDataModule(forget_classes=[[1]])
    with pytest.raises(ValueError, match="below 1"):
        ForgetRetainDataModule(builtin="digits", mode="random", num_tasks=10, forget_fraction=0.2)


def test_given_tensors_and_deterministic_epochs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 5, generator=g), torch.arange(300) % 3
    d = ForgetRetainDataModule(train=(x, y), forget_classes=[[2]], data_ratio=0.5, batch_size=8)
    a = [b["forget"][1] for b in d.train_dataloader()]
    b = [b["forget"][1] for b in d.train_dataloader()]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_forgetting_every_class_or_a_non_integer_class_is_refused():
    # Every class forgotten leaves no retained data (GS-LoRA then failed later with a wrong fix).
    with pytest.raises(ValueError, match=r"forget_classes.*every class"):
        ForgetRetainDataModule(builtin="digits", forget_classes=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    # 8.7 was truncated to class 8.
    with pytest.raises(TypeError, match=r"forget_classes.*8\.7"):
        ForgetRetainDataModule(builtin="digits", forget_classes=[[8.7]])
    import numpy as np

    dm = ForgetRetainDataModule(builtin="digits", forget_classes=[[np.int64(8)], [torch.tensor(9)]])
    assert dm.forget_classes == [[8], [9]]


def test_separate_forget_and_retain_loaders():
    dm = ForgetRetainDataModule(builtin="digits", forget_classes=[[8]], data_ratio=1.0, batch_size=32)
    forget = torch.cat([y for _, y in dm.forget_dataloader(0)])
    retain = torch.cat([y for _, y in dm.retain_dataloader(0)])
    assert set(forget.tolist()) == {8} and 8 not in set(retain.tolist())
    assert len(forget) == len(dm.forget_train_dataset(0)) and len(retain) == len(dm.retain_train_dataset(0))
