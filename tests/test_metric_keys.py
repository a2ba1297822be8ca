"""Metric keys: one documented prefix per method (README "Logged metrics"), checked on real runs.

Each callback runs a short stream with a logger that records every key it receives; the keys the
callback adds (those absent from the same run without it) must start with the prefix the README
lists for it and match one of the keys listed there. The module's own keys are checked against
its row the same way. The tests of ContinualMetrics' default key finding live here too.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from torch import nn
from torch.utils.data import DataLoader

from lightning_forget import callbacks as lf_callbacks
from lightning_forget.callbacks import (
    NPO,
    RMU,
    AdaB2N,
    IdkPO,
    SimNPO,
    ContinualEvaluation,
    ContinualMetrics,
    DarkExperienceReplay,
    ExperienceReplay,
    FPF,
    ForgetRetainEvaluation,
    GSLoRA,
    ILoRA,
    InfiniteLRSchedule,
    KFPF,
    LiNeS,
    LRRewarming,
    RefreshLearning,
    SCRUB,
    FineTune,
    GradDiff,
    GradientAscent,
    L1Sparse,
    RandomLabels,
    SalUn,
    UnlearningEvaluation,
)
from tests.helpers.data import BlobStream
from tests.helpers.harness import quiet_trainer, tiny_classifier
from tests.helpers.text import tiny_instruction_stream, tiny_lm
from tests.helpers.models import conv_classifier
from tests.test_continual_eval import MemoryLogger

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def documented() -> dict[str, tuple[list[str], list[str]]]:
    """``{class name: (prefixes, key patterns)}`` from the README's "Logged metrics" table."""
    section = README.split("## Logged metrics", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[list[str], list[str]]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        name = re.findall(r"`([^`]+)`", cells[0])[0]
        keys = [token for token in re.findall(r"`([^`]+)`", cells[2]) if "/" in token]  # not the notes
        rows[name] = (re.findall(r"`([^`]+)`", cells[1]), keys)
    return rows


def matches(key: str, patterns: list[str]) -> bool:
    """``key`` is one of ``patterns``, where ``{x}`` stands for one path segment."""
    for pattern in patterns:
        regex = "".join(
            "[^/]+" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]*\})", pattern)
        )
        if re.fullmatch(regex, key):
            return True
    return False


def _forget_stream(epochs_per_task: int, **kwargs: Any) -> Any:
    from lightning_forget.datamodules import ForgetRetainDataModule

    return ForgetRetainDataModule(builtin="digits", forget_classes=[[8, 9], [6, 7]], data_ratio=0.05,
                                  epochs_per_task=epochs_per_task, batch_size=16, **kwargs)


def _retain_stream(epochs_per_task: int) -> Any:
    return _forget_stream(epochs_per_task, retain_only=True)


#: Callbacks that need their own data (GSLoRA: two-stream forget/retain batches).
OWN_DATA: dict[str, Callable[[int], Any]] = {"GSLoRA": _forget_stream, "ForgetRetainEvaluation": _retain_stream}
#: The unlearning baselines (two-stream batches) and their evaluation (plain batches of retained data).
OWN_DATA.update({name: _forget_stream for name in ("FineTune", "GradientAscent", "GradDiff", "RandomLabels", "L1Sparse",
                                                    "SCRUB", "SalUn")})
OWN_DATA["UnlearningEvaluation"] = _retain_stream


def logged_keys(tmp_path: Path, callbacks: list[Callback], make_data: Callable[..., Any] = BlobStream,
                make_model: Callable[[Any], Any] = tiny_classifier) -> set[str]:
    """Every key logged or put in ``callback_metrics`` during a 3-task stream with ``callbacks``."""
    pl.seed_everything(0)
    dm = make_data(epochs_per_task=2)
    recorder = MemoryLogger()
    trainer = quiet_trainer(
        tmp_path, [*callbacks, LearningRateMonitor(logging_interval="step")],
        max_epochs=dm.max_epochs, logger=recorder, log_every_n_steps=1,
    )
    if make_data is BlobStream or make_model is not tiny_classifier:
        model = make_model(dm)
    else:  # a forget/retain stream evaluates num_tasks + 1 sets
        from lightning_forget.modules import ContinualClassifier

        model = ContinualClassifier(backbone="mlp", hidden_sizes=[16, 16], num_classes=dm.num_classes,
                                    input_shape=dm.input_shape, num_tasks=dm.num_tasks + 1, report=False)
    trainer.fit(model, dm)
    keys = {key for _, metrics in recorder.records for key in metrics}
    return (keys | set(trainer.callback_metrics)) - {"epoch"}


CALLBACKS: dict[str, Callable[[], Callback]] = {
    "AdaB2N": lambda: AdaB2N(kappa=0.5, lambd=0.1),
    "ContinualMetrics": lambda: ContinualMetrics(report=False),
    "ExperienceReplay": lambda: ExperienceReplay(buffer_size=16),
    "DarkExperienceReplay": lambda: DarkExperienceReplay(buffer_size=16, alpha=0.3, beta=0.5),
    "LRRewarming": lambda: LRRewarming(max_lr=0.1, min_lr=0.01, warmup=0.25),
    "InfiniteLRSchedule": lambda: InfiniteLRSchedule(max_lr=0.1, min_lr=0.01, warmup=3, cooldown_steps=10, anneal_steps=4),
    "LiNeS": lambda: LiNeS(alpha_grid=[0.0, 0.5, 1.0], monitor="val/acc_avg", save_unscaled=False),
    "RefreshLearning": lambda: RefreshLearning(delta=1e-3, fisher_samples=16),
    "ContinualEvaluation": lambda: ContinualEvaluation(every_n_steps=2, samples_per_task=10, save_plot=False, save_csv=False),
    "KFPF": lambda: KFPF(k=3, finetune_steps=1, buffer_size=16, kd=True),
    "FPF": lambda: FPF(finetune_steps=1, buffer_size=16),
    "GSLoRA": lambda: GSLoRA(target_modules=["layers.1", "layers.3"], prototype=True),
    "ForgetRetainEvaluation": lambda: ForgetRetainEvaluation(report=False),
    "ILoRA": lambda: ILoRA(lora={"r": 2, "alpha": 4.0, "dropout": 0.0}, buffer_size=12, save_adapters=False),
    "FineTune": lambda: FineTune(save_original=False),
    "GradientAscent": lambda: GradientAscent(save_original=False),
    "GradDiff": lambda: GradDiff(save_original=False),
    "NPO": lambda: NPO(save_original=False),
    "SimNPO": lambda: SimNPO(save_original=False),
    "IdkPO": lambda: IdkPO(save_original=False),
    "RMU": lambda: RMU(save_original=False),
    "RandomLabels": lambda: RandomLabels(save_original=False),
    "L1Sparse": lambda: L1Sparse(save_original=False),
    "SCRUB": lambda: SCRUB(save_original=False),
    "SalUn": lambda: SalUn(save_original=False),
    "UnlearningEvaluation": lambda: UnlearningEvaluation(report=False),
    "LMUnlearningEvaluation": lambda: lf_callbacks.LMUnlearningEvaluation(report=False, before=False, max_new_tokens=2,
                                                                          progress=False),
    # concept erasure on a tiny diffusion model (DIFFUSION_RUNS)
    "ESD": lambda: lf_callbacks.ESD(erase=[[0], [2], [4]], ddim_steps=2, seed=1),
    "ConceptAblation": lambda: lf_callbacks.ConceptAblation(erase=[[0], [2], [4]], anchor=1, num_anchor_samples=4,
                                                            sample_steps=2),
    "UCE": lambda: lf_callbacks.UCE(erase=[[0], [2], [4]]),
    "DoCo": lambda: lf_callbacks.DoCo(erase=[[0], [2], [4]], discriminator_warmup=1, discriminator_width=8,
                                      num_anchor_samples=4, sample_steps=2, batch_size=4),
    "SalUnDiffusion": lambda: lf_callbacks.SalUnDiffusion(erase=[[0], [2], [4]], num_forget_samples=4, sample_steps=2,
                                                          batch_size=4, mask_batch_size=4),
    "SFD": lambda: lf_callbacks.SFD(erase=[[0], [2], [4]], batch_size=4),
    "ErasureEvaluation": lambda: lf_callbacks.ErasureEvaluation(erase=[[0], [2], [4]], samples_per_class=2, judge_epochs=1,
                                                                num_steps=2, grid_per_class=2),
}

#: Callbacks that need a language model: run on a token stream (baseline from the same stream).
def _qa_unlearn(epochs_per_task: int, phase: str = "unlearn") -> Any:
    """The fictitious-QA benchmark's unlearning phase (two-stream batches), tiny: one fit of one epoch;
    ``phase="retain"`` (plain batches) for the run without the callback."""
    from lightning_forget.datamodules import FictitiousQADataModule

    dm = FictitiousQADataModule(num_people=10, questions_per_person=2, num_countries=0, forget_percent=20,
                                phase=phase, batch_size=2)
    dm.max_epochs = 1  # what the run reads; the datamodule is not a task stream
    return dm


def _qa_lm(dm: Any) -> pl.LightningModule:
    from lightning_forget.modules import CausalLMModule

    return CausalLMModule(n_layer=2, n_embd=32, n_head=2, block_size=dm.block_size)


LM_RUNS: dict[str, tuple[Callable[..., Any], Callable[[Any], pl.LightningModule]]] = {
    "ILoRA": (partial(tiny_instruction_stream, examples_per_task=8), tiny_lm),  # 3 tasks of 2 batches
    **{name: (_qa_unlearn, _qa_lm) for name in ("NPO", "SimNPO", "IdkPO", "RMU")},
    "LMUnlearningEvaluation": (partial(_qa_unlearn, phase="retain"), _qa_lm),  # evaluates; trains nothing itself
}


def _digit_images(epochs_per_task: int) -> Any:
    from tests.helpers.diffusion import DigitImageStream

    return DigitImageStream(epochs_per_task=epochs_per_task)


def _tiny_diffusion(dm: Any) -> pl.LightningModule:
    from tests.helpers.diffusion import tiny_diffusion

    return tiny_diffusion(dm)


#: Concept erasure: a tiny class-conditional UNet on 8x8 digits (baseline: the same stream without the callback).
LM_RUNS.update({name: (_digit_images, _tiny_diffusion)
                for name in ("ESD", "ConceptAblation", "UCE", "DoCo", "SalUnDiffusion", "SFD", "ErasureEvaluation")})


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The keys of the run without a method callback (the module's own, and the LR monitor's)."""
    return logged_keys(tmp_path_factory.mktemp("baseline"), [])


def test_every_callback_has_a_row_with_one_prefix() -> None:
    rows = documented()
    # RNGStateCheckpoint only saves and restores RNG states: it logs no metric.
    public = {name for name in lf_callbacks.__all__} - {"RNGStateCheckpoint"}
    assert public <= set(rows), f"callbacks without a row in README 'Logged metrics': {public - set(rows)}"
    assert set(CALLBACKS) == public  # every callback is run below
    for name in public:
        prefixes, keys = rows[name]
        assert len(prefixes) == 1 and prefixes[0].endswith("/"), (name, prefixes)
        assert keys and all(key.startswith(prefixes[0]) for key in keys), (name, keys)
    callback_prefixes = [rows[name][0][0] for name in public]
    assert len(set(callback_prefixes)) == len(callback_prefixes)  # no two methods share a prefix


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_logged_keys_follow_the_documented_prefix(name: str, tmp_path: Path, baseline: set[str]) -> None:
    prefixes, patterns = documented()[name]
    if name in LM_RUNS:
        make_data, make_model = LM_RUNS[name]
        plain = partial(_qa_unlearn, phase="retain") if make_data is _qa_unlearn else make_data  # no two-stream batches without the callback
        baseline = logged_keys(tmp_path / "lm_baseline", [], plain, make_model)
        added = logged_keys(tmp_path, [CALLBACKS[name]()], make_data, make_model) - baseline
    elif name in OWN_DATA:  # no run of that data without the callback: drop the module's own keys
        module_patterns = documented()["ContinualClassifier"][1]
        keys = logged_keys(tmp_path, [CALLBACKS[name]()], OWN_DATA[name])
        added = {k for k in keys - baseline if not k.startswith("lr-") and not matches(k, module_patterns)}
    else:
        # AdaB2N converts BatchNorm2d layers: it runs on the same stream with a convolutional backbone.
        make_model = conv_classifier if name == "AdaB2N" else tiny_classifier
        added = logged_keys(tmp_path, [CALLBACKS[name]()], make_model=make_model) - baseline
    assert added, f"{name} logged nothing in a 3-task run"
    wrong = sorted(key for key in added if not key.startswith(prefixes[0]) or not matches(key, patterns))
    assert wrong == [], f"{name} logs keys outside its README row ({prefixes[0]}: {patterns}): {wrong}"


def test_module_keys_follow_the_stage_prefixes(baseline: set[str]) -> None:
    prefixes, patterns = documented()["ContinualClassifier"]
    module_keys = {key for key in baseline if not key.startswith("lr-")}  # lr-SGD: LearningRateMonitor's own
    wrong = sorted(key for key in module_keys if not key.startswith(tuple(prefixes)) or not matches(key, patterns))
    assert module_keys and wrong == [], wrong


# ---------------------------------------------------------------- ContinualMetrics' default key


class SuffixModule(pl.LightningModule):
    """An ordinary module: logs ``val_acc`` from every validation dataloader (Lightning adds the suffix)."""

    def __init__(self, name: str = "val_acc") -> None:
        super().__init__()
        self.layer = nn.Linear(8, 6)
        self.name = name

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log(self.name, (self.layer(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.3)


def test_default_key_finds_lightning_dataloader_suffix(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, metrics = BlobStream(), ContinualMetrics(report=False)
    trainer = quiet_trainer(tmp_path, [metrics], max_epochs=dm.max_epochs)
    trainer.fit(SuffixModule(), dm)
    assert metrics.matched_key == "val_acc"
    assert torch.isfinite(metrics.matrix).all() and metrics.matrix.shape == (3, 3)
    for t in range(3):  # row 2 is what was logged at the last validation
        assert metrics.matrix[2, t].item() == pytest.approx(float(trainer.callback_metrics[f"val_acc/dataloader_idx_{t}"]))


def test_default_key_prefers_the_task_template(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, metrics = BlobStream(), ContinualMetrics(report=False)
    model = tiny_classifier(dm)  # logs val/acc/task_{t}
    trainer = quiet_trainer(tmp_path, [metrics], max_epochs=dm.max_epochs)
    trainer.fit(model, dm)
    assert metrics.matched_key == "val/acc/task_{task}" and torch.isfinite(metrics.matrix).all()
    assert metrics.read_accuracies({"val/acc/task_1": 0.5, "val_acc/dataloader_idx_1": 0.9}) == {1: 0.5}


def test_default_key_reads_a_bare_val_acc_of_one_loader_per_fit(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, metrics = BlobStream(), ContinualMetrics(report=False)
    dm.setup("fit")
    trainer = quiet_trainer(tmp_path, [metrics], max_epochs=1)
    trainer.fit(SuffixModule(), DataLoader(dm.train_dataset(0), batch_size=8), DataLoader(dm.val_dataset(0), batch_size=8))
    assert "val_acc" in trainer.callback_metrics and metrics.matrix.shape == (1, 1)
    assert metrics.matrix[0, 0].item() == pytest.approx(float(trainer.callback_metrics["val_acc"]))


def test_no_matching_key_warns_once_naming_looked_for_and_logged(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, metrics = BlobStream(), ContinualMetrics(report=False)
    trainer = quiet_trainer(tmp_path, [metrics], max_epochs=dm.max_epochs)
    with pytest.warns(UserWarning) as caught:
        trainer.fit(SuffixModule(name="accuracy"), dm)
    ours = [str(w.message) for w in caught if str(w.message).startswith("ContinualMetrics: no logged metric")]
    assert len(ours) == 1, ours  # three task ends, one warning
    assert "val/acc/task_{t}, val_acc/dataloader_idx_{t}, val_acc" in ours[0]
    assert "accuracy/dataloader_idx_0" in ours[0]  # the keys that were logged
    assert metrics.matrix.numel() == 0
