"""Unlearning baselines: losses against hand computations, the shared mechanism, safety rails, metrics."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_forget.callbacks import SCRUB, FineTune, GradDiff, GradientAscent, L1Sparse, RandomLabels, SalUn
from lightning_forget.callbacks.unlearning import UnlearningMethod
from lightning_forget.distributed import rank_generator
from lightning_forget.metrics.unlearning import avg_gap, mia_efficacy, mia_efficacy_svc
from lightning_forget.unlearning import (
    ReferenceModel, SaliencyMask, cross_entropy, distill_kl, gradient_ascent_loss, graddiff_loss, kl_to_reference,
    l1_alpha, random_labels, scrub_max_loss, scrub_min_loss,
)
from tests.helpers.harness import quiet_trainer

W0 = torch.tensor([[1.0, -0.5], [0.2, 0.3], [-0.4, 0.8]])
XF, YF = torch.tensor([[1.0, 2.0]]), torch.tensor([0])
XR, YR = torch.tensor([[-1.0, 0.5]]), torch.tensor([2])


class UserNet(pl.LightningModule):
    """A user's own module: no library base class, `training_step` calls a submodule, no `forward`."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.net.weight.copy_(W0)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class TwoStreams(Dataset):
    def __init__(self, n: int = 1) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"forget": (XF[0], YF[0]), "retain": (XR[0], YR[0])}


class ForgetData(pl.LightningDataModule):
    """Two-stream batches of one sample each, and the forget set SalUn's mask is computed on."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TwoStreams(), batch_size=1)

    def forget_train_dataset(self, task: int) -> Dataset:
        return torch.utils.data.TensorDataset(XF, YF)


def one_step(tmp_path: Any, callback: Any, steps: int = 1, **model_kwargs: Any) -> UserNet:
    model = UserNet(**model_kwargs)
    trainer = quiet_trainer(tmp_path, [callback], max_steps=steps, max_epochs=steps, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=ForgetData())
    return model


# ---------------------------------------------------------------------- by hand
def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _ce_grad(w: torch.Tensor, x: torch.Tensor, y: int) -> torch.Tensor:
    """∂CE/∂W = (softmax(Wx) − e_y) xᵀ, written out."""
    z = [sum(float(w[i, j]) * float(x[j]) for j in range(2)) for i in range(3)]
    p = _softmax(z)
    return torch.tensor([[(p[i] - (1.0 if i == y else 0.0)) * float(x[j]) for j in range(2)] for i in range(3)])


def test_pure_losses_against_hand_values() -> None:
    logits = torch.tensor([[1.0, 0.0]])
    ce = math.log(1 + math.exp(-1))  # CE of class 0 for logits (1, 0)
    assert cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(ce)
    assert gradient_ascent_loss(logits, torch.tensor([0])).item() == pytest.approx(-ce)
    assert gradient_ascent_loss(logits, torch.tensor([0]), bound=1.0).item() == pytest.approx(1 - ce)
    assert graddiff_loss(logits, torch.tensor([0]), torch.tensor(2.0), gamma=0.5, alpha=3.0).item() == pytest.approx(-0.5 * ce + 6)
    # KL(p_ref ‖ p) batchmean, by hand: p = softmax(1, 0), p_ref = (½, ½)
    p1 = 1 / (1 + math.exp(-1))
    kl = 0.5 * math.log(0.5 / p1) + 0.5 * math.log(0.5 / (1 - p1))
    assert kl_to_reference(logits, torch.zeros(1, 2)).item() == pytest.approx(kl)
    # DistillKL with T = 2: T² · KL(softmax(t/2) ‖ softmax(s/2)) / batch
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    ps, pt = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))  # softmax(s/2)[0], softmax(t/2)[0]
    dk = 4 * (pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps)))
    assert distill_kl(s, t, 2.0).item() == pytest.approx(dk)
    assert scrub_max_loss(s, t, 2.0).item() == pytest.approx(-dk)
    ce_s = math.log(1 + math.exp(-2))
    assert scrub_min_loss(s, t, torch.tensor([0]), 2.0, gamma=0.5, alpha=0.25).item() == pytest.approx(0.5 * ce_s + 0.25 * dk)
    assert l1_alpha(1.0, 0, 10) == 1.0 and l1_alpha(1.0, 5, 10) == 0.5 and l1_alpha(1.0, 8, 10, no_l1_epochs=2) == 0.0


def test_token_level_losses_ignore_masked_positions() -> None:
    # (B=1, L=3, V=2) with the middle position ignored: the mean over the two that count.
    logits = torch.tensor([[[1.0, 0.0], [5.0, -5.0], [0.0, 1.0]]])
    labels = torch.tensor([[0, -100, 0]])
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert cross_entropy(logits, labels).item() == pytest.approx(expected)
    assert gradient_ascent_loss(logits, labels).item() == pytest.approx(-expected)
    assert kl_to_reference(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    drawn = random_labels(labels, 2, torch.Generator().manual_seed(0), exclude_true=True)
    assert drawn.tolist() == [[1, -100, 1]]  # the other class; ignored stays ignored
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(logits, torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "name, make, expected_grad",
    [
        ("GradientAscent", lambda: GradientAscent(save_original=False), lambda: -_ce_grad(W0, XF[0], 0)),
        ("GradientAscent-retain", lambda: GradientAscent(retain_weight=0.5, save_original=False),
         lambda: -_ce_grad(W0, XF[0], 0) + 0.5 * _ce_grad(W0, XR[0], 2)),
        ("GradDiff", lambda: GradDiff(gamma=2.0, alpha=0.5, save_original=False),
         lambda: -2.0 * _ce_grad(W0, XF[0], 0) + 0.5 * _ce_grad(W0, XR[0], 2)),
        # the reference is the model at the start: KL(p_ref ‖ p_θ) has zero gradient at the first step
        ("GradDiff-kl", lambda: GradDiff(retain_loss="kl", save_original=False), lambda: -_ce_grad(W0, XF[0], 0)),
        ("RandomLabels", lambda: RandomLabels(seed=5, save_original=False),
         lambda: _ce_grad(W0, XF[0], int(torch.randint(0, 3, (1,), generator=rank_generator(5, 0, 0)))) + _ce_grad(W0, XR[0], 2)),
        ("L1Sparse", lambda: L1Sparse(alpha=0.1, save_original=False), lambda: _ce_grad(W0, XR[0], 2) + 0.1 * torch.sign(W0)),
        ("SCRUB", lambda: SCRUB(save_original=False), lambda: 0.99 * _ce_grad(W0, XR[0], 2)),
        ("FineTune", lambda: FineTune(save_original=False), lambda: _ce_grad(W0, XR[0], 2)),
    ],
)
def test_one_step_of_each_method_matches_the_hand_gradient(name: str, make: Any, expected_grad: Any, tmp_path: Any) -> None:
    model = one_step(tmp_path, make())  # SGD, lr 1: W1 = W0 − ∇
    assert torch.allclose(model.net.weight.detach(), W0 - expected_grad(), atol=1e-5), name


def test_scrub_max_step_raises_and_min_step_lowers_the_kl() -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    student = nn.Linear(4, 3)
    with torch.no_grad():
        student.weight.copy_(teacher.weight + 0.1 * torch.randn_like(teacher.weight))
        student.bias.copy_(teacher.bias)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def kl() -> float:
        with torch.no_grad():
            return float(distill_kl(student(x), teacher(x), 4.0))

    before = kl()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    scrub_max_loss(student(x), teacher(x).detach(), 4.0).backward()
    optimizer.step()
    after_max = kl()
    assert after_max > before
    optimizer.zero_grad()
    scrub_min_loss(student(x), teacher(x).detach(), y, 4.0, gamma=0.0, alpha=1.0).backward()
    optimizer.step()
    assert kl() < after_max


def test_salun_mask_restricts_updates_restores_weights_and_zeroes_optimizer_state(tmp_path: Any) -> None:
    callback = SalUn(mask_fraction=0.5, save_original=False)
    model = one_step(tmp_path, callback, steps=3, lr=0.3, momentum=0.9, weight_decay=0.1)
    # the mask: the 3 largest |∂CE_f/∂W| of the 6 weights, computed by hand
    g = _ce_grad(W0, XF[0], 0).abs().flatten()
    keep = torch.zeros(6, dtype=torch.bool)
    keep[torch.topk(g, 3).indices] = True
    keep = keep.view(3, 2)
    mask = callback.mask
    assert mask is not None and torch.equal(mask.masks["net.weight"], keep)
    w = model.net.weight.detach()
    assert torch.equal(w[~keep], W0[~keep])  # weight decay and momentum moved nothing outside the mask
    assert not torch.allclose(w[keep], W0[keep])
    optimizer = model.trainer.optimizers[0]
    momentum = optimizer.state[model.net.weight]["momentum_buffer"]
    assert torch.all(momentum[~keep] == 0) and torch.any(momentum[keep] != 0)


def test_saliency_mask_is_global_and_keeps_the_fraction() -> None:
    grads = {"a": torch.tensor([0.1, 5.0, 0.2]), "b": torch.tensor([[3.0, 0.0], [0.3, 4.0]])}
    params = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    mask = SaliencyMask.from_gradients(grads, 3 / 7, params)
    assert mask.masks["a"].tolist() == [False, True, False]
    assert mask.masks["b"].tolist() == [[True, False], [False, True]]
    assert mask.fraction == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="fraction"):
        SaliencyMask.from_gradients(grads, 0.0)


@pytest.mark.parametrize("make", [lambda: SCRUB(save_original=False), lambda: GradDiff(retain_loss="kl", save_original=False)])
def test_reference_never_changes(make: Any, tmp_path: Any) -> None:
    callback = make()
    model = one_step(tmp_path, callback, steps=3, lr=0.5)
    assert not torch.allclose(model.net.weight, W0)  # the student moved
    reference = callback.reference
    assert reference is not None and reference.kind == "copy"
    assert torch.equal(reference.weights["net.weight"], W0)
    assert torch.allclose(reference(XF), XF @ W0.T)  # the reference forward: the weights at the start
    assert torch.equal(callback.state_dict()["method"]["reference"]["net.weight"], W0)
    offloaded = ReferenceModel(model, offload=True, state=callback.state_dict()["method"]["reference"])
    assert offloaded.weights["net.weight"].device.type == "cpu" and torch.allclose(offloaded(XF), XF @ W0.T)


def test_reference_of_a_lora_module_is_the_base_with_adapters_disabled() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    base.load_state_dict(model.state_dict())
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    x = torch.randn(5, 4)
    reference = ReferenceModel(model)
    assert reference.kind == "adapters_disabled" and reference.weights is None and reference.state() is None
    assert not torch.allclose(model(x), base(x))  # the adapters do something
    assert torch.equal(reference(x), base(x))
    assert not torch.allclose(model(x), base(x))  # and they are back on afterwards
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    # a trainable base weight: the adapters-off model would move, so a frozen copy is used instead
    model[0].base_layer.weight.requires_grad_(True)
    assert ReferenceModel(model).kind == "copy"


# ---------------------------------------------------------------------- safety rails
def test_pre_unlearning_checkpoint_is_written_and_named(tmp_path: Any, caplog: Any) -> None:
    callback = GradientAscent()
    one_step(tmp_path, callback)
    assert len(callback.saved) == 1 and callback.saved[0].endswith("pre_unlearning_task0.ckpt")
    saved = torch.load(callback.saved[0], weights_only=True)
    assert torch.equal(saved["state_dict"]["net.weight"], W0)
    # a second run in the same folder does not replace it
    second = GradientAscent()
    one_step(tmp_path, second)
    assert second.saved[0].endswith("pre_unlearning_task0-v1.ckpt")


def test_non_finite_loss_stops_naming_the_step(tmp_path: Any) -> None:
    model = UserNet()
    with torch.no_grad():
        model.net.weight[0, 0] = float("nan")
    trainer = quiet_trainer(tmp_path, [GradientAscent()], max_steps=1, num_sanity_val_steps=0)
    with pytest.raises(FloatingPointError, match=r"global step 0 .*pre_unlearning_task0\.ckpt"):
        trainer.fit(model, datamodule=ForgetData())


class LogRetainAccuracy(pl.Callback):
    """Logs a made-up retained accuracy per epoch: 0.9, 0.95, 0.5, 0.4 (what an evaluation would)."""

    values = [0.9, 0.95, 0.5, 0.4]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("mu/ra", self.values[trainer.current_epoch])


def test_divergence_guard_stops_and_the_best_epoch_is_restored(tmp_path: Any) -> None:
    weights: list[torch.Tensor] = []

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            weights.append(pl_module.net.weight.detach().clone())

    callback = GradientAscent(guard_monitor="mu/ra", guard_threshold=0.6, restore_best="mu/ra",
                              save_original=False)
    model = UserNet(lr=0.1)
    trainer = quiet_trainer(tmp_path, [LogRetainAccuracy(), Snapshot(), callback], max_epochs=4, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="divergence guard: mu/ra=0.5 is below 0.6 at epoch 2"):
        trainer.fit(model, datamodule=ForgetData())
    assert trainer.current_epoch == 3 and len(weights) == 3  # stopped after epoch 2
    assert torch.equal(model.net.weight, weights[1])  # epoch 1 had the best retained accuracy


def test_guard_on_a_key_never_logged_fails_clearly(tmp_path: Any) -> None:
    trainer = quiet_trainer(tmp_path, [GradientAscent(guard_monitor="mu/typo", guard_threshold=0.5)], max_epochs=1,
                            num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="guard_monitor.*mu/typo"):
        trainer.fit(UserNet(), datamodule=ForgetData())


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="guard_threshold"):
        GradientAscent(guard_monitor="mu/ra")
    with pytest.raises(ValueError, match="mask_fraction"):
        SalUn(mask_fraction=1.5)
    with pytest.raises(ValueError, match="retain_loss"):
        GradDiff(retain_loss="mse")
    with pytest.raises(ValueError, match="temperature"):
        SCRUB(temperature=0)
    assert isinstance(SalUn(), RandomLabels) and isinstance(SCRUB(), UnlearningMethod)


def test_mask_without_forget_data_fails_before_training(tmp_path: Any) -> None:
    class Plain(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(torch.utils.data.TensorDataset(XR, YR), batch_size=1)

    trainer = quiet_trainer(tmp_path, [SalUn()], max_steps=1, num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="forget_train_dataset"):
        trainer.fit(UserNet(), datamodule=Plain())


# ---------------------------------------------------------------------- metrics
def test_mia_efficacy_svc_on_fixed_scores() -> None:
    # Members (retained samples) all at confidence 1.0, non-members (test) at 0.2: the SVC's
    # decision is "member" near 1.0 and "non-member" near 0.2, so of the forget scores
    # (0.99, 0.21, 1.0, 0.18) two are called non-members.
    members = torch.ones(20)
    nonmembers = torch.full((20,), 0.2)
    forget = torch.tensor([0.99, 0.21, 1.0, 0.18])
    assert mia_efficacy_svc(forget, members, nonmembers) == 0.5
    from sklearn.svm import SVC

    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(torch.cat([members, nonmembers]).view(-1, 1).numpy(),
                                                    [1] * 20 + [0] * 20)
    assert mia_efficacy_svc(forget, members, nonmembers) == 1 - clf.predict(forget.view(-1, 1).numpy()).mean()
    with pytest.raises(ValueError, match="forget_scores"):
        mia_efficacy_svc(torch.zeros(0), members, nonmembers)


def test_threshold_mia_counts_a_forget_score_at_the_threshold_as_member() -> None:
    # Confidences saturate at 1.0: the best threshold is 1.0 (score >= 1.0 means member), and a
    # forget sample scoring exactly 1.0 is a member, not a non-member.
    retain = torch.tensor([1.0, 1.0, 1.0, 1.0])
    heldout = torch.tensor([1.0, 0.6, 0.5, 0.4])
    assert mia_efficacy(torch.tensor([1.0, 1.0, 0.5, 0.7]), retain, heldout) == 0.5


def test_avg_gap() -> None:
    m = {"ua": 0.1, "ra": 0.9, "ta": 0.8, "mia_efficacy": 0.3}
    r = {"ua": 0.2, "ra": 1.0, "ta": 0.8, "mia_efficacy": 0.1}
    assert avg_gap(m, r) == pytest.approx((0.1 + 0.1 + 0 + 0.2) / 4)
    with pytest.raises(KeyError, match="ta"):
        avg_gap({"ua": 0.1}, r)


# ---------------------------------------------------------------------- sweep
def test_sweep_runs_a_grid_and_ranks_by_gap_to_retraining(tmp_path: Any) -> None:
    import json
    from pathlib import Path

    from lightning_forget.unlearning.sweep import main as sweep_main, parse_grid

    assert parse_grid(["a.b+c=1,2"]) == [(["a.b", "c"], ["1", "2"])]
    with pytest.raises(ValueError, match="KEY=v1,v2"):
        parse_grid(["lr"])
    retrained = tmp_path / "retrain.json"
    retrained.write_text(json.dumps([{"ua": 0.1, "ra": 1.0, "ta": 0.95, "mia_efficacy": 0.1}]))
    config = Path(__file__).resolve().parents[1] / "configs" / "unlearning" / "ga_digits.yaml"
    rows = sweep_main(["--config", str(config), "--grid", "model.init_args.optimizer.init_args.lr=0.001,0.01",
                       "--retrained", str(retrained), "--out", str(tmp_path / "sweep"), "--",
                       "--trainer.fast_dev_run", "2", "--trainer.enable_progress_bar", "false"])
    assert len(rows) == 2 and rows[0]["avg_gap"] <= rows[1]["avg_gap"]
    assert {r["model.init_args.optimizer.init_args.lr"] for r in rows} == {"0.001", "0.01"}
    for name in ("sweep.csv", "sweep.json", "sweep_gap.png"):
        assert (tmp_path / "sweep" / name).is_file()


def test_pretrained_weights_are_loaded_and_kept_as_the_pre_unlearning_checkpoint(tmp_path: Any) -> None:
    path = tmp_path / "original.pt"
    torch.save({"net.weight": 2 * W0}, path)
    callback = GradientAscent(pretrained_ckpt=str(path))
    model = one_step(tmp_path, callback)
    assert torch.equal(torch.load(callback.saved[0], weights_only=True)["state_dict"]["net.weight"], 2 * W0)
    assert torch.allclose(model.net.weight.detach(), 2 * W0 + _ce_grad(2 * W0, XF[0], 0), atol=1e-5)
    torch.save({"other.weight": W0}, path)
    with pytest.raises(ValueError, match="pretrained_ckpt"):
        one_step(tmp_path, GradientAscent(pretrained_ckpt=str(path)))
