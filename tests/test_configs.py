"""Every shipped YAML runs through the CLI with fast overrides."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_forget.cli import main
from lightning_forget.datamodules.base import ContinualDataModule
from lightning_forget.tasks import ContinualCallback

ALL_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def _multi_process(config: Path) -> bool:
    """Whether the config launches several processes (``devices`` > 1): run by a launch of its
    own (tests/test_sharded_contract.py), not inside pytest, where Lightning would re-run pytest."""
    devices = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("devices", 1)
    return isinstance(devices, int) and devices > 1


CONFIGS = [c for c in ALL_CONFIGS if not _multi_process(c)]
#: Sharded configs (ModelParallelStrategy over 2 processes): parsed and instantiated here; their run
#: is in the sharded contract launch (tests/helpers/sharded_run.py, `config_run`).
MULTI_PROCESS_CONFIGS = [c for c in ALL_CONFIGS if _multi_process(c)]

#: Extra overrides that keep a config's data small in tests (the config itself is unchanged).
SMALL_DATA = {
    "continual_pretraining": ["--data.init_args.max_chars_per_corpus", "20000"],
    # The test's 4 steps make k-FPF fine-tune after each one (k=5 > steps): a narrow ResNet
    # and 2 inner steps (the option reaches the last callback: KFPF, or FPF after ER).
    "kfpf": ["--model.init_args.resnet_width", "4", "--trainer.callbacks.init_args.finetune_steps", "2"],
    # LM unlearning: a one-block GPT-2 and four people with two questions each.
    "unlearning_lm": ["--model.init_args.n_layer", "1", "--model.init_args.n_embd", "16", "--model.init_args.n_head", "2",
                      "--data.init_args.num_people", "4", "--data.init_args.questions_per_person", "2",
                      "--data.init_args.num_countries", "1", "--data.init_args.forget_percent", "25",
                      "--data.init_args.batch_size", "2"],
    # Concept erasure: a one-level UNet and 2 DDIM steps for the evaluation's samples.
    "erasure": ["--model.init_args.block_out_channels", "[8]", "--model.init_args.norm_num_groups", "4",
                "--model.init_args.sample_steps", "2"],
}


def test_configs_exist() -> None:
    names = {str(p.relative_to(p.parents[1])) if p.parent.name != "configs" else p.name for p in CONFIGS}
    assert {"quickstart.yaml", "finetune/split_mnist.yaml", "er/split_mnist.yaml", "joint/split_mnist.yaml"} <= names
    sharded = {str(p.relative_to(p.parents[1])) for p in MULTI_PROCESS_CONFIGS}
    assert {"i_lora/vit_split_mnist_sharded.yaml", "unlearning/scrub_digits_sharded.yaml"} <= sharded


def _task_stream(config: Path) -> bool:
    """Whether the config trains a stream of several tasks in one fit (not joint, not one task)."""
    spec = yaml.safe_load(config.read_text()).get("data") or {}
    data = spec.get("init_args") or {}
    module, _, name = str(spec.get("class_path", "")).rpartition(".")
    if not module:
        return False
    cls = getattr(importlib.import_module(module), name)
    takes_epochs = issubclass(cls, ContinualDataModule) or "epochs_per_task" in inspect.signature(cls).parameters
    if not takes_epochs or not callable(getattr(cls, "task_of_epoch", None)):
        return False
    return not data.get("joint") and data.get("task") is None and int(data.get("num_tasks", 2)) > 1


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(p.parents[1] if p.parent.name != "configs" else p.parent)) for p in CONFIGS])
def test_config_runs(config: Path, tmp_path: Any) -> None:
    """A stream config trains two tasks of two batches each, so its callbacks cross a task
    boundary (task-end fills, Fisher passes, schedule restarts); the others run fast_dev_run."""
    args = ["fit", "--config", str(config), "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    crosses = _task_stream(config)
    if crosses:
        args += [
            "--data.init_args.epochs_per_task", "1", "--trainer.max_epochs", "2",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_checkpointing", "false",
        ]
    else:
        args += ["--trainer.fast_dev_run", "2"]
    args += SMALL_DATA.get(config.parent.name, [])
    cli = main(args)
    assert cli is not None and cli.trainer.global_step > 0
    if crosses:
        assert cli.trainer.current_epoch == 2 and cli.datamodule.task_of_epoch(1) == 1  # task 1 trained
        tasks = [c for c in cli.trainer.callbacks if isinstance(c, ContinualCallback)]
        assert all(c._ended >= 0 for c in tasks), "a callback saw no task end"


def test_er_fpf_config_reports_the_model_its_checkpoint_holds(tmp_path: Any) -> None:
    """configs/kfpf/*_er_fpf.yaml: FPF fine-tunes at each task end. The last row of the accuracy
    matrix and val/acc_avg are measured after it: they equal what the final checkpoint validates at."""
    import json

    config = Path(__file__).parents[1] / "configs" / "kfpf" / "split_mnist_er_fpf.yaml"
    common = ["--config", str(config), "--trainer.enable_progress_bar", "false",
              "--trainer.limit_val_batches", "2", *SMALL_DATA["kfpf"]]
    cli = main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "fit"), "--data.init_args.epochs_per_task", "1",
                "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--data.init_args.num_tasks", "2"])
    report = json.loads(next((tmp_path / "fit").rglob("metrics.json")).read_text())
    last_row = report["accuracy_matrix"][-1]
    fitted = float(cli.trainer.callback_metrics["val/acc_avg"])
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    validated = main(["validate", *common, "--trainer.default_root_dir", str(tmp_path / "validate"),
                      "--data.init_args.num_tasks", "2", "--ckpt_path", checkpoint])
    metrics = validated.trainer.callback_metrics
    assert [float(metrics[f"val/acc/task_{t}"]) for t in range(2)] == pytest.approx(last_row)
    assert float(metrics["val/acc_avg"]) == pytest.approx(fitted)


@pytest.mark.parametrize("config", MULTI_PROCESS_CONFIGS, ids=lambda c: c.name)
def test_sharded_config_builds_model_parallel_and_its_callbacks_accept_it(config: Path, tmp_path: Any) -> None:
    """A multi-process (``*_sharded.yaml``) config builds ``ModelParallelStrategy`` on 2 processes, and every callback
    it lists accepts that strategy (its run is covered by tests/test_sharded_contract.py)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_forget.tasks import check_strategy

    cli = main(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli is not None and isinstance(cli.trainer.strategy, ModelParallelStrategy)
    assert cli.trainer.num_devices == 2
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, ContinualCallback)]
    assert callbacks
    for callback in callbacks:
        check_strategy(callback, cli.trainer)
