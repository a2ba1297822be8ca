"""The `lightning-forget` entry point: LightningCLI subcommands, links and `merge`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_forget.cli import main


def test_merge_subcommand_writes_a_merged_state_dict(tmp_path: Path) -> None:
    base = {"net.0.weight": torch.zeros(2, 2), "net.0.bias": torch.zeros(2)}
    tuned = [{k: v + i + 1 for k, v in base.items()} for i in range(2)]
    paths = []
    for i, state in enumerate([base, *tuned]):
        paths.append(tmp_path / f"m{i}.pt")
        torch.save(state, paths[-1])
    out = tmp_path / "merged.pt"
    args = ["merge", "--pretrained", str(paths[0]), "--finetuned", str(paths[1]), str(paths[2])]
    main([*args, "--method", "task_arithmetic", "--output", str(out)])
    merged = torch.load(out)
    merged = merged.get("state_dict", merged)
    # task arithmetic with scaling 1: θ0 + (1 + 2) = 3
    assert torch.allclose(merged["net.0.weight"], torch.full((2, 2), 3.0))


def test_stream_numbers_are_linked_into_the_model(tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "trainer": {"accelerator": "cpu", "fast_dev_run": 1, "logger": False, "enable_progress_bar": False,
                    "reload_dataloaders_every_n_epochs": 1, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "lightning_forget.modules.ContinualClassifier", "init_args": {"hidden_sizes": [8]}},
        "data": {"class_path": "tests.helpers.data.BlobStream", "init_args": {"num_tasks": 4, "dim": 5}},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path)])
    model = cli.model
    assert model.num_tasks == 4 and model.num_classes == 8 and tuple(model.input_shape) == (5,)


def test_backbone_by_class_path(tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "trainer": {"accelerator": "cpu", "fast_dev_run": 1, "logger": False, "enable_progress_bar": False,
                    "reload_dataloaders_every_n_epochs": 1, "default_root_dir": str(tmp_path)},
        "model": {
            "class_path": "lightning_forget.modules.ContinualClassifier",
            "init_args": {
                "backbone": {"class_path": "torch.nn.Sequential", "init_args": {}},
                "input_shape": [6],
            },
        },
        "data": {"class_path": "tests.helpers.data.BlobStream", "init_args": {"dim": 6}},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path)])
    # an empty Sequential is the identity: the head sits on the raw 6 features
    assert cli.model.head.in_features == 6 and cli.trainer.global_step == 1
