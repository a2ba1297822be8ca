"""ForgetRetainEvaluation (Acc_f/Acc_r/Acc_o/H per task, table and plot), the joint (original-model)
mode of ForgetRetainDataModule, GSLoRA(pretrained_ckpt=...), and the ViT / ConvNet backbones."""

from __future__ import annotations

import csv
import functools
import math

import pytest
import torch

from lightning_forget import reporting
from lightning_forget.callbacks import ForgetRetainEvaluation, GSLoRA
from lightning_forget.callbacks.gs_lora import lora_layers
from lightning_forget.datamodules import ForgetRetainDataModule
from lightning_forget.metrics import h_mean
from lightning_forget.modules import ContinualClassifier
from lightning_forget.nn import ConvNet, ViT
from tests.helpers.harness import quiet_trainer


def make_data(**kw):
    kw.setdefault("epochs_per_task", 1)
    return ForgetRetainDataModule(builtin="digits", forget_classes=[[8, 9], [6, 7]], data_ratio=0.15, batch_size=32, **kw)


def make_model(dm):
    torch.manual_seed(0)
    return ContinualClassifier(num_classes=10, input_shape=(1, 8, 8), num_tasks=dm.num_tasks + 1, hidden_sizes=[32, 32],
                               report=False, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))


def _acc(model, dataset):
    model.eval()
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float()


def test_rows_match_a_direct_evaluation_and_the_report_is_written(tmp_path):
    dm = make_data()
    model = make_model(dm)
    evaluation = ForgetRetainEvaluation(log_dir=str(tmp_path / "out"))
    gs = GSLoRA(target_modules=["backbone.layers.1", "backbone.layers.3"], bound=5.0, alpha=1e-3)
    trainer = quiet_trainer(tmp_path, [gs, evaluation], max_epochs=dm.max_epochs)
    trainer.fit(model, dm)
    assert [r["task"] for r in evaluation.rows] == [0.0, 1.0]
    last = evaluation.rows[-1]
    # Recompute task 1's numbers directly from the datamodule's evaluation sets.
    acc_f = _acc(model, dm.val_dataset(1)).mean().item()
    acc_r = _acc(model, dm.val_dataset(2)).mean().item()
    acc_o = _acc(model, dm.val_dataset(0)).mean().item()
    assert last["acc_f"] == pytest.approx(acc_f)
    assert last["acc_r"] == pytest.approx(acc_r)
    assert last["acc_o"] == pytest.approx(acc_o)
    assert last["h_mean"] == pytest.approx(h_mean(last["acc_f_before"], acc_f, acc_r))
    assert 0.0 <= last["mia_auc"] <= 1.0
    assert math.isnan(evaluation.rows[0]["acc_o"])  # nothing forgotten before task 0
    assert set(evaluation.before) == {0, 1} and evaluation.rows[1]["acc_f_before"] == evaluation.before[1]
    assert trainer.callback_metrics["unlearn/acc_f"].item() == pytest.approx(acc_f)
    with open(tmp_path / "out" / "unlearning.csv") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == ["task", *reporting.UNLEARNING_COLUMNS] and len(lines) == 3
    assert float(lines[2][2]) == pytest.approx(acc_f)
    assert (tmp_path / "out" / "unlearning.png").stat().st_size > 0
    # The state round-trips (resume).
    other = ForgetRetainEvaluation()
    other.load_state_dict(evaluation.state_dict())
    assert other.rows == evaluation.rows and other.before == evaluation.before


def test_h_mean_row_uses_the_before_accuracy():
    table = reporting.render_unlearning_table([{"task": 0, "acc_f_before": 0.9, "acc_f": 0.0, "acc_r": 0.8, "acc_o": math.nan,
                                                "h_mean": h_mean(0.9, 0.0, 0.8), "mia_auc": 0.5}])
    assert table.row_count == 1
    assert h_mean(0.9, 0.0, 0.8) == pytest.approx(2 * 0.9 * 0.8 / 1.7)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ForgetRetainEvaluation(split="train")
    with pytest.raises(ValueError, match="batch_size"):
        ForgetRetainEvaluation(batch_size=0)
    with pytest.raises(TypeError, match="mia"):
        ForgetRetainEvaluation(mia="yes")


def test_joint_mode_trains_the_original_model_and_gslora_loads_it(tmp_path):
    dm = make_data(joint=True, epochs_per_task=2)
    assert dm.max_epochs == 2
    batch = next(iter(torch.utils.data.DataLoader(dm.pretrain_dataset(), batch_size=4)))
    model = make_model(dm)
    trainer = quiet_trainer(tmp_path, [], max_epochs=dm.max_epochs, enable_checkpointing=False)
    trainer.fit(model, dm)
    loader = trainer.train_dataloader
    first = next(iter(loader))
    assert isinstance(first, (list, tuple)) and first[0].shape[1:] == batch[0].shape[1:]  # plain (x, y) batches
    assert len(loader.dataset) == len(dm.pretrain_dataset())  # the whole pool, every class
    path = tmp_path / "original.ckpt"
    trainer.save_checkpoint(path)
    # A fresh module, then GSLoRA loads the original weights before adding its LoRA.
    dm2 = make_data()
    fresh = make_model(dm2)
    torch.nn.init.zeros_(fresh.head.weight)
    gs = GSLoRA(target_modules=["backbone.layers.1"], pretrained_ckpt=str(path))
    gs.setup(quiet_trainer(tmp_path, [gs], max_epochs=1), fresh, "fit")
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert list(lora_layers(fresh)) == ["backbone.layers.1"]
    with pytest.raises(TypeError, match="pretrained_ckpt"):
        GSLoRA(pretrained_ckpt=3)


def test_vit_and_convnet_backbones_take_lora_on_their_ffn_and_linears():
    vit = ContinualClassifier(backbone=ViT(num_hidden_layers=2, hidden_size=16, num_attention_heads=2), num_classes=10,
                              report=False)
    gs = GSLoRA()
    gs._inject(vit)
    assert len(lora_layers(vit)) == 4 and len(gs._group_names) == 2  # two FFN linears per block, one group per block
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert vit(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    cnn = ContinualClassifier(backbone=ConvNet(), num_classes=10, report=False)
    gs2 = GSLoRA(target_modules=["backbone.fc1", "backbone.fc2"])
    gs2._inject(cnn)
    assert list(lora_layers(cnn)) == ["backbone.fc1", "backbone.fc2"]
    assert cnn(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="patch_size"):
        ViT(input_shape=(1, 28, 28), patch_size=5)


def test_retain_only_mode_serves_plain_batches_of_the_retained_set(tmp_path):
    dm = make_data(retain_only=True)
    model = make_model(dm)
    trainer = quiet_trainer(tmp_path, [], max_epochs=1, enable_checkpointing=False)
    trainer.fit(model, dm)
    loader = trainer.train_dataloader
    assert len(loader.dataset) == len(dm.retain_train_dataset(0))
    labels = {int(loader.dataset[i][1]) for i in range(len(loader.dataset))}
    assert labels and not labels & {8, 9}  # task 0's forget classes are not in it
    with pytest.raises(TypeError, match="retain_only"):
        make_data(retain_only="yes")
