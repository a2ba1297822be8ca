"""Tests of the LiNeS callback (lightning_forget.callbacks.lines) and its benchmark."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.callbacks.lines import LiNeS
from lightning_forget.merging import lines_scale
from tests.helpers.benchmarks import load_benchmark
from tests.helpers.harness import CrashAtStep, SimulatedCrash, quiet_trainer


class BlockNet(pl.LightningModule):
    """Three residual-free 'blocks' and a head; names `blocks.N.*` and `head.*`."""

    def __init__(self, seed: int = 0, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.head = nn.Linear(4, 3)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader(seed: int = 1, n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    # The shared harness (Lightning's defaults otherwise); one epoch unless a test says more.
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("reload_dataloaders_every_n_epochs", 0)
    return quiet_trainer(tmp_path, callbacks, **kwargs)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"beta": "x"}, TypeError, "beta"),  # a wrong type is a TypeError (validation.py's rule)
        ({"head_policy": "drop"}, ValueError, "head_policy"),
        ({"apply_at": "epoch_end"}, ValueError, "apply_at"),
        ({"mode": "best"}, ValueError, "mode"),
        ({"layer_pattern": r"blocks\.\d+"}, ValueError, "layer_pattern"),
        ({"alpha_grid": []}, ValueError, "alpha_grid"),
        ({"alpha_grid": [0.1, 0.2]}, ValueError, "monitor"),
        ({"monitor": "val_loss"}, ValueError, "alpha_grid"),
        ({"alpha_grid": [0.1], "score_fn": 3}, TypeError, "score_fn"),
        ({"alpha_grid": [0.1], "monitor": "m", "apply_at": "task_end"}, ValueError, "task_end"),
        ({"pretrained_ckpt": "x.pt", "apply_at": "task_end"}, ValueError, "pretrained_ckpt"),
        ({"pretrained_ckpt": "/nonexistent/theta0.ckpt"}, FileNotFoundError, "pretrained_ckpt"),
        ({"pretrained_ckpt": 3}, TypeError, "pretrained_ckpt"),
        ({"depth_map": [1, 2]}, ValueError, "depth_map"),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LiNeS(**kwargs)


def test_pickle_and_state_key() -> None:
    cb = LiNeS(alpha=0.3)
    assert pickle.loads(pickle.dumps(cb)).alpha == 0.3
    assert LiNeS(alpha=0.3).state_key != LiNeS(alpha=0.5).state_key


# ---------------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("head_policy", ["exclude", "alpha"])
def test_callback_equals_pure_function(tmp_path: Path, head_policy: str) -> None:
    model = BlockNet()
    theta0 = _params(model)
    cb = LiNeS(alpha=0.2, head_policy=head_policy)  # type: ignore[arg-type]
    _trainer(tmp_path, [cb]).fit(model, _loader())
    assert cb.unscaled_state_dict is not None
    expected = lines_scale(theta0, cb.unscaled_state_dict, alpha=0.2, head_policy=head_policy)  # type: ignore[arg-type]
    for name, p in model.named_parameters():
        assert torch.allclose(p, expected[name], atol=1e-7), name
    assert not torch.allclose(model.blocks[0].weight, cb.unscaled_state_dict["blocks.0.weight"])  # it did something
    assert cb.block_scales == pytest.approx([0.2, 0.6, 1.0])
    saved = torch.load(tmp_path / "unscaled_weights.pt", weights_only=True)
    assert all(torch.equal(saved[n], cb.unscaled_state_dict[n]) for n in saved)


def test_logs_block_scales(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    cb = LiNeS(alpha=0.4)
    logger = CSVLogger(str(tmp_path), name="run")
    _trainer(tmp_path, [cb], logger=logger).fit(BlockNet(), _loader())
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    for key in ("lines/alpha", "lines/beta", "lines/scale/block_0", "lines/scale/block_2"):
        assert key in text
    assert (Path(logger.log_dir) / "unscaled_weights.pt").is_file()


def test_pretrained_ckpt_with_prefix(tmp_path: Path) -> None:
    pretrained = BlockNet(seed=5)
    theta0 = _params(pretrained)
    # a state dict of the bare network (no LightningModule prefix) is accepted
    torch.save({n: p for n, p in theta0.items()}, tmp_path / "theta0.pt")
    model = BlockNet(seed=0)
    cb = LiNeS(alpha=0.0, beta=0.5, pretrained_ckpt=str(tmp_path / "theta0.pt"), save_unscaled=True)
    _trainer(tmp_path, [cb]).fit(model, _loader())
    expected = lines_scale(theta0, cb.unscaled_state_dict, alpha=0.0, beta=0.5)
    for name, p in model.named_parameters():
        assert torch.allclose(p, expected[name], atol=1e-7)
    assert cb.state_dict()["method"]["theta0"] is None  # the path is the reference, the checkpoint stays small


class _Wrapped(BlockNet):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.ModuleDict({"a": self.blocks[0]})
        del self.blocks
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner["a"](x)))


def test_unknown_depth_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layer_pattern") as err:
        _trainer(tmp_path, [LiNeS()]).fit(_Wrapped(), _loader())
    assert "inner.a.weight" in str(err.value)
    model = _Wrapped()
    _trainer(tmp_path, [LiNeS(depth_map={"inner.a.weight": 0, "inner.a.bias": 0})]).fit(model, _loader())


# ---------------------------------------------------------------------------------- sweep
def test_sweep_with_monitor_picks_best_alpha(tmp_path: Path) -> None:
    model = BlockNet()
    theta0 = _params(model)
    grid = [0.0, 0.5, 1.0]
    cb = LiNeS(alpha_grid=grid, monitor="val_loss", mode="min")
    val = _loader(seed=2, n=20)  # 20 samples in batches of 8: weighted by batch size
    _trainer(tmp_path, [cb], max_epochs=3).fit(model, _loader(), val)
    x = torch.cat([b[0] for b in val])
    y = torch.cat([b[1] for b in val])
    losses = {}
    probe = BlockNet()
    for a in grid:
        probe.load_state_dict(lines_scale(theta0, cb.unscaled_state_dict, alpha=a))
        with torch.no_grad():
            losses[a] = nn.functional.cross_entropy(probe(x), y).item()
    assert cb.sweep_scores == pytest.approx(losses, rel=1e-5)
    best = min(grid, key=lambda a: losses[a])
    assert cb.applied_alpha == best
    expected = lines_scale(theta0, cb.unscaled_state_dict, alpha=best)
    assert all(torch.allclose(p, expected[n], atol=1e-7) for n, p in model.named_parameters())


def _distance_to_start(module: pl.LightningModule) -> float:
    return float(module.blocks[0].weight.norm())


def test_sweep_with_score_fn(tmp_path: Path) -> None:
    cb = LiNeS(alpha_grid=[0.9, 0.1, 0.5], score_fn=_distance_to_start, mode="max", save_unscaled=False)
    _trainer(tmp_path, [cb]).fit(BlockNet(), _loader())
    assert set(cb.sweep_scores) == {0.9, 0.1, 0.5} and cb.applied_alpha in (0.9, 0.1, 0.5)
    assert cb.sweep_scores[cb.applied_alpha] == max(cb.sweep_scores.values())
    assert cb.unscaled_state_dict is None and not (tmp_path / "unscaled_weights.pt").exists()


# ---------------------------------------------------------------------------------- resume
def test_resume_keeps_theta0(tmp_path: Path) -> None:
    # uninterrupted: 2 epochs
    full = BlockNet(seed=0)
    theta0 = _params(full)
    cb_full = LiNeS(alpha=0.3)
    _trainer(tmp_path / "full", [cb_full], max_epochs=2).fit(full, _loader())

    # interrupted (a crash) after epoch 1 (the checkpoint holds the unscaled weights and θ0) ...
    ckpt_dir = tmp_path / "ckpt"
    first = BlockNet(seed=0)
    crashing = _trainer(tmp_path / "a", [CrashAtStep(3), LiNeS(alpha=0.3), ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1)],
                        max_epochs=2, enable_checkpointing=True)
    with pytest.raises(SimulatedCrash):
        crashing.fit(first, _loader())
    ckpt = next(ckpt_dir.glob("*.ckpt"))
    # ... and resumed into a differently initialised model: θ0 must come from the checkpoint
    resumed = BlockNet(seed=123)
    cb = LiNeS(alpha=0.3)
    _trainer(tmp_path / "b", [cb], max_epochs=2).fit(resumed, _loader(), ckpt_path=str(ckpt))
    assert all(torch.equal(cb.theta0[n], theta0[n]) for n in theta0)
    for name, p in resumed.named_parameters():
        assert torch.allclose(p, dict(full.named_parameters())[name], atol=1e-6)

    state = cb_full.state_dict()
    fresh = LiNeS(alpha=0.3)
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert "version" in state and all(torch.equal(fresh.theta0[n], theta0[n]) for n in theta0)


def test_task_end_one_fit_per_task(tmp_path: Path) -> None:
    model = BlockNet()
    cb = LiNeS(alpha=0.5, apply_at="task_end")
    for task in range(2):
        start = _params(model)
        _trainer(tmp_path, [cb]).fit(model, _loader(seed=10 + task))
        assert torch.equal(cb.theta0["blocks.0.weight"], start["blocks.0.weight"])
        expected = lines_scale(start, cb.unscaled_state_dict, alpha=0.5)
        assert all(torch.allclose(p, expected[n], atol=1e-7) for n, p in model.named_parameters())
    assert cb.task == 1 and (tmp_path / "unscaled_weights_task_1.pt").is_file()


class _TwoTasks:
    """A ContinualDataModule of two random tasks (built lazily to keep imports light)."""

    @staticmethod
    def make() -> Any:
        from lightning_forget.datamodules.base import ContinualDataModule

        class TwoTasks(ContinualDataModule):
            def train_dataset(self, task: int) -> TensorDataset:
                return _loader(seed=20 + task).dataset

            def val_dataset(self, task: int) -> TensorDataset:
                return _loader(seed=30 + task, n=8).dataset

        return TwoTasks(num_tasks=2, epochs_per_task=1, batch_size=8)


class _TaskEndRecorder(Callback):
    """Records the weights when each task starts (before LiNeS' snapshot would differ)."""

    def __init__(self) -> None:
        self.starts: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(_params(pl_module))


def test_task_end_in_one_continual_fit(tmp_path: Path) -> None:
    model = BlockNet()
    cb = LiNeS(alpha=0.25, apply_at="task_end")
    rec = _TaskEndRecorder()
    _trainer(tmp_path, [cb, rec], max_epochs=2, reload_dataloaders_every_n_epochs=1,
             num_sanity_val_steps=0).fit(model, datamodule=_TwoTasks.make())
    assert len(rec.starts) == 2 and cb._ended == 1
    # the last task was scaled relative to the weights at its start
    assert all(torch.equal(cb.theta0[n], rec.starts[1][n]) for n in rec.starts[1])
    expected = lines_scale(rec.starts[1], cb.unscaled_state_dict, alpha=0.25)
    assert all(torch.allclose(p, expected[n], atol=1e-7) for n, p in model.named_parameters())
    assert (tmp_path / "unscaled_weights_task_0.pt").is_file() and (tmp_path / "unscaled_weights_task_1.pt").is_file()


# ---------------------------------------------------------------------------------- DDP
class _Checksum(Callback):
    """After LiNeS (listed first) edits the weights, gather a checksum from every rank."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).double()
        checksum = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=flat.dtype)).sum()])
        gathered = trainer.strategy.all_gather(checksum)
        lines = [cb for cb in trainer.callbacks if isinstance(cb, LiNeS)][0]
        expected = lines_scale(lines.theta0, lines.unscaled_state_dict, alpha=0.2)
        matches = all(torch.allclose(p, expected[n], atol=1e-7) for n, p in pl_module.named_parameters())
        if trainer.is_global_zero:
            torch.save({"gathered": gathered.cpu(), "matches": matches}, self.path)


def test_ddp_two_processes_identical_weights(tmp_path: Path) -> None:
    path = str(tmp_path / "checksums.pt")
    trainer = _trainer(tmp_path, [LiNeS(alpha=0.2), _Checksum(path)], devices=2, strategy="ddp_spawn", max_epochs=2)
    trainer.fit(BlockNet(), _loader(n=32))
    result = torch.load(path, weights_only=True)
    gathered = result["gathered"]
    assert gathered.shape == (2, 2)
    assert torch.equal(gathered[0], gathered[1])
    assert result["matches"]


class _SweepChecksum(Callback):
    """After LiNeS' sweep: each rank's chosen α, scores and weight checksum, gathered on rank 0."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lines = [cb for cb in trainer.callbacks if isinstance(cb, LiNeS)][0]
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).double()
        row = torch.tensor([lines.applied_alpha, *lines.sweep_scores.values(), flat.sum()], dtype=torch.float64)
        gathered = trainer.strategy.all_gather(row)
        if trainer.is_global_zero:
            torch.save({"gathered": gathered.cpu(), "state": {k: v.cpu() for k, v in pl_module.state_dict().items()}}, self.path)


@pytest.mark.ddp
def test_ddp_spawn_sweep_and_saved_weights(tmp_path: Path) -> None:
    """The sweep runs under ddp_spawn (trainer.validate could not), ranks agree, files are written."""
    path = str(tmp_path / "sweep.pt")
    ckpt_dir = tmp_path / "ckpt"
    lines = LiNeS(alpha_grid=[0.0, 0.5, 1.0], monitor="val_loss", mode="min", save_plot=False)
    trainer = _trainer(tmp_path, [lines, _SweepChecksum(path), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
                       devices=2, strategy="ddp_spawn", max_epochs=2, enable_checkpointing=True)
    trainer.fit(BlockNet(), _loader(n=32), _loader(seed=2, n=32))
    result = torch.load(path, weights_only=True)
    gathered = result["gathered"]
    assert gathered.shape == (2, 5) and torch.equal(gathered[0], gathered[1])
    scaled = torch.load(tmp_path / "lines_scaled_weights.pt", weights_only=True)
    assert _state_equal(scaled, result["state"])
    assert _state_equal(torch.load(ckpt_dir / "last.ckpt", weights_only=False)["state_dict"], result["state"])


# ---------------------------------------------------------------------------------- benchmark
def test_benchmark_quick(capsys: pytest.CaptureFixture[str]) -> None:
    results = load_benchmark("lines").main(["--quick"])
    out = capsys.readouterr().out
    assert "LiNeS" in out and "TIES" in out
    assert results["single"] and results["merge"]


def test_configurable_from_yaml_style_config() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callback", type=LiNeS)
    config = parser.parse_args([
        "--callback",
        '{"class_path": "lightning_forget.callbacks.lines.LiNeS", "init_args": {"alpha": 0.2, "head_policy": "alpha",'
        ' "alpha_grid": [0.1, 0.5], "monitor": "val/acc", "layer_pattern": "(?:^|\\\\.)unit(\\\\d+)\\\\."}}',
    ])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    callback = instantiate(config).callback
    assert isinstance(callback, LiNeS) and callback.alpha_grid == [0.1, 0.5] and callback.head_policy == "alpha"
    assert callback.layer_pattern == r"(?:^|\.)unit(\d+)\."


def test_sweep_scores_epoch_level_metrics_and_keeps_the_accuracy_matrix(tmp_path) -> None:
    """ContinualClassifier logs val/acc_avg in on_validation_epoch_end; the sweep must see it,
    and must not wipe the module's accumulated AccuracyMatrix."""
    from lightning_forget.callbacks import LiNeS as _LiNeS
    from tests.helpers.data import BlobStream
    from tests.helpers.harness import quiet_trainer, tiny_classifier

    dm = BlobStream(num_tasks=2, epochs_per_task=2)
    model = tiny_classifier(dm)
    lines = _LiNeS(alpha_grid=[0.0, 0.5, 1.0], monitor="val/acc_avg", save_unscaled=False)
    seen = {}

    class Snapshot(pl.Callback):
        def __init__(self, when: str) -> None:
            self.when = when

        def on_train_batch_end(self, trainer, pl_module, *args):  # the sweep runs after the fit's last batch
            seen[self.when] = pl_module.val_matrix.compute().clone()

    quiet_trainer(tmp_path, [Snapshot("before"), lines, Snapshot("after")], max_epochs=dm.max_epochs).fit(model, dm)
    assert lines.applied_alpha in (0.0, 0.5, 1.0) and len(lines.sweep_scores) == 3
    assert torch.equal(seen["after"].nan_to_num(-1), seen["before"].nan_to_num(-1))


@pytest.mark.parametrize("sanity", [2, 0])
def test_sweep_report_rows_and_checkpoint_measure_the_scaled_model(tmp_path: Path, sanity: int) -> None:
    """The last row of the accuracy matrix (and the metrics logged at the last validation) is what
    the model the run leaves behind validates at; so is its last checkpoint. Without a sanity check
    the validation loaders do not exist yet after the last batch: the sweep builds them."""
    from lightning_forget.callbacks import ContinualMetrics
    from lightning_forget.callbacks import LiNeS as _LiNeS
    from tests.helpers.data import BlobStream
    from tests.helpers.harness import tiny_classifier

    dm = BlobStream(num_tasks=2, epochs_per_task=2)
    model = tiny_classifier(dm)
    lines = _LiNeS(alpha_grid=[0.0, 0.2], monitor="val/acc_avg", save_unscaled=False, save_plot=False)
    metrics = ContinualMetrics(report=False)
    trainer = quiet_trainer(tmp_path, [lines, metrics], max_epochs=dm.max_epochs, enable_checkpointing=True,
                            num_sanity_val_steps=sanity)
    trainer.fit(model, dm)
    assert lines.applied_alpha in (0.0, 0.2)  # either scales the early blocks toward θ_0
    last_row = metrics.matrix[-1].clone()
    after = quiet_trainer(tmp_path / "v", [ContinualMetrics(report=False)]).validate(model, dm)[0]
    for task in range(2):
        assert last_row[task].item() == pytest.approx(after[f"val/acc/task_{task}"])
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------- outputs (issue 9.9)
def _state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n].cpu(), b[n].cpu()) for n in a)


def test_scaled_weights_file_and_last_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = BlockNet()
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=-1)
    cb = LiNeS(alpha=0.2)
    _trainer(tmp_path, [cb, checkpoint], max_epochs=2, enable_checkpointing=True).fit(model, _loader(), _loader(2))
    scaled = model.state_dict()
    assert not torch.equal(scaled["blocks.0.weight"], cb.unscaled_state_dict["blocks.0.weight"])

    # the file exists, loads with the safe unpickler, and rebuilds the in-memory scaled model
    path = tmp_path / "lines_scaled_weights.pt"
    assert path.is_file() and cb.output_paths["scaled"] == str(path)
    rebuilt = BlockNet(seed=99)
    rebuilt.load_state_dict(torch.load(path, weights_only=True))
    assert _state_equal(rebuilt.state_dict(), scaled)
    out = capsys.readouterr().out
    assert "LiNeS: results written to" in out and "lines_scaled_weights.pt" in out and "unscaled_weights.pt" in out

    # The scaling runs after the fit's last batch, before its last validation and checkpoint: the
    # last epoch's checkpoint and last.ckpt hold the scaled weights (the model the fit leaves);
    # the earlier epoch's checkpoint is the unscaled training state.
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert _state_equal(last["state_dict"], scaled)
    epoch_ckpt = torch.load(next(ckpt_dir.glob("epoch=1*.ckpt")), weights_only=False)
    assert _state_equal(epoch_ckpt["state_dict"], scaled)
    first_epoch = torch.load(next(ckpt_dir.glob("epoch=0*.ckpt")), weights_only=False)
    assert not _state_equal(first_epoch["state_dict"], scaled)

    # resuming the finished run from last.ckpt trains nothing and does not scale a second time
    resumed = BlockNet(seed=7)
    again = LiNeS(alpha=0.2)
    _trainer(tmp_path / "again", [again, ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True)], max_epochs=2,
             enable_checkpointing=True).fit(resumed, _loader(), _loader(2), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert _state_equal(resumed.state_dict(), scaled)


def test_last_checkpoint_link_is_replaced_not_written_through(tmp_path: Path) -> None:
    model = BlockNet()
    ckpt_dir = tmp_path / "ckpt"
    cb = LiNeS(alpha=0.0, save_plot=False)
    _trainer(tmp_path, [cb, ModelCheckpoint(dirpath=ckpt_dir, save_last="link")], max_epochs=1,
             enable_checkpointing=True).fit(model, _loader(), _loader(2))
    last = ckpt_dir / "last.ckpt"
    assert last.is_file() and not last.is_symlink()
    assert _state_equal(torch.load(last, weights_only=False)["state_dict"], model.state_dict())
    target = torch.load(next(ckpt_dir.glob("epoch=*.ckpt")), weights_only=False)["state_dict"]
    assert _state_equal(target, model.state_dict())  # scaled before the epoch's checkpoint


def test_last_checkpoint_written_by_model_checkpoint_after_lines(tmp_path: Path) -> None:
    # no validation, checkpoints every 5 epochs: ModelCheckpoint writes last.ckpt in its own
    # on_train_end, which runs after LiNeS' edit
    model = BlockNet()
    ckpt_dir = tmp_path / "ckpt"
    _trainer(tmp_path, [LiNeS(alpha=0.3, save_plot=False), ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=5)],
             max_epochs=1, enable_checkpointing=True).fit(model, _loader())
    assert _state_equal(torch.load(ckpt_dir / "last.ckpt", weights_only=False)["state_dict"], model.state_dict())


def test_task_end_saves_scaled_weights_and_last_checkpoint(tmp_path: Path) -> None:
    model = BlockNet()
    ckpt_dir = tmp_path / "ckpt"
    cb = LiNeS(alpha=0.25, apply_at="task_end", save_plot=False)
    _trainer(tmp_path, [cb, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], max_epochs=2,
             reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, enable_checkpointing=True,
             ).fit(model, datamodule=_TwoTasks.make())
    for task in (0, 1):
        assert (tmp_path / f"lines_scaled_weights_task_{task}.pt").is_file()
    assert _state_equal(torch.load(tmp_path / "lines_scaled_weights_task_1.pt", weights_only=True), model.state_dict())
    assert _state_equal(torch.load(ckpt_dir / "last.ckpt", weights_only=False)["state_dict"], model.state_dict())


def test_results_go_to_the_logger_directory(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="run")
    _trainer(tmp_path, [LiNeS(alpha_grid=[0.0, 1.0], monitor="val_loss", mode="min")], logger=logger).fit(
        BlockNet(), _loader(), _loader(2)
    )
    for name in ("lines_scaled_weights.pt", "unscaled_weights.pt", "lines_scales.png"):
        assert (Path(logger.log_dir) / name).is_file(), name
    assert not (tmp_path / "lines_scaled_weights.pt").exists()


def test_scales_figure_is_a_figure_with_the_sweep() -> None:
    from matplotlib.figure import Figure

    from lightning_forget.callbacks.lines import scales_figure

    figure = scales_figure([0.2, 0.6, 1.0], alpha=0.2, beta=0.8)
    assert isinstance(figure, Figure) and len(figure.axes) == 1
    assert list(figure.axes[0].lines[0].get_ydata()) == pytest.approx([0.2, 0.6, 1.0])
    swept = scales_figure([0.5, 1.0], alpha=0.5, beta=0.5, sweep_scores={0.0: 1.0, 0.5: 2.0, 1.0: 1.5}, score_name="val_acc")
    assert len(swept.axes) == 2 and swept.axes[1].get_ylabel() == "val_acc"


def test_save_plot_false_writes_no_png(tmp_path: Path) -> None:
    _trainer(tmp_path, [LiNeS(alpha=0.3, save_plot=False)]).fit(BlockNet(), _loader())
    assert (tmp_path / "lines_scaled_weights.pt").is_file() and not (tmp_path / "lines_scales.png").exists()
    with pytest.raises(TypeError, match="save_plot"):
        LiNeS(save_plot=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- depth (issue 9.9)
class _SparseEncoder(BlockNet):
    """Blocks named encoder.1 and encoder.3 only (encoder.0/2 are parameter-free)."""

    def __init__(self) -> None:
        super().__init__()
        del self.blocks
        self.encoder = nn.Sequential(nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def test_layer_pattern_counts_distinct_depths(tmp_path: Path) -> None:
    # encoder.1 and encoder.3 are the first and the last of 2 blocks, not blocks 1 and 3 of 4
    model = _SparseEncoder()
    theta0 = _params(model)
    cb = LiNeS(alpha=0.2, layer_pattern=r"(?:^|\.)encoder\.(\d+)\.")
    _trainer(tmp_path, [cb]).fit(model, _loader())
    assert cb.block_scales == pytest.approx([0.2, 1.0])
    ft = cb.unscaled_state_dict
    assert torch.allclose(model.encoder[3].weight, ft["encoder.3.weight"], atol=1e-7)  # last block: λ = 1
    expected_first = theta0["encoder.1.weight"] + 0.2 * (ft["encoder.1.weight"] - theta0["encoder.1.weight"])
    assert torch.allclose(model.encoder[1].weight, expected_first, atol=1e-7)


# ---------------------------------------------------------------------------------- sweep (issue 10.4)
class _Recorder(Callback):
    """Counts validation hooks seen by callbacks."""

    def __init__(self) -> None:
        self.validation_epochs = 0
        self.validation_starts = 0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validation_starts += 1

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validation_epochs += 1


class _MetricsAtTrainEnd(Callback):
    """Listed before LiNeS: what the Trainer holds before the sweep."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.callback_metrics = {k: v.clone() for k, v in trainer.callback_metrics.items()}
        self.state = (trainer.state.fn, trainer.state.status, trainer.state.stage)


def test_sweep_fires_no_callback_and_logs_nothing_to_the_loggers(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    recorder, before, after = _Recorder(), _MetricsAtTrainEnd(), _MetricsAtTrainEnd()
    logger = CSVLogger(str(tmp_path), name="run")
    cb = LiNeS(alpha_grid=[0.0, 0.5, 1.0], monitor="val_loss", mode="min")
    trainer = _trainer(tmp_path, [before, cb, after, recorder], logger=logger, max_epochs=2)
    trainer.fit(BlockNet(), _loader(), _loader(2))
    # sanity check + 2 epochs, none from the 3 swept values
    assert recorder.validation_starts == 3 and recorder.validation_epochs == 3
    assert {k: float(v) for k, v in after.callback_metrics.items()} == pytest.approx(
        {k: float(v) for k, v in before.callback_metrics.items()}
    )
    assert after.state == before.state  # the sweep leaves the Trainer's state as it found it
    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    val_rows = [r for r in rows[1:] if r.split(",")[header.index("val_loss")] != ""]
    assert len(val_rows) == 2  # one per epoch


def test_validation_score_is_public_and_matches_the_sweep(tmp_path: Path) -> None:
    from lightning_forget.callbacks.lines import validation_score

    seen: dict[str, float] = {}

    class Probe(Callback):  # after LiNeS: the model holds the chosen α's weights
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen["score"] = validation_score(pl_module, "val_loss")
            seen["explicit"] = validation_score(pl_module, "val_loss", dataloaders=[_loader(2)])
            with pytest.raises(RuntimeError, match="never logged.*val_loss"):
                validation_score(pl_module, "val_acc")

    cb = LiNeS(alpha_grid=[0.0, 1.0], monitor="val_loss", mode="min", save_plot=False)
    _trainer(tmp_path, [cb, Probe()]).fit(BlockNet(), _loader(), _loader(2))
    assert seen["score"] == pytest.approx(cb.sweep_scores[cb.applied_alpha], rel=1e-6)
    # a list of one loader is a single loader: no dataloader_idx suffix
    assert seen["explicit"] == pytest.approx(seen["score"], rel=1e-6)


def test_scales_figure_reaches_the_loggers_that_take_images(tmp_path: Path) -> None:
    from tests.helpers.loggers import RecordingTensorBoard

    board = RecordingTensorBoard(str(tmp_path))
    _trainer(tmp_path, [LiNeS(alpha=0.3)], logger=board).fit(BlockNet(), _loader())
    tags = [call[0] for call in board.writer.calls]
    assert tags == ["lines/scales"], tags
    assert (tmp_path / "lines_scales.png").is_file()  # the PNG is still the record on disk
