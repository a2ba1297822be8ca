"""GSLoRA: group lasso value and gradient, bounded loss, merge, fresh LoRA, frozen base, resume, DDP."""

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_forget.callbacks import GSLoRA
from lightning_forget.callbacks.gs_lora import group_sparsity, lora_layers
from lightning_forget.lora import local_delta
from lightning_forget.datamodules import ForgetRetainDataModule
from lightning_forget.modules import ContinualClassifier
from tests.helpers.harness import params_vector, quiet_trainer, run_ddp_pair, run_stream, flat_tensors


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(d, 2 * d)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TinyBlocks(nn.Module):
    """A timm-style stack: blocks.N.mlp.fc1/fc2 (the automatic FFN targets)."""

    def __init__(self, d_in=64, d=16, depth=3):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.out_features = d

    def forward(self, x):
        h = self.embed(x.flatten(1))
        for block in self.blocks:
            h = block(h)
        return h


def make_data(epochs_per_task=1, **kw):
    kw.setdefault("batch_size", 32)
    return ForgetRetainDataModule(builtin="digits", forget_classes=[[8, 9], [6, 7]], data_ratio=0.15,
                                  epochs_per_task=epochs_per_task, **kw)


def make_model(dm):
    torch.manual_seed(0)
    return ContinualClassifier(backbone=TinyBlocks(), num_classes=10, input_shape=(1, 8, 8), num_tasks=dm.num_tasks + 1,
                               report=False, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))


def make_callback(**kw):
    kw.setdefault("bound", 5.0)
    kw.setdefault("alpha", 1e-3)
    return GSLoRA(**kw)


def test_group_lasso_value_and_gradient_by_hand():
    a = torch.tensor([[3.0, 0.0]], requires_grad=True)
    b = torch.tensor([[4.0]], requires_grad=True)
    c = torch.tensor([[1.0, 2.0, 2.0]], requires_grad=True)
    value = group_sparsity([[a, b], [c]], eps=0.0)
    assert value.item() == pytest.approx(5.0 + 3.0)
    value.backward()
    assert torch.allclose(a.grad, torch.tensor([[3 / 5, 0.0]]))
    assert torch.allclose(b.grad, torch.tensor([[4 / 5]]))
    assert torch.allclose(c.grad, torch.tensor([[1 / 3, 2 / 3, 2 / 3]]))
    # eps inside the root keeps the gradient of an all-zero group finite
    z = torch.zeros(2, requires_grad=True)
    group_sparsity([[z]], eps=1e-8).backward()
    assert torch.isfinite(z.grad).all()


def test_bounded_loss_has_zero_gradient_past_bound():
    logits = torch.tensor([[5.0, -5.0]], requires_grad=True)
    ce = nn.functional.cross_entropy(logits, torch.tensor([1]))  # about 10
    loss = torch.relu(5.0 - ce)
    loss.backward()
    assert ce.item() > 5 and loss.item() == 0 and torch.count_nonzero(logits.grad) == 0
    logits2 = torch.tensor([[0.0, 0.0]], requires_grad=True)
    torch.relu(5.0 - nn.functional.cross_entropy(logits2, torch.tensor([1]))).backward()
    assert torch.count_nonzero(logits2.grad) > 0  # below the bound: gradient ascent on CE


def _setup(tmp_path, **kw):
    dm = make_data()
    model = make_model(dm)
    cb = make_callback(**kw)
    trainer = quiet_trainer(tmp_path, [cb], max_epochs=dm.max_epochs)
    cb.setup(trainer, model, "fit")
    return dm, model, cb, trainer


@pytest.mark.parametrize("grouping", ["block", "lora", "matrix"])
def test_penalty_gradient_added_before_the_step_is_alpha_times_the_group_lasso_gradient(tmp_path, monkeypatch, grouping):
    dm, model, cb, trainer = _setup(tmp_path, grouping=grouping, alpha=0.3, eps=1e-6)
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    params = cb.lora_parameters(model)
    with torch.no_grad():
        for p in params.values():
            p.normal_()
            p.grad = torch.full_like(p, 0.25)  # the data loss's gradient, kept and added to
    expected = {}
    for group in cb._groups:
        norm = math.sqrt(sum(float((params[n] ** 2).sum()) for n in group) + 1e-6)  # by hand, per group
        for n in group:
            expected[n] = 0.25 + 0.3 * params[n].detach() / norm
    cb.on_before_optimizer_step(trainer, model, None)
    groups = {"block": 3, "lora": 6, "matrix": 12}[grouping]
    assert len(cb._groups) == groups and sorted(n for g in cb._groups for n in g) == sorted(params)
    for n, p in params.items():
        assert torch.allclose(p.grad, expected[n], atol=1e-6), n


def test_fresh_lora_has_no_effect_and_targets_ffn(tmp_path):
    dm = make_data()
    model = make_model(dm)
    x = torch.randn(5, 1, 8, 8)
    before = model(x)
    cb = make_callback()
    trainer = quiet_trainer(tmp_path, [cb], max_epochs=dm.max_epochs)
    cb.setup(trainer, model, "fit")
    assert sorted(lora_layers(model)) == sorted(f"backbone.blocks.{i}.mlp.fc{j}" for i in range(3) for j in (1, 2))
    assert torch.allclose(model(x), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(cb._groups) == 3 and all(len(g) == 4 for g in cb._groups)  # one group per block


def test_merge_keeps_outputs_and_undo_restores(tmp_path):
    dm, model, cb, trainer = _setup(tmp_path)
    with torch.no_grad():
        for p in cb.lora_parameters(model).values():
            p.normal_()
    x = torch.randn(5, 1, 8, 8)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with_lora = model(x)
    merged = cb.merge(model)
    cb.reset_lora(model, 1)
    assert torch.allclose(model(x), with_lora, atol=1e-5)
    layer = lora_layers(model)["backbone.blocks.0.mlp.fc1"]
    assert merged["backbone.blocks.0.mlp.fc1"].shape == layer.get_base_layer().weight.shape
    cb.deltas.append(merged)
    cb.undo(model, 0)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.allclose(p, base[n], atol=1e-6)
    with pytest.raises(ValueError, match="task"):
        cb.undo(model, 3)


def test_run_changes_only_lora_and_merges(tmp_path):
    pl.seed_everything(0)
    dm = make_data(epochs_per_task=2)
    model = make_model(dm)
    frozen_names = ["head.weight", "backbone.embed.weight"]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = make_callback()
    before = _BeforeMerge(cb)
    trainer = quiet_trainer(tmp_path, [before, cb], max_epochs=dm.max_epochs)
    trainer.fit(model, dm)
    _check_group_norms(cb, before, trainer)
    params = dict(model.named_parameters())
    for n in frozen_names:
        assert torch.equal(params[n], start[n])  # head and non-target layers untouched
    # the targets' base weights moved only through the merges, which are kept
    name = "backbone.blocks.0.mlp.fc1"
    w = params[f"{name}.base_layer.weight"]
    total = sum(d[name] for d in cb.deltas)
    assert not torch.allclose(w, start[f"{name}.weight"])
    assert torch.allclose(w - total, start[f"{name}.weight"], atol=1e-5)
    assert len(cb.deltas) == 2 and len(cb.nonzero) == 2
    # after the last merge the LoRA is fresh: B is zero
    assert all(torch.count_nonzero(p) == 0 for n, p in params.items() if ".lora_B." in n)
    assert trainer.callback_metrics["gs_lora/forget_ce"] > 0


@pytest.mark.slow
def test_forgetting_happens(tmp_path):
    """With enough steps, the forget classes' accuracy drops while the retained classes stay."""
    pl.seed_everything(0)
    dm = make_data(epochs_per_task=1)
    model = make_model(dm)
    dm.setup()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        for x, y in dm.pretrain_dataloader():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    def acc(i):
        loader = dm.val_dataloader()[i]
        with torch.no_grad():
            hits = [(model(x).argmax(1) == y).float() for x, y in loader]
        return torch.cat(hits).mean().item()

    before = [acc(i) for i in range(3)]
    dm2 = ForgetRetainDataModule(builtin="digits", forget_classes=[[8, 9]], data_ratio=0.15, epochs_per_task=12, batch_size=16)
    cb = make_callback(bound=8.0, beta=1.0, lora_alpha=8.0)
    trainer = quiet_trainer(tmp_path, [cb], max_epochs=12, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, dm2)
    after = [acc(i) for i in range(3)]
    assert before[0] > 0.8 and after[0] < 0.2
    assert after[2] > before[2] - 0.15


def test_bad_arguments_and_batches(tmp_path):
    with pytest.raises(ValueError, match="grouping"):
        GSLoRA(grouping="layer")
    with pytest.raises(ValueError, match="alpha"):
        GSLoRA(alpha=-1)
    with pytest.raises(ValueError, match="beta"):
        GSLoRA(beta=[])
    with pytest.raises(ValueError, match="r"):
        GSLoRA(r=0)
    dm, model, cb, trainer = _setup(tmp_path)
    with pytest.raises(ValueError, match="two-stream"):
        cb._split_streams(model, (torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), 0)


def test_explicit_targets_on_a_cnn(tmp_path):
    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc1 = nn.Linear(4 * 64, 32)
            self.fc2 = nn.Linear(32, 16)
            self.out_features = 16

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))

    dm = make_data()
    model = ContinualClassifier(backbone=CNN(), num_classes=10, input_shape=(1, 8, 8), num_tasks=3, report=False)
    cb = GSLoRA(target_modules=["fc1", "fc2"], grouping="block")
    trainer = quiet_trainer(tmp_path, [cb], max_epochs=dm.max_epochs)
    cb.setup(trainer, model, "fit")
    assert sorted(lora_layers(model)) == ["backbone.fc1", "backbone.fc2"]
    assert len(cb._groups) == 2  # no blocks: one group per layer


@pytest.mark.parametrize("resume_after_epoch", [0, 1])
def test_resume_at_epoch_end_is_equivalent(tmp_path, resume_after_epoch):
    full, cb_full = run_stream(tmp_path / "full", make_callback, make_data=make_data, make_model=make_model, epochs_per_task=1)
    resumed, cb_res = run_stream(tmp_path / "res", make_callback, make_data=make_data, make_model=make_model,
                                 epochs_per_task=1, resume_after_epoch=resume_after_epoch)
    assert torch.allclose(params_vector(full), params_vector(resumed), atol=1e-6)
    assert torch.allclose(flat_tensors(cb_full.state_dict()), flat_tensors(cb_res.state_dict()), atol=1e-6)


def test_resume_mid_epoch_is_equivalent(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt=None, save=False):
        pl.seed_everything(0 if ckpt is None else 1)
        dm = make_data(epochs_per_task=1, batch_size=16)
        model = make_model(dm)
        cb = make_callback()
        extra = [ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1, filename="{step}")] if save else []
        trainer = quiet_trainer(tmp_path, [cb, *extra], max_epochs=dm.max_epochs, enable_checkpointing=save)
        trainer.fit(model, dm, ckpt_path=ckpt)
        return model, cb, trainer

    full, cb_full, tr = run(save=True)
    assert tr.num_training_batches > 3
    resumed, cb_res, _ = run(ckpt=str(tmp_path / "ck" / "step=3.ckpt"))
    assert torch.allclose(params_vector(full), params_vector(resumed), atol=1e-6)
    assert torch.allclose(flat_tensors(cb_full.state_dict()), flat_tensors(cb_res.state_dict()), atol=1e-6)


@pytest.mark.slow  # the contract row runs GSLoRA under DDP too (without prototypes, on an MLP)
@pytest.mark.ddp
def test_ddp_ranks_agree(tmp_path):
    result = run_ddp_pair(tmp_path, lambda: make_callback(prototype=True), make_data=make_data, make_model=make_model)
    assert result["equal_length"] and result["world_size"] == 2
    assert result["max_param_diff"] == 0 and result["max_state_diff"] == 0
    assert result["state_size"] > 0


def test_alpha_warm_up_restarts_with_every_task():
    from types import SimpleNamespace

    dm = make_data(epochs_per_task=3)
    cb = make_callback(alpha=0.1, alpha_warmup_epochs=2)
    alphas = [cb.current_alpha(SimpleNamespace(datamodule=dm, current_epoch=e)) for e in range(dm.max_epochs)]
    assert alphas == [0.0, 0.0, 0.1, 0.0, 0.0, 0.1]  # 2 warm-up epochs in each 3-epoch task
    assert make_callback(alpha=0.1).current_alpha(SimpleNamespace(datamodule=dm, current_epoch=0)) == 0.1


# ---------------------------------------------------------------- issue 24: fidelity of GS-LoRA(++)
def _kaiming_bound(a: float, fan_in: int) -> float:
    return math.sqrt(2.0 / (1.0 + a * a)) * math.sqrt(3.0 / fan_in)


def _max_ratio_to_bound(model, a: float) -> float:
    """max over LoRA A matrices of max|A| / (Kaiming-uniform bound for gain ``a``)."""
    ratios = []
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            ratios.append(float(p.detach().abs().max()) / _kaiming_bound(a, p.shape[1]))
    return max(ratios)


def test_first_lora_uses_kaiming_sqrt5_and_later_ones_sqrt50(tmp_path):
    """Official: loralib's a = √5 for the first task, reinitialize_lora_parameters' a = √50 after each merge."""
    dm, model, cb, trainer = _setup(tmp_path)
    first = _max_ratio_to_bound(model, math.sqrt(5))
    assert 0.9 < first <= 1.0  # uniform on [-bound(√5), bound(√5)]: the largest of ~700 draws is near it
    cb.reset_lora(model, 1)
    later = _max_ratio_to_bound(model, math.sqrt(50))
    assert 0.9 < later <= 1.0  # a = √5 would give values up to 2.9× this bound
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if ".lora_B." in n)


class _BeforeMerge(pl.Callback):
    """Listed before GSLoRA: the LoRA factors after each task's last batch, before the merge (the task
    ends, and GSLoRA merges, in its own hook of that batch's end, which runs after this one's)."""

    def __init__(self, gs):
        self.gs, self.factors, self._latest = gs, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._latest = {n: p.detach().clone() for n, p in self.gs.lora_parameters(pl_module).items()}

    def on_train_epoch_end(self, trainer, pl_module):
        if (trainer.current_epoch + 1) % trainer.datamodule.epochs_per_task == 0:
            self.factors.append(self._latest)


def _check_group_norms(cb, before, trainer):
    """Per block, Σ‖M‖_F of the factors just before the merge (the official cal_norm), next to the edited count."""
    model = trainer.lightning_module
    blocks = [f"backbone.blocks.{i}" for i in range(3)]
    assert len(cb.group_norms) == len(before.factors) == 2
    for norms, factors in zip(cb.group_norms, before.factors):
        assert list(norms) == blocks
        for block in blocks:
            expected = sum(float(v.norm()) for n, v in factors.items() if n.startswith(block + "."))
            assert norms[block] == pytest.approx(expected, rel=1e-6)
    for block in blocks:  # the last task's values are logged
        assert float(trainer.callback_metrics[f"gs_lora/group_norm/{block}"]) == pytest.approx(cb.group_norms[1][block], rel=1e-6)
    # the LoRA started after each merge used a = √50
    assert _max_ratio_to_bound(model, math.sqrt(50)) <= 1.0


def test_group_penalty_drives_a_block_to_zero(tmp_path, monkeypatch):
    """With no data gradient, SGD on α·Σ_g‖g‖ shrinks each group's norm by lr·α per step (hand value) to ~0."""
    dm, model, cb, trainer = _setup(tmp_path, alpha=1.0, eps=1e-12)
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    params = cb.lora_parameters(model)
    with torch.no_grad():
        for p in params.values():
            p.normal_(0.0, 0.1)
    opt = torch.optim.SGD(list(params.values()), lr=0.05)

    def norms():
        return [math.sqrt(sum(float((params[n] ** 2).sum()) for n in g)) for g in cb._groups]

    start = norms()
    for step in range(1, 301):
        for p in params.values():
            p.grad = torch.zeros_like(p)
        cb.on_before_optimizer_step(trainer, model, opt)
        opt.step()
        if step == 3:
            assert norms() == pytest.approx([n - 3 * 0.05 for n in start], rel=1e-5)
    assert max(norms()) <= 0.05 + 1e-6  # down from about 2-3: oscillates within lr·α of zero
    assert max(cb.current_group_norms(model).values()) < 0.1 * min(start)


def _forget_setup(tmp_path, monkeypatch, **kw):
    dm, model, cb, trainer = _setup(tmp_path, **kw)
    model.trainer = trainer
    logged = {}
    monkeypatch.setattr(model, "log", lambda key, value, **k: logged.__setitem__(key, value))
    torch.manual_seed(1)
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([8, 9, 8, 9, 8, 9])
    batch = {"forget": (x, y), "retain": (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))}
    cb._split_streams(model, batch, 0)
    return model, cb, x, y, logged


def test_bounded_forgetting_term_on_a_batch_with_per_task_beta(tmp_path, monkeypatch):
    model, cb, x, y, logged = _forget_setup(tmp_path, monkeypatch, beta=[0.2, 0.5], bound=3.0)
    with torch.no_grad():
        ce = float(nn.functional.cross_entropy(model(x), y))
    assert 0 < ce < 3.0
    for task, beta in ((0, 0.2), (1, 0.5), (4, 0.5)):  # the last entry repeats
        cb.task = task
        term = cb._forget_terms(model, None, 0, None)
        assert float(term) == pytest.approx(beta * (3.0 - ce), rel=1e-5)
        assert float(logged["gs_lora/forget_ce"]) == pytest.approx(ce, rel=1e-5)
    cb.bound = 0.5 * ce  # past the bound: no loss and no gradient
    term = cb._forget_terms(model, None, 0, None)
    assert float(term) == 0.0


def test_prototype_distance_by_hand():
    from lightning_forget.callbacks.gs_lora import prototype_distance

    # P = softmax([ln 3, 0]) = [3/4, 1/4], Q = softmax([0, 0]) = [1/2, 1/2]:
    # KL(P‖Q) = 3/4·ln(3/2) + 1/4·ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    value = prototype_distance(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]))
    assert float(value) == pytest.approx(expected, rel=1e-6)
    # batch mean; identical rows are at distance 0
    two = prototype_distance(torch.tensor([[0.0, 0.0], [1.0, 2.0]]), torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]]))
    assert float(two) == pytest.approx(expected / 2, rel=1e-6)


def test_prototype_term_uses_the_head_input_and_per_task_weights(tmp_path, monkeypatch):
    model, cb, x, y, logged = _forget_setup(tmp_path, monkeypatch, prototype=True, prototype_forget_weight=[0.1, 0.3],
                                            prototype_bound=2.0, beta=0.0)
    with torch.no_grad():
        features = model.backbone(x)  # what ContinualClassifier's head receives
    cb.prototypes = {8: torch.linspace(-1, 1, 16), 9: torch.linspace(1, -1, 16)}
    protos = torch.stack([cb.prototypes[int(c)] for c in y])
    p = torch.softmax(protos, -1)
    kl = (p * (p.log() - torch.log_softmax(features, -1))).sum(-1).mean()
    assert 0 < float(kl) < 2.0
    for task, w_f in ((0, 0.1), (1, 0.3), (3, 0.3)):
        cb.task = task
        term = cb._forget_terms(model, None, 0, None)
        assert float(term) == pytest.approx(w_f * (2.0 - float(kl)), rel=1e-5)
    assert cb._head_name == "head"
    # logits as an option: the feature is the model's output
    cb.prototype_space = "logits"
    logits, feature = cb._run(model, x)
    assert feature is logits and feature.shape == (6, 10)


def test_prototypes_are_class_means_of_the_head_input_counting_each_sample_once(tmp_path):
    class Check(pl.Callback):
        """Listed after GSLoRA: at each task's first epoch start, the prototypes computed there, by hand."""

        def __init__(self, gs):
            self.gs, self.checked = gs, 0

        def on_train_epoch_start(self, trainer, pl_module):
            dataset = trainer.train_dataloader.dataset
            assert len(dataset.forget) != len(dataset.retain)  # the shorter stream cycles in the batches
            feats, labels = [], []
            with torch.no_grad():
                for part in (dataset.forget, dataset.retain):
                    for i in range(len(part)):
                        xi, yi = part[i]
                        feats.append(pl_module.backbone(xi.unsqueeze(0))[0])
                        labels.append(int(yi))
            feats, labels = torch.stack(feats), torch.tensor(labels)
            assert set(self.gs.prototypes) == set(labels.tolist())
            for c, proto in self.gs.prototypes.items():
                torch.testing.assert_close(proto, feats[labels == c].mean(0), rtol=1e-5, atol=1e-6)
            self.checked += 1

    pl.seed_everything(0)
    dm = make_data(epochs_per_task=1)
    model = make_model(dm)
    cb = make_callback(prototype=True)
    check = Check(cb)
    quiet_trainer(tmp_path, [cb, check], max_epochs=dm.max_epochs).fit(model, dm)
    assert check.checked == 2
    assert set(cb.prototypes) == {0, 1, 2, 3, 4, 5, 6, 7}
    assert cb.prototypes[0].shape == (16,)  # the head's input (TinyBlocks width), not the 10 logits


def test_prototype_head_errors_name_the_fix(tmp_path):
    class Scaled(ContinualClassifier):
        def forward(self, x):
            return 2.0 * self.head(self.backbone(x))  # logits changed after the head

    dm = make_data()
    torch.manual_seed(0)
    model = Scaled(backbone=TinyBlocks(), num_classes=10, input_shape=(1, 8, 8), num_tasks=3, report=False)
    cb = make_callback(prototype=True)
    cb.setup(quiet_trainer(tmp_path, [cb], max_epochs=dm.max_epochs), model, "fit")
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="prototype_head"):
        cb._run(model, x)
    named = make_callback(prototype=True, prototype_head="head")
    named._inject(model)
    assert named._run(model, x)[1].shape == (2, 16)
    wrong = make_callback(prototype=True, prototype_head="classifier")
    with pytest.raises(RuntimeError, match="prototype_head"):
        wrong._run(model, x)
    with pytest.raises(ValueError, match="prototype_space"):
        GSLoRA(prototype_space="embedding")


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "gpt2_conv1d"])
def test_merge_block_formula_equals_peft_delta(fan_in_fan_out) -> None:
    """The sharded merge's ``ΔW`` block (``lora.local_delta``, here the whole block: plain weights)
    equals PEFT's ``get_delta_weight`` for a linear and for GPT-2's transposed Conv1D."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(6, 5) if fan_in_fan_out else nn.Linear(5, 6))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3, target_modules=["0"], fan_in_fan_out=fan_in_fan_out), net)
    layer = lora_layers(net)["0"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    expected = layer.get_delta_weight("default")
    assert expected.abs().sum() > 0
    assert torch.allclose(local_delta(layer, "default", "GSLoRA"), expected, atol=1e-6)
