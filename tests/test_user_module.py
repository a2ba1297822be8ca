"""Callbacks that run the model themselves, on a user's module written without a ``forward``.

The README's example module has no ``forward``: its ``training_step`` calls ``self.net(x)``. Every
callback that runs the model (DER++, RefreshLearning, KFPF/FPF, GSLoRA, ForgetRetainEvaluation,
ContinualEvaluation, AdaB2N's layer hooks) either works with it through ``forward_fn="net"``
(the one shared :class:`~lightning_forget.forward.ModelForward`) or is refused in ``setup`` with
an error naming ``forward_fn``. With ``forward_fn="net"`` a run is bit-for-bit the run of the same
module with a ``forward`` that calls ``self.net``. AdaB2N needs no argument: its hooks sit on the
converted layers.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_forget.callbacks import (
    FPF,
    KFPF,
    AdaB2N,
    ContinualEvaluation,
    DarkExperienceReplay,
    ForgetRetainEvaluation,
    GSLoRA,
    ILoRA,
    RefreshLearning,
)
from lightning_forget.callbacks.gs_lora import lora_layers
from lightning_forget.datamodules import ForgetRetainDataModule
from lightning_forget.export import export_plain_checkpoint, export_plain_state_dict
from lightning_forget.forward import ModelForward
from lightning_forget.nn import adab2n_layers
from tests.helpers.data import BlobStream
from tests.helpers.harness import params_vector, quiet_trainer
from tests.helpers.models import TinyConvNet


class UserModule(pl.LightningModule):
    """As in the README: no ``forward``; ``training_step`` calls ``self.net(x)``."""

    def __init__(self, classes: int = 6, conv: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        if conv:
            body = TinyConvNet(8)
            self.net = nn.Sequential(body, nn.Linear(body.out_features, classes))
        else:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.logits(x), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("val_acc", (self.logits(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


class WithForward(UserModule):
    """The same module with a ``forward``: the reference run (``forward_fn=None``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def _stream_callbacks(forward_fn: Optional[str]) -> list[Any]:
    return [
        AdaB2N(kappa=0.5, lambd=0.1, num_tasks=3),  # 3: FPF fine-tunes after the last task end
        RefreshLearning(delta=1e-2, fisher_samples=16, forward_fn=forward_fn),
        DarkExperienceReplay(buffer_size=16, replay_batch_size=4, forward_fn=forward_fn),
        KFPF(k=2, finetune_steps=2, buffer_size=16, kd=True, forward_fn=forward_fn),
        FPF(finetune_steps=2, buffer_size=16, forward_fn=forward_fn),
        ContinualEvaluation(every_n_steps=4, save_csv=False, save_plot=False, forward_fn=forward_fn),
    ]


def _task_loaders(dm: BlobStream, task: int) -> tuple[DataLoader, DataLoader]:
    return DataLoader(dm.train_dataset(task), batch_size=8, shuffle=False), DataLoader(dm.val_dataset(task), batch_size=16)


def _fit_per_task(tmp_path: Path, model: pl.LightningModule, callbacks: list[Any]) -> pl.LightningModule:
    """Two tasks, one fit each, plain DataLoaders (as README mode 2)."""
    pl.seed_everything(0)
    dm = BlobStream(num_tasks=2, dim=8, samples_per_class=8)
    for task in range(2):
        train, val = _task_loaders(dm, task)
        quiet_trainer(tmp_path, callbacks, max_epochs=1, reload_dataloaders_every_n_epochs=0).fit(model, train, val)
    return model


@pytest.fixture(scope="module")
def stream_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[pl.LightningModule, list[Any]]]:
    runs = {}
    for name, cls, forward_fn in (("user", UserModule, "net"), ("reference", WithForward, None)):
        callbacks = _stream_callbacks(forward_fn)
        model = _fit_per_task(tmp_path_factory.mktemp(name), cls(conv=True), callbacks)
        runs[name] = (model, callbacks)
    return runs


def test_forward_calling_callbacks_run_a_module_without_forward_as_one_with_it(stream_runs) -> None:
    user, user_cbs = stream_runs["user"]
    ref, ref_cbs = stream_runs["reference"]
    assert torch.equal(params_vector(user), params_vector(ref))
    refresh_u, refresh_r = user_cbs[1], ref_cbs[1]
    assert refresh_u.fisher_estimates == 2 and set(refresh_u.fisher) == {n for n, p in user.named_parameters()}
    assert all(torch.equal(refresh_u.fisher[n], refresh_r.fisher[n]) for n in refresh_r.fisher)
    assert any(float(v.abs().sum()) > 0 for v in refresh_u.fisher.values())
    derpp_u, derpp_r = user_cbs[2].buffer.state_dict(), ref_cbs[2].buffer.state_dict()
    assert torch.equal(derpp_u["storage"]["logits"], derpp_r["storage"]["logits"])
    assert user_cbs[3].finetunes == ref_cbs[3].finetunes > 0 and user_cbs[4].finetunes == 2
    assert user_cbs[5].curves.num_evals == ref_cbs[5].curves.num_evals > 0
    assert torch.allclose(user_cbs[5].curves.acc, ref_cbs[5].curves.acc, rtol=0, atol=0, equal_nan=True)


def test_adab2n_trains_its_task_weights_when_training_step_calls_a_submodule(stream_runs) -> None:
    # Before: hooks on the LightningModule's forward, which `self.net(x)` never runs: no task ids,
    # no statistics loss, task weights left at 0.
    user, _ = stream_runs["user"]
    ref, _ = stream_runs["reference"]
    layers, ref_layers = adab2n_layers(user), adab2n_layers(ref)
    assert len(layers) == 1 and int(layers[0].cur_task) == 2
    assert layers[0]._task_ids is not None  # the last training forward got its rows' tasks
    assert torch.equal(layers[0].task_weight, ref_layers[0].task_weight)
    assert bool((layers[0].task_weight[:2].abs() > 1e-3).any())  # trained, not only refresh's 1e-3 noise


# ---------------------------------------------------------------------- refused without forward_fn
_NEEDS_FORWARD = {
    "DarkExperienceReplay": lambda: DarkExperienceReplay(buffer_size=8),
    "RefreshLearning": lambda: RefreshLearning(),
    "KFPF": lambda: KFPF(k=2),
    "FPF": lambda: FPF(),
    "ContinualEvaluation": lambda: ContinualEvaluation(save_csv=False, save_plot=False),
}


@pytest.mark.parametrize("name", sorted(_NEEDS_FORWARD))
def test_a_module_without_forward_is_refused_in_setup_naming_forward_fn(tmp_path: Path, name: str) -> None:
    dm = BlobStream(num_tasks=1, dim=8, samples_per_class=8)
    train, val = _task_loaders(dm, 0)
    callback = _NEEDS_FORWARD[name]()
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=1, reload_dataloaders_every_n_epochs=0)
    with pytest.raises(RuntimeError, match=r"forward_fn=.*'net'") as info:
        trainer.fit(UserModule(), train, val)
    assert trainer.global_step == 0 and "UserModule" in str(info.value)


def test_forward_fn_names_a_method_or_a_submodule_and_is_checked() -> None:
    model = UserModule()
    x = torch.randn(3, 64)
    expected = model.net(x)
    assert torch.equal(ModelForward("net")(model, x), expected)
    assert torch.equal(ModelForward("logits")(model, x), expected)
    assert torch.equal(ModelForward("net.1")(model, x), model.net[1](x))
    with pytest.raises(RuntimeError, match="`forward_fn`='nett' names neither"):
        ModelForward("nett").check(model)
    with pytest.raises(RuntimeError, match="forward hook"):
        ModelForward("logits").hook_module(model)
    with pytest.raises(TypeError, match="forward_fn"):
        ModelForward(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="forward_fn"):
        DarkExperienceReplay(forward_fn=["net"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------- forgetting stream
def _forget_data() -> ForgetRetainDataModule:
    return ForgetRetainDataModule(builtin="digits", forget_classes=[[8, 9]], data_ratio=0.1, batch_size=32,
                                  epochs_per_task=1)


@pytest.fixture(scope="module")
def forget_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    runs = {}
    dm = _forget_data()
    for name, cls, forward_fn in (("user", UserModule, "net"), ("reference", WithForward, None)):
        model = cls(classes=10)
        gs = GSLoRA(target_modules=["net.1", "net.3"], bound=5.0, alpha=1e-3, forward_fn=forward_fn, prototype=True,
                    prototype_retain_weight=0.1)
        evaluation = ForgetRetainEvaluation(report=False, forward_fn=forward_fn)
        pl.seed_everything(0)
        quiet_trainer(tmp_path_factory.mktemp(name), [gs, evaluation], max_epochs=dm.max_epochs, limit_train_batches=3,
                      limit_val_batches=1).fit(model, dm)
        runs[name] = (model, gs, evaluation)
    return runs


def test_gslora_and_forget_retain_evaluation_run_a_module_without_forward(forget_runs) -> None:
    user, gs_u, eval_u = forget_runs["user"]
    ref, gs_r, eval_r = forget_runs["reference"]
    assert len(eval_u.rows) == 1 and gs_u.deltas and gs_u.prototypes
    assert torch.equal(params_vector(user), params_vector(ref))
    assert [list(r) for r in eval_u.rows] == [list(r) for r in eval_r.rows]
    assert torch.allclose(torch.tensor([list(r.values()) for r in eval_u.rows]),
                          torch.tensor([list(r.values()) for r in eval_r.rows]), rtol=0, atol=0, equal_nan=True)
    assert all(torch.equal(gs_u.prototypes[c], gs_r.prototypes[c]) for c in gs_r.prototypes)


@pytest.mark.parametrize("which", ["GSLoRA", "ForgetRetainEvaluation"])
def test_gslora_and_forget_retain_evaluation_refuse_a_module_without_forward(tmp_path: Path, which: str) -> None:
    callback = GSLoRA(target_modules=["net.1", "net.3"]) if which == "GSLoRA" else ForgetRetainEvaluation(report=False)
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=1)
    with pytest.raises(RuntimeError, match=r"forward_fn=.*'net'"):
        trainer.fit(UserModule(classes=10), _forget_data())
    assert trainer.global_step == 0


# ---------------------------------------------------------------------- a plain model back (export)
def _eval_logits(model: pl.LightningModule, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.net(x)


def test_export_after_adab2n_loads_into_a_fresh_user_module(stream_runs, tmp_path: Path) -> None:
    trained, _ = stream_runs["user"]
    with pytest.raises(RuntimeError, match="task_weight"):  # what users hit without the export
        UserModule(conv=True).load_state_dict(trained.state_dict())
    fresh = UserModule(conv=True)
    fresh.load_state_dict(export_plain_state_dict(trained))  # strict
    assert type(fresh.net[0].bn) is nn.BatchNorm2d
    x = torch.randn(5, 8)
    assert torch.allclose(_eval_logits(fresh, x), _eval_logits(trained, x), atol=1e-6)
    path = export_plain_checkpoint(trained, tmp_path / "plain.ckpt")
    loaded = UserModule.load_from_checkpoint(path, conv=True)
    assert torch.allclose(_eval_logits(loaded, x), _eval_logits(trained, x), atol=1e-6)
    with pytest.raises(FileExistsError, match="output_path"):
        export_plain_checkpoint(trained, path)
    # a checkpoint file of the trained layout, converted
    saved = tmp_path / "run.ckpt"
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": {"conv": True}}, saved)
    converted = export_plain_checkpoint(trained, tmp_path / "converted.ckpt", checkpoint_path=saved)
    assert torch.allclose(_eval_logits(UserModule.load_from_checkpoint(converted), x), _eval_logits(trained, x), atol=1e-6)
    with pytest.raises(RuntimeError, match="checkpoint_path"):
        export_plain_checkpoint(UserModule(conv=True), tmp_path / "wrong.ckpt", checkpoint_path=saved)


def test_export_after_gslora_loads_into_a_fresh_user_module(forget_runs) -> None:
    trained, gs, _ = forget_runs["user"]
    with pytest.raises(RuntimeError, match="base_layer"):
        UserModule(classes=10).load_state_dict(trained.state_dict())
    # a LoRA still holding an update (as mid-task): the export merges it
    with torch.no_grad():
        for layer in lora_layers(trained).values():
            layer.lora_B["default"].weight.normal_(0, 0.1)
    fresh = UserModule(classes=10)
    fresh.load_state_dict(export_plain_state_dict(trained))
    x = torch.randn(5, 64)
    assert torch.allclose(_eval_logits(fresh, x), _eval_logits(trained, x), atol=1e-5)
    gs.reset_lora(trained, 0)


class UserLM(pl.LightningModule):
    """A user's causal LM: a transformers model at ``self.model``, dict token batches, no forward."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        self.ids = torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.ids[i]}


def test_export_after_ilora_loads_into_a_fresh_user_module(tmp_path: Path) -> None:
    model = UserLM()
    ilora = ILoRA(lora={"r": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ["c_attn"]}, buffer_size=8,
                  save_adapters=False)
    quiet_trainer(tmp_path, [ilora], max_epochs=1, reload_dataloaders_every_n_epochs=0, limit_train_batches=2).fit(
        model, DataLoader(_Tokens(8), batch_size=4))
    ids = _Tokens(2).ids
    model.eval()
    with torch.no_grad():
        expected = model.model(input_ids=ids).logits  # the slow learner, swapped in at fit end
    with pytest.raises(RuntimeError, match="Missing key"):
        UserLM().load_state_dict(model.state_dict())
    fresh = UserLM()
    fresh.load_state_dict(export_plain_state_dict(model))
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh.model(input_ids=ids).logits, expected, atol=1e-5)
        assert not torch.allclose(UserLM().model(input_ids=ids).logits, expected, atol=1e-4)  # it did train
