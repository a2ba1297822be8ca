"""DomainIncrementalDataModule and rotate_images: permuted and rotated streams, errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_forget.datamodules import DomainIncrementalDataModule, PermutedMNIST, RotatedMNIST, SplitMNIST
from lightning_forget.datamodules.domain_incremental import rotate_images
from tests.helpers.datamodules import inputs_of, labels_of


def test_permuted_stream_identity_then_seeded_bijections() -> None:
    dm = PermutedMNIST(num_tasks=3)
    assert dm.num_tasks == 3 and dm.classes_of_task(2) == list(range(10)) and dm.task_permutation(0) is None
    base_x, base_y = inputs_of(dm.val_dataset(0)), labels_of(dm.val_dataset(0))
    reference = SplitMNIST(classes_per_task=10)
    assert torch.equal(base_x, inputs_of(reference.val_dataset(0))) and torch.equal(base_y, labels_of(reference.val_dataset(0)))
    perms = [dm.task_permutation(t) for t in (1, 2)]
    for t, perm in zip((1, 2), perms):
        assert perm is not None and torch.equal(perm.sort().values, torch.arange(784))
        assert torch.equal(perm, PermutedMNIST(num_tasks=3).task_permutation(t))
        x, y = inputs_of(dm.val_dataset(t)), labels_of(dm.val_dataset(t))
        assert torch.equal(y, base_y)
        assert torch.equal(x.flatten(1), base_x.flatten(1)[:, perm])
    assert not torch.equal(perms[0], perms[1])
    assert not torch.equal(perms[0], PermutedMNIST(num_tasks=3, seed=1).task_permutation(1))

def test_rotation_matches_rot90_and_keeps_background() -> None:
    image = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.allclose(rotate_images(image, 0.0), image, atol=1e-4)
    assert torch.allclose(rotate_images(image, 90.0), torch.rot90(image, 1, dims=(-2, -1)), atol=1e-4)
    assert torch.allclose(rotate_images(image, -90.0), torch.rot90(image, -1, dims=(-2, -1)), atol=1e-4)
    background = torch.full((1, 1, 6, 6), -0.5)  # a blank image stays blank, corners included
    assert torch.allclose(rotate_images(background, 45.0, fill=torch.full((1, 1, 1, 1), -0.5)), background)
    assert rotate_images(background, 45.0)[0, 0, 0, 0] == 0  # zero padding would not

def test_rotated_stream_angles_labels_and_cache() -> None:
    dm = RotatedMNIST(angles=[0.0, 90.0, 30.0])
    assert dm.num_tasks == 3 and [dm.task_angle(t) for t in range(3)] == [0.0, 90.0, 30.0]
    base_x, base_y = inputs_of(dm.val_dataset(0)), labels_of(dm.val_dataset(0))
    turned = dm.val_dataset(1)
    assert turned is dm.val_dataset(1)  # rotated once per task and split, then cached
    assert torch.equal(labels_of(turned), base_y)
    assert torch.allclose(inputs_of(turned), torch.rot90(base_x, 1, dims=(-2, -1)), atol=1e-4)
    seeded = RotatedMNIST(num_tasks=4, seed=2)
    angles = [seeded.task_angle(t) for t in range(4)]
    assert angles[0] == 0.0 and all(0 <= a < 180 for a in angles) and len(set(angles)) == 4
    assert angles == [RotatedMNIST(num_tasks=4, seed=2).task_angle(t) for t in range(4)]
    corner = inputs_of(seeded.train_dataset(1))[:, 0, 0, 0]
    assert torch.allclose(corner, torch.full_like(corner, -0.1307 / 0.3081), atol=1e-3)

def test_domain_stream_over_generic_data() -> None:
    x, y = torch.rand(60, 5, 5), torch.arange(60) % 3
    dm = DomainIncrementalDataModule(train=(x, y), transform="rotate", num_tasks=2, val_fraction=0.5)
    assert dm.input_shape == (5, 5) and dm.task_classes == [[0, 1, 2], [0, 1, 2]]
    assert inputs_of(dm.train_dataset(1)).shape == (30, 5, 5)
    flat = DomainIncrementalDataModule(train=TensorDataset(x.flatten(1), y), num_tasks=2)
    perm = flat.task_permutation(1)
    assert perm is not None and len(perm) == 25
    assert torch.equal(inputs_of(flat.train_dataset(1)), inputs_of(flat.train_dataset(0))[:, perm])

def test_domain_errors() -> None:
    data = (torch.zeros(10, 4), torch.arange(10) % 2)
    with pytest.raises(ValueError, match="`transform` must be 'permute' or 'rotate', got 'flip'"):
        DomainIncrementalDataModule(train=data, transform="flip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs image inputs.*got inputs of shape \(4,\)"):
        DomainIncrementalDataModule(train=data, transform="rotate")
    with pytest.raises(ValueError, match="`angles` only applies to transform='rotate'"):
        DomainIncrementalDataModule(train=data, angles=[0.0, 1.0])
    with pytest.raises(ValueError, match="must equal num_tasks=3; got 2 angles"):
        RotatedMNIST(num_tasks=3, angles=[0.0, 10.0])
    with pytest.raises(ValueError, match="`angles` must be a non-empty list of finite numbers"):
        RotatedMNIST(angles=[0.0, float("nan")])
    with pytest.raises(ValueError, match="`num_tasks` must be an int >= 1, got 0"):
        PermutedMNIST(num_tasks=0)
