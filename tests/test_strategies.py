"""Each callback declares the strategies it supports; others are refused in ``setup``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

from lightning_forget.callbacks import (
    ContinualEvaluation,
    ContinualMetrics,
    DarkExperienceReplay,
    ExperienceReplay,
    InfiniteLRSchedule,
    LiNeS,
    LRRewarming,
)
from lightning_forget.sharding import sharding_refusal
from lightning_forget.tasks import ContinualCallback, check_strategy, strategy_name
from tests.helpers.mech import TinyRegressor, plain_trainer, regression_loader

CALLBACKS = {
    "ExperienceReplay": lambda: ExperienceReplay(buffer_size=8),
    "DarkExperienceReplay": lambda: DarkExperienceReplay(buffer_size=8),
    "LRRewarming": lambda: LRRewarming(max_lr=0.1),
    "InfiniteLRSchedule": lambda: InfiniteLRSchedule(max_lr=0.1),
    "LiNeS": lambda: LiNeS(),
    "ContinualEvaluation": lambda: ContinualEvaluation(),
    "ContinualMetrics": lambda: ContinualMetrics(),
}


@pytest.mark.parametrize(
    ("strategy", "name"),
    [
        (SingleDeviceStrategy("cpu"), "single_device"),
        (DDPStrategy(), "ddp"),
        (DDPStrategy(start_method="spawn"), "ddp_spawn"),
        (DDPStrategy(start_method="fork"), "ddp_fork"),
        (FSDPStrategy(), "fsdp"),
    ],
)
def test_strategy_name_by_class(strategy, name) -> None:
    assert strategy_name(strategy) == name


def test_deepspeed_is_not_taken_for_ddp() -> None:
    # DeepSpeedStrategy subclasses DDPStrategy; build one without running its __init__ (it
    # needs the deepspeed package).
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    assert strategy_name(strategy) == "deepspeed"


@pytest.mark.parametrize("method", sorted(CALLBACKS))
def test_every_method_declares_its_strategies(method) -> None:
    cls = type(CALLBACKS[method]())
    assert "supported_strategies" in vars(cls), f"{method} must declare supported_strategies"
    assert {"single_device", "ddp", "ddp_spawn", "ddp_fork"} <= set(cls.supported_strategies)
    assert "fsdp" not in cls.supported_strategies and "deepspeed" not in cls.supported_strategies


@pytest.mark.parametrize("method", sorted(CALLBACKS))
@pytest.mark.parametrize("make", [FSDPStrategy, lambda: DeepSpeedStrategy.__new__(DeepSpeedStrategy)], ids=["fsdp", "deepspeed"])
def test_sharded_strategy_is_refused_in_setup(method, make) -> None:
    callback = CALLBACKS[method]()
    trainer = SimpleNamespace(strategy=make())
    with pytest.raises(RuntimeError, match=rf"{type(callback).__name__} does not support strategy=.*strategy=\"ddp\""):
        callback.setup(trainer, TinyRegressor(), "fit")


@pytest.mark.parametrize("start_method", ["popen", "spawn", "fork"])
def test_ddp_start_methods_pass(start_method) -> None:
    for make in CALLBACKS.values():
        check_strategy(make(), SimpleNamespace(strategy=DDPStrategy(start_method=start_method)))


def test_single_device_fit_passes_and_subclass_can_narrow(tmp_path) -> None:
    class SingleOnly(ContinualCallback):
        supported_strategies = ("single_device",)

    trainer = plain_trainer(tmp_path, [SingleOnly()], fast_dev_run=True)
    trainer.fit(TinyRegressor(), regression_loader())
    with pytest.raises(RuntimeError, match=r"strategy='ddp_spawn'.*supports \['single_device'\]"):
        SingleOnly().setup(SimpleNamespace(strategy=DDPStrategy(start_method="spawn")), TinyRegressor(), "fit")


def _model_parallel():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def test_model_parallel_strategy_is_named() -> None:
    assert strategy_name(_model_parallel()) == "model_parallel"


def _readme_model_parallel_column() -> dict[str, str]:
    """Class name → the README's ``ModelParallelStrategy`` cell for it."""
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| Method | single device"))
    column = [c.strip() for c in lines[header].strip("|").split("|")].index("`ModelParallelStrategy` (FSDP2)")
    cells: dict[str, str] = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        row = [c.strip() for c in line.strip("|").split("|")]
        for name in row[0].split("`")[1::2]:
            cells[name] = row[column]
    return cells


def test_readme_model_parallel_column_matches_the_classes() -> None:
    import lightning_forget.callbacks as cbs

    cells = _readme_model_parallel_column()
    assert len(cells) >= 20
    for name, cell in cells.items():
        supported = "model_parallel" in getattr(cbs, name).supported_strategies
        assert cell.startswith("contract test") == supported, (name, cell)
        assert cell.startswith("refused") == (not supported), (name, cell)


def test_model_parallel_is_accepted_or_refused_with_its_reason() -> None:
    import lightning_forget.callbacks as cbs

    cells = _readme_model_parallel_column()
    trainer = SimpleNamespace(strategy=_model_parallel())
    for name in cells:
        cls = getattr(cbs, name)
        if "model_parallel" in cls.supported_strategies:
            check_strategy(SimpleNamespace(supported_strategies=cls.supported_strategies), trainer)
            continue
        reason = sharding_refusal(cls)
        assert reason, f"{name} refuses ModelParallelStrategy without saying why"
        with pytest.raises(RuntimeError, match=rf"{name} does not support strategy='model_parallel'") as error:
            check_strategy(cls.__new__(cls), trainer)  # an instance, without constructor arguments
        assert reason.strip() in str(error.value) and "docs/sharding.md" in str(error.value)
