"""The LM unlearning benchmark's models: one command builds and saves the target and retain models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_forget.datamodules import FictitiousQADataModule
from lightning_forget.modules import CausalLMModule
from lightning_forget.unlearning import lm_models


def test_build_models_saves_target_and_retain_models_that_reload(tmp_path: Path, capsys: Any) -> None:
    records = lm_models.main(["--out", str(tmp_path), "--forget-percent", "25", "--num-people", "4",
                              "--questions-per-person", "3", "--num-countries", "1", "--n-layer", "1", "--n-embd", "32",
                              "--n-head", "2", "--epochs", "40", "--fit-loss", "2.0", "--lr", "2e-2", "--batch-size", "4",
                              "--threads", "1"])
    assert set(records) == {"target", "retain_forget25"}
    printed = capsys.readouterr().out
    assert "target:" in printed and "forget p=" in printed and "acc=" in printed
    settings = lm_models.load_data_settings(tmp_path / "target")
    assert settings == {"num_people": 4, "questions_per_person": 3, "num_perturbed": 5, "num_countries": 1, "seed": 0,
                        "forget_percent": 25.0, "tokenizer": None}
    assert json.loads((tmp_path / "models.json").read_text())["target"]["epochs"] == 40
    # Every model trains until it fits its training set alike (an epoch's mean loss at most 2.0),
    # not for a fixed number of epochs that leaves some half fitted; 40 epochs is only the cap.
    for record in records.values():
        assert record["final_train_loss"] <= 2.0 and record["epochs_trained"] < 40
    target, retain = records["target"]["scores"], records["retain_forget25"]["scores"]
    # The target model learned the forget person's answers; the retain model never saw them.
    assert target["forget"]["probability"] > retain["forget"]["probability"]
    assert retain["retain"]["probability"] > retain["forget"]["probability"]
    # The saved folder reloads as CausalLMModule(pretrained_path=...) and scores the same.
    module = CausalLMModule(pretrained_path=str(lm_models.model_dir(tmp_path, "retain", 25)))
    dm = FictitiousQADataModule(**{k: v for k, v in settings.items() if k != "forget_percent"}, forget_percent=25)
    again = lm_models.score_splits(module.model, dm)
    assert again["forget"]["probability"] == pytest.approx(retain["forget"]["probability"], rel=1e-5)


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="forget_percents"):
        lm_models.build_models(tmp_path, forget_percents=[])
    with pytest.raises(ValueError, match=r"forget_percents\[0\]"):
        lm_models.build_models(tmp_path, forget_percents=[100])
    with pytest.raises(ValueError, match="data.json"):
        lm_models.load_data_settings(tmp_path)
