"""ILoRA: EMA formula, consistency loss, gradients, buffer padding, resume, model families."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_forget.callbacks import ILoRA
from lightning_forget.callbacks.i_lora import ema_coefficient
from lightning_forget.lora import LoRASettings, load_adapter
from lightning_forget.losses import hidden_consistency_loss
from lightning_forget.modules import CausalLMModule
from tests.helpers.harness import flat_tensors, params_vector, quiet_trainer
from tests.helpers.text import TINY_LM, tiny_lm, tiny_token_stream

LORA = {"r": 2, "alpha": 4.0, "dropout": 0.0}


def _callback(**kwargs: Any) -> ILoRA:
    kwargs.setdefault("lora", dict(LORA))
    kwargs.setdefault("buffer_size", 12)
    kwargs.setdefault("save_adapters", False)
    return ILoRA(**kwargs)


class Recorder(Callback):
    """After ILoRA's own hook: the fast and slow tensors at every batch end."""

    def __init__(self, ilora: ILoRA) -> None:
        self.ilora = ilora
        self.start: dict[str, torch.Tensor] = {}
        self.rows: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.grads: list[set[str]] = []
        self.optimizer_ptrs: set[int] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = {k: v.detach().clone() for k, v in self.ilora.fast_parameters().items()}
        self.optimizer_ptrs = {p.data_ptr() for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        fast = {k: v.detach().clone() for k, v in self.ilora.fast_parameters().items()}
        slow = {k: v.clone() for k, v in self.ilora._slow.items()}
        self.rows.append((trainer.global_step, fast, slow))


class _LM(CausalLMModule):
    """The causal LM with a test and a predict step (a user's module)."""

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self(batch["input_ids"]).float().mean()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self(batch["input_ids"])


def _fit(tmp_path: Path, callback: ILoRA, extra=(), model=None, **trainer_kwargs: Any):
    pl.seed_everything(0)
    dm = tiny_token_stream()
    model = tiny_lm(dm) if model is None else model
    trainer = quiet_trainer(tmp_path, [callback, *extra], max_epochs=dm.max_epochs, **trainer_kwargs)
    trainer.fit(model, dm)
    return model, trainer


def test_ema_coefficient_warm_start() -> None:
    assert ema_coefficient(1, 0.25) == 0.25
    assert ema_coefficient(1, 0.9) == 0.5
    assert ema_coefficient(2, 0.9) == pytest.approx(2 / 3)
    assert ema_coefficient(100, 0.9) == 0.9


@pytest.mark.parametrize("ema,accumulate,precision", [(0.9, 2, "32-true"), (0.25, 1, "32-true"), (0.999, 1, "bf16-true")])
def test_ema_follows_the_formula_once_per_real_step(tmp_path: Path, ema: float, accumulate: int, precision: str) -> None:
    """The slow learner is the float32 EMA of the fast tensors, under bf16-true too (a float32 master copy)."""
    callback = _callback(ema=ema, inference_learner="fast")
    recorder = Recorder(callback)
    _fit(tmp_path, callback, [recorder], accumulate_grad_batches=accumulate, precision=precision)
    slow = {k: v.float() for k, v in recorder.start.items()}
    steps, last_step = 0, 0
    for global_step, fast, recorded in recorder.rows:
        if global_step > last_step:
            steps += 1
            w = ema_coefficient(steps, ema)
            slow = {k: w * slow[k] + (1 - w) * fast[k].float() for k in slow}
        last_step = global_step
        for k in slow:
            torch.testing.assert_close(recorded[k], slow[k], rtol=1e-5, atol=1e-6)
    assert steps == callback.optimizer_steps == last_step
    assert steps == len(recorder.rows) // accumulate
    assert any(not torch.equal(slow[k], recorder.rows[-1][1][k].float()) for k in slow)  # slow differs from fast


def test_only_adapter_parameters_get_gradients_and_slow_is_outside_the_optimizer(tmp_path: Path) -> None:
    callback = _callback()
    recorder = Recorder(callback)
    model, _ = _fit(tmp_path, callback, [recorder])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n for n in names)
    assert all(grads <= names and grads for grads in recorder.grads)
    assert not any(isinstance(v, torch.nn.Parameter) for v in callback._slow.values())
    assert not {v.data_ptr() for v in callback._slow.values()} & recorder.optimizer_ptrs


def test_consistency_loss_hand_computed() -> None:
    fast = [torch.tensor([[[1.0, 0.0], [0.0, 5.0]]]), torch.tensor([[[2.0, 2.0], [9.0, 9.0]]])]
    slow = [torch.tensor([[[3.0, -1.0], [7.0, 7.0]]]), torch.tensor([[[2.0, 5.0], [0.0, 0.0]]])]
    # ReLU(slow - fast)^2: layer 0 -> [[4, 0], [49, 4]], layer 1 -> [[0, 9], [0, 0]]
    assert float(hidden_consistency_loss(fast, slow)) == pytest.approx((4 + 49 + 4 + 9) / 8)
    mask = torch.tensor([[1, 0]])  # second position is padding
    assert float(hidden_consistency_loss(fast, slow, mask=mask)) == pytest.approx((4 + 9) / 4)
    assert float(hidden_consistency_loss(fast, slow, layers=[-1])) == pytest.approx(9 / 4)
    with pytest.raises(ValueError, match="layers"):
        hidden_consistency_loss(fast, slow, layers=[5])


def test_replay_term_is_the_official_loss_with_masks(tmp_path: Path) -> None:
    """Total loss = (L_cur + L_buf)/2 + γ·L_cons on a padded token buffer, masks respected."""
    from lightning_forget.modules.causal_lm import causal_lm_loss

    pl.seed_everything(0)
    model = tiny_lm()
    callback = _callback(consistency_weight=2.0)
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=1)
    callback._wrap(model)
    ids = torch.randint(0, 256, (3, 6))
    rows = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3]),
            "labels": ids.masked_fill(torch.tensor([[0] * 6, [0] * 4 + [1] * 2, [0] * 3 + [1] * 3]).bool(), -100)}
    callback.buffer.add({"input_ids": rows["input_ids"][:1], "attention_mask": rows["attention_mask"][:1],
                         "labels": rows["labels"][:1]})
    callback.buffer.add({k: v[1:, :4] for k, v in rows.items()})
    drawn = callback.buffer.take(torch.tensor([1, 2]))
    assert drawn["input_ids"].shape[1] == 4 and (drawn["labels"][1, 3] == -100) and drawn["attention_mask"][1, 3] == 0
    with torch.no_grad():  # make the learners differ
        for v in callback._slow.values():
            v.add_(0.3 * torch.randn_like(v))
    fields = callback.buffer.take(torch.tensor([0, 1, 2]))
    fields.pop("__task__", None)
    inputs = callback._model_inputs(fields, torch.device("cpu"))
    peft = callback.peft_model()
    fast_out = peft(**inputs, output_hidden_states=True)
    old = callback._load_into_fast(callback._slow)
    slow_hidden = peft(**inputs, output_hidden_states=True).hidden_states
    callback._load_into_fast(old)
    callback._replay = (fields, inputs, [h.detach() for h in slow_hidden])
    current = torch.tensor(3.0)
    term = callback._replay_terms(_LogSink(), None, 0, current)
    mask = inputs["attention_mask"].bool()
    expected_cons = sum(torch.relu(s - f)[mask].pow(2).sum() for f, s in zip(fast_out.hidden_states, slow_hidden))
    expected_cons = expected_cons / (len(slow_hidden) * mask.sum() * slow_hidden[0].shape[-1])
    buffer_loss = causal_lm_loss(fast_out.logits, fields["labels"])
    assert float(expected_cons) > 0
    torch.testing.assert_close(current + term, (current + buffer_loss) / 2 + 2.0 * expected_cons, rtol=1e-5, atol=1e-6)


class _LogSink:
    trainer = None

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_mid_epoch_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full_cb = _callback()
    full, _ = _fit(tmp_path / "full", full_cb)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    first = _callback()
    pl.seed_everything(0)
    dm = tiny_token_stream()
    trainer = quiet_trainer(tmp_path / "a", [first, saver], max_steps=6, enable_checkpointing=True, max_epochs=dm.max_epochs)
    trainer.fit(tiny_lm(dm), dm)
    pl.seed_everything(5)
    dm2 = tiny_token_stream()
    model2 = tiny_lm(dm2)
    resumed_cb = _callback()
    trainer2 = quiet_trainer(tmp_path / "b", [resumed_cb], max_epochs=dm2.max_epochs)
    trainer2.fit(model2, dm2, ckpt_path=str(tmp_path / "ckpt" / "step=6.ckpt"))  # step 6 of 4 per epoch: mid task 1
    assert torch.allclose(params_vector(full), params_vector(model2), atol=1e-6)
    assert torch.allclose(flat_tensors(full_cb.state_dict()), flat_tensors(resumed_cb.state_dict()), atol=1e-6)


class AdapterProbe(Callback):
    """The adapter's tensors at every test and predict batch."""

    def __init__(self, ilora: ILoRA) -> None:
        self.ilora = ilora
        self.seen: list[tuple[str, dict[str, torch.Tensor]]] = []

    def _record(self, stage: str) -> None:
        self.seen.append((stage, {k: v.detach().clone() for k, v in self.ilora.fast_parameters().items()}))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record("test")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record("predict")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_slow_learner_is_evaluated_and_kept_and_adapter_files_written(tmp_path: Path) -> None:
    """Validation, test and predict use the slow learner, also from a checkpoint loaded in a fresh module."""
    callback = _callback(save_adapters=True, adapter_dir=str(tmp_path / "adapters"))
    probe = AdapterProbe(callback)
    model, trainer = _fit(tmp_path, callback, [probe], model=_LM(model="gpt2", **TINY_LM), enable_checkpointing=True)
    fast_now = {k: v.detach() for k, v in callback.fast_parameters().items()}
    slow = {k: v.clone() for k, v in callback._slow.items()}
    for k, v in slow.items():
        assert torch.equal(fast_now[k], v)  # ended with the slow learner
    assert callback._fast_backup is not None
    fast_after_fit = {k: v.clone() for k, v in callback._fast_backup.items()}
    assert not _same(fast_after_fit, slow)
    dm = trainer.datamodule
    trainer.test(model, datamodule=dm, verbose=False)
    trainer.predict(model, dataloaders=dm.test_dataloader()[0])
    assert [stage for stage, _ in probe.seen][:1] == ["test"] and probe.seen[-1][0] == "predict"
    assert all(_same(tensors, slow) for _, tensors in probe.seen)
    assert _same(callback._fast_backup, fast_after_fit)  # the fast learner is kept aside, not lost
    # A fresh module and callback testing from the fit's checkpoint also evaluate the slow learner.
    ckpt = trainer.checkpoint_callback.best_model_path
    fresh = _callback()
    fresh_probe = AdapterProbe(fresh)
    tester = quiet_trainer(tmp_path / "test", [fresh, fresh_probe])
    pl.seed_everything(7)
    tester.test(_LM(model="gpt2", **TINY_LM), datamodule=tiny_token_stream(), ckpt_path=ckpt, verbose=False)
    assert fresh_probe.seen and all(_same(tensors, slow) for _, tensors in fresh_probe.seen)
    files = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert files == ["task_0_fast.safetensors", "task_0_slow.safetensors", "task_1_fast.safetensors", "task_1_slow.safetensors"]
    meta = load_adapter(callback.peft_model(), tmp_path / "adapters" / "task_1_slow.safetensors")
    assert meta["learner"] == "slow" and meta["task"] == 1


@pytest.mark.parametrize("family", ["llama"])
def test_works_with_llama_and_the_official_frozen_slow_learner(tmp_path: Path, family: str) -> None:
    """slow_update="frozen" (the official code's effective behaviour): the slow learner is the adapter's
    initial state (B = 0: the pre-trained model) for the whole run, and the consistency replay runs against it."""
    callback = _callback(layers=[-1, -2], slow_update="frozen")
    recorder = Recorder(callback)
    pl.seed_everything(0)
    dm = tiny_token_stream()
    model = tiny_lm(dm, model=family)
    trainer = quiet_trainer(tmp_path, [callback, recorder], max_epochs=dm.max_epochs)
    trainer.fit(model, dm)
    assert float(trainer.callback_metrics["ilora/consistency"]) > 0
    assert any("q_proj.lora_A" in n for n in callback.fast_parameters())
    assert callback.optimizer_steps == trainer.global_step > 0
    for _, fast, slow in recorder.rows:
        assert _same(slow, recorder.start)
    assert all(torch.count_nonzero(v) == 0 for k, v in callback._slow.items() if "lora_B" in k)
    assert not _same(recorder.rows[-1][1], recorder.start)  # the fast learner did train
    with pytest.raises(ValueError, match="slow_update"):
        ILoRA(slow_update="official")


def test_accepts_a_model_that_already_has_lora(tmp_path: Path) -> None:
    from lightning_forget.lora import add_lora

    pl.seed_everything(0)
    dm = tiny_token_stream()
    model = tiny_lm(dm)
    model.model = add_lora(model.model, LoRASettings(r=3, alpha=3.0))
    callback = _callback()
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=dm.max_epochs)
    trainer.fit(model, dm)
    assert all(v.shape[0] == 3 or v.shape[1] == 3 for v in callback._slow.values())


def test_setup_errors_name_the_fix(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = tiny_token_stream()
    with pytest.raises(RuntimeError, match="model_attr"):
        quiet_trainer(tmp_path, [_callback(model_attr="backbone")], max_epochs=dm.max_epochs).fit(tiny_lm(dm), dm)


class _DictDigits:
    """Split Digits whose training and validation batches are dicts ``{"x", "y"}``."""

    @staticmethod
    def make(**kwargs: Any):
        from lightning_forget.datamodules import SplitDigits

        class DictDigits(SplitDigits):
            def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
                x, y = batch
                return {"x": x, "y": y}

        return DictDigits(**kwargs)


class _RecordingILoRA(ILoRA):
    """ILoRA that records, for every replay term, the task, the replayed inputs/labels and the term."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.terms: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        self.batch_tasks: list[int] = []

    def _replay_terms(self, pl_module, batch, batch_idx, output):
        self.batch_tasks.append(self.current_task(pl_module.trainer))
        replay = self._replay
        term = super()._replay_terms(pl_module, batch, batch_idx, output)
        if term is not None:
            fields = replay[0]
            x, y = fields[self._input_field], fields[self._target_field]
            consistency = float(pl_module.trainer.callback_metrics["ilora/consistency"])
            self.terms.append((self.batch_tasks[-1], x.clone(), y.clone(), consistency))
        return term


@pytest.mark.parametrize("layout", ["tuple", "dict"])
def test_works_with_a_vit_classifier_on_an_image_stream(tmp_path: Path, layout: str) -> None:
    """lightning_forget.nn.ViT (a transformers ViTModel from a config) inside ContinualClassifier on Split Digits."""
    from lightning_forget.datamodules import SplitDigits
    from lightning_forget.modules import ContinualClassifier
    from lightning_forget.nn import ViT

    pl.seed_everything(0)
    kwargs = dict(classes_per_task=[4, 3, 3], batch_size=16)
    dm = SplitDigits(**kwargs) if layout == "tuple" else _DictDigits.make(**kwargs)
    model = ContinualClassifier(
        backbone=ViT((1, 8, 8), patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
        num_classes=10, input_shape=(1, 8, 8), num_tasks=3, report=False,
    )
    backbone_before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    callback = _RecordingILoRA(lora=dict(LORA), buffer_size=40, save_adapters=False, model_attr="backbone",
                               ema=0.9, inference_learner="fast")
    recorder = Recorder(callback)
    trainer = quiet_trainer(tmp_path, [callback, recorder], max_epochs=3, limit_train_batches=6, limit_val_batches=2)
    trainer.fit(model, dm)

    # Only the backbone's LoRA factors train in the backbone; its ViT weights are untouched.
    fast = callback.fast_parameters()
    assert fast and all(".lora_" in n for n in fast)
    for name, p in model.backbone.named_parameters():
        if ".lora_" in name:
            continue
        base = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert not p.requires_grad, name
        torch.testing.assert_close(p.detach(), backbone_before[base], rtol=0, atol=0)
    start = recorder.start
    assert any(not torch.equal(fast[k].detach(), start[k]) for k in fast)  # the fast adapter learned
    # The backbone's trained parameters are the adapter's; the head (outside the backbone) is the module's.
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"backbone.{n}" for n in fast} | {"head.weight", "head.bias"}
    assert all(grads <= trained for grads in recorder.grads)

    # The slow learner followed the fast one once per optimizer step and differs from it.
    assert callback.optimizer_steps == trainer.global_step == 18
    assert all(not torch.equal(callback._slow[k], start[k]) for k in start if "lora_B" in k)
    assert any(not torch.equal(callback._slow[k], fast[k].detach()) for k in fast)

    # The consistency replay runs on every step from task 1 on (never in task 0), on image rows.
    assert callback.batch_tasks.count(0) == 6 and len(callback.batch_tasks) == 18
    assert [t for t, *_ in callback.terms] == [1] * 6 + [2] * 6
    old_rows = 0
    for task, x, y, consistency in callback.terms:
        assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32
        assert y.dtype == torch.long and y.shape == (16,)
        assert set(y.tolist()) <= {c for t in range(task + 1) for c in dm.classes_of_task(t)}
        old_rows += sum(int(c) in dm.classes_of_task(0) for c in y.tolist())
        assert consistency >= 0 and consistency == consistency
    assert old_rows > 0  # earlier tasks' images are replayed
    assert any(c > 0 for *_, c in callback.terms)  # the slow learner lags: the penalty is active


# ---------------------------------------------------------------- issue 24
class _ViTModule(pl.LightningModule):
    """A user's module around a Hugging Face ViTForImageClassification with a fresh head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, num_labels=10)
        self.model = ViTForImageClassification(config)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.model(pixel_values=x).logits, y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_hugging_face_classification_head_is_trained(tmp_path: Path) -> None:
    from lightning_forget.datamodules import SplitDigits

    pl.seed_everything(0)
    dm = SplitDigits(classes_per_task=[5, 5], batch_size=16)
    module = _ViTModule()
    head_before = module.model.classifier.weight.detach().clone()
    callback = ILoRA(lora=dict(LORA), buffer_size=32, save_adapters=False, ema=0.9)
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=dm.max_epochs, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, dm)
    heads = [n for n in callback.fast_parameters() if "classifier.modules_to_save" in n]
    assert heads  # the head belongs to the adapter: trained, and interpolated by the slow learner
    fast = callback._fast_backup  # the fit ended with the slow learner in the adapter
    for name in heads:
        if name.endswith("weight"):
            assert not torch.allclose(fast[name], head_before)
            assert not torch.equal(callback._slow[name], head_before)
    assert not any(n.startswith("classifier") for n in callback.fast_parameters() if "lora_" in n)


def test_lora_argument_errors_name_the_fields(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"lora.*\['r', 'alpha'.*'rank'"):
        ILoRA(lora={"rank": 8})
    with pytest.raises(TypeError, match="lora"):
        ILoRA(lora=3)

    class NoBlocks(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

    with pytest.raises(RuntimeError, match=r"lora=\{'target_modules'"):
        _callback()._wrap(NoBlocks())
    module = NoBlocks()
    _callback(lora={**LORA, "target_modules": ["0", "2"]})._wrap(module)  # the fix works
    assert any("lora_A" in n for n, _ in module.named_parameters())


from lightning_forget.datamodules import TextStreamDataModule  # noqa: E402


class RankDrawingStream(TextStreamDataModule):
    """The tiny token stream, whose ``setup`` draws from the global RNG a rank-dependent number of times
    (as a user's data preparation may): each rank's LoRA initialisation differs before DDP's broadcast."""

    def setup(self, stage: str = "fit") -> None:
        super().setup(stage)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        torch.rand(1 + 5 * rank)


def _rank_drawing_stream(epochs_per_task: int = 1) -> TextStreamDataModule:
    dm = tiny_token_stream(epochs_per_task)
    dm.__class__ = RankDrawingStream  # the same stream, with the rank-dependent draw in setup()
    return dm


@pytest.mark.ddp
def test_ddp_slow_learner_equal_on_ranks_with_rank_dependent_draws(tmp_path: Path) -> None:
    from tests.helpers.harness import run_ddp_pair

    result = run_ddp_pair(tmp_path, lambda: ILoRA(lora=dict(LORA), buffer_size=12, ema=0.99, save_adapters=False),
                          make_data=_rank_drawing_stream, make_model=tiny_lm)
    assert result["equal_length"] and result["world_size"] == 2, result
    assert result["max_param_diff"] == 0.0, result
    assert result["max_state_diff"] == 0.0, result  # the slow learner (in the state) agrees too


def test_slow_learner_moves_with_lambda_near_one_on_a_bf16_model() -> None:
    """λ = 0.999 on bf16 weights: each increment (1 − λ)·(θ_fast − θ_slow) is far below bf16's resolution,
    yet the float32 slow copy follows the hand-computed interpolation."""
    pl.seed_everything(0)
    model = tiny_lm().to(torch.bfloat16)
    callback = _callback(ema=0.999)
    callback._wrap(model)
    callback._sync_device()
    with torch.no_grad():
        for p in callback.fast_parameters().values():
            p.add_(0.01)  # the fast learner moved away from the slow one
    start = {k: v.clone() for k, v in callback._slow.items()}
    fast = {k: p.detach().float() for k, p in callback.fast_parameters().items()}
    callback.optimizer_steps = 10**6  # long into the run: λ_s = λ
    for _ in range(20):
        callback.update_slow()
    keep = 0.999 ** 20
    for k, value in callback._slow.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, keep * start[k] + (1 - keep) * fast[k], rtol=1e-5, atol=1e-6)
    moved = max(float((callback._slow[k] - start[k]).abs().max()) for k in start)
    assert moved == pytest.approx(0.01 * (1 - keep), rel=1e-2)


def test_adapter_files_without_a_checkpoint_folder_go_to_the_results_folder(tmp_path: Path) -> None:
    """No `adapter_dir`, no checkpoint callback: the logger's directory (reporting's rule), like every
    other output of the run; without a logger, default_root_dir."""
    from types import SimpleNamespace

    callback = _callback(save_adapters=True)
    with_logger = SimpleNamespace(checkpoint_callback=None, log_dir=str(tmp_path / "logs" / "version_3"),
                                  default_root_dir=str(tmp_path))
    assert callback._adapter_folder(with_logger) == tmp_path / "logs" / "version_3" / "adapters"
    without = SimpleNamespace(checkpoint_callback=None, log_dir=None, default_root_dir=str(tmp_path))
    assert callback._adapter_folder(without) == tmp_path / "adapters"
    checkpointed = SimpleNamespace(checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path / "ckpt")), log_dir=None,
                                   default_root_dir=str(tmp_path))
    assert callback._adapter_folder(checkpointed) == tmp_path / "ckpt"
