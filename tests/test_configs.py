"""Every shipped YAML runs through the CLI with fast overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_forget.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))

#: Extra overrides that keep a config's data small in tests (the config itself is unchanged).
SMALL_DATA = {
    "continual_pretraining": ["--data.init_args.max_chars_per_corpus", "20000"],
    # fast_dev_run's 2 steps make k-FPF fine-tune after each one (k > steps): a narrow ResNet
    # and 2 inner steps (the option reaches the last callback: KFPF, or FPF after ER).
    "kfpf": ["--model.init_args.resnet_width", "4", "--trainer.callbacks.init_args.finetune_steps", "2"],
}


def test_configs_exist() -> None:
    names = {str(p.relative_to(p.parents[1])) if p.parent.name != "configs" else p.name for p in CONFIGS}
    assert {"quickstart.yaml", "finetune/split_mnist.yaml", "er/split_mnist.yaml", "joint/split_mnist.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(p.parents[1] if p.parent.name != "configs" else p.parent)) for p in CONFIGS])
def test_config_runs(config: Path, tmp_path: Any) -> None:
    args = [
        "fit",
        "--config",
        str(config),
        "--trainer.fast_dev_run",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    args += SMALL_DATA.get(config.parent.name, [])
    cli = main(args)
    assert cli is not None and cli.trainer.global_step > 0
