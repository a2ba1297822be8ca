"""LM unlearning callbacks (token-level GA, NPO, SimNPO, IdkPO, RMU) on CausalLMModule, with and without LoRA."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_forget.callbacks import NPO, RMU, GradDiff, GradientAscent, IdkPO, SimNPO
from lightning_forget.datamodules import FictitiousQADataModule
from lightning_forget.modules.causal_lm import CausalLMModule, causal_lm_loss
from lightning_forget.unlearning import losses as L
from tests.helpers.harness import quiet_trainer


def _data() -> FictitiousQADataModule:
    return FictitiousQADataModule(num_people=10, questions_per_person=2, num_countries=0, forget_percent=20,
                                  phase="unlearn", batch_size=2)


def _model(dm: FictitiousQADataModule, lora: bool = False) -> CausalLMModule:
    pl.seed_everything(0)
    module = CausalLMModule(n_layer=2, n_embd=32, n_head=2, block_size=dm.block_size)
    if lora:
        from peft import LoraConfig, inject_adapter_in_model

        for p in module.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]), module.model)
    return module


def _fit(tmp_path: Any, callback: Any, module: CausalLMModule, dm: FictitiousQADataModule, steps: int = 1) -> pl.Trainer:
    trainer = quiet_trainer(tmp_path, [callback], max_steps=steps, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return trainer


def _first_batch(dm: FictitiousQADataModule) -> dict[str, Any]:
    return next(iter(dm.train_dataloader()))


def test_token_level_gradient_ascent_is_minus_the_shifted_lm_loss(tmp_path: Any) -> None:
    dm = _data()
    module = _model(dm)
    forget = _first_batch(dm)["forget"]
    with torch.no_grad():
        expected = -float(causal_lm_loss(module(forget["input_ids"], forget["attention_mask"]), forget["labels"]))
    trainer = _fit(tmp_path, GradientAscent(save_original=False), module, dm)
    assert float(trainer.callback_metrics["ga/forget_loss"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_npo_and_idkpo_start_at_two_over_beta_log_two(tmp_path: Any, lora: bool) -> None:
    dm = _data()
    npo = NPO(beta=0.1, save_original=False)
    trainer = _fit(tmp_path, npo, _model(dm, lora), dm)
    assert float(trainer.callback_metrics["npo/forget_loss"]) == pytest.approx(20 * math.log(2), rel=1e-5)
    assert npo.reference is not None and npo.reference.kind == ("adapters_disabled" if lora else "copy")
    idk = IdkPO(beta=0.5, save_original=False)
    trainer = _fit(tmp_path, idk, _model(dm, lora), dm)
    assert float(trainer.callback_metrics["idkpo/forget_loss"]) == pytest.approx(4 * math.log(2), rel=1e-5)


def test_idkpo_batch_keeps_the_question_and_answers_i_dont_know() -> None:
    dm = _data()
    forget = _first_batch(dm)["forget"]
    idk = IdkPO(idk_answers=["I don't know."]).idk_batch(forget, torch.Generator().manual_seed(0))
    for i in range(2):
        answer = idk["labels"][i][idk["labels"][i] >= 0].tolist()
        assert bytes(answer[:-1]).decode() == "I don't know." and answer[-1] == 256
        start = int((forget["labels"][i] != -100).nonzero()[0])
        assert torch.equal(idk["input_ids"][i, :start], forget["input_ids"][i, :start])


def test_simnpo_first_step_matches_the_formula_and_builds_no_reference(tmp_path: Any) -> None:
    dm = _data()
    module = _model(dm)
    forget = _first_batch(dm)["forget"]
    with torch.no_grad():
        logits, labels = L.shift_for_next_token(module(forget["input_ids"], forget["attention_mask"]), forget["labels"])
        nll = -L.sequence_log_prob(logits, labels) / L.answer_lengths(labels)
    expected = 0.125 * float(-(2 / 4.5) * torch.nn.functional.logsigmoid(4.5 * nll).mean())
    callback = SimNPO(save_original=False)
    trainer = _fit(tmp_path, callback, module, dm)
    assert float(trainer.callback_metrics["simnpo/forget_loss"]) == pytest.approx(expected, rel=1e-5)
    assert callback.reference is None


def test_rmu_steers_the_chosen_layer_toward_the_seeded_control_vector(tmp_path: Any) -> None:
    dm = _data()
    module = _model(dm)
    forget = _first_batch(dm)["forget"]
    captured: list[torch.Tensor] = []
    handle = module.model.transformer.h[1].register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        module(forget["input_ids"], forget["attention_mask"])
    handle.remove()
    control = L.rmu_control_vector(32, 2.0, torch.Generator().manual_seed(0))
    expected = float(L.activation_mse(captured[0], control, forget["labels"]))
    callback = RMU(save_original=False, trainable_params=r"model\.transformer\.h\.(0|1)\.mlp\.c_proj\.weight")
    trainer = _fit(tmp_path, callback, module, dm)
    assert callback.layer_name == "model.transformer.h.1"
    assert float(trainer.callback_metrics["rmu/forget_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(trainer.callback_metrics["rmu/retain_loss"]) == pytest.approx(0.0, abs=1e-10)  # θ = reference
    assert torch.equal(callback.control_vector(32), control)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["model.transformer.h.0.mlp.c_proj.weight", "model.transformer.h.1.mlp.c_proj.weight"]


def test_lm_methods_refuse_bad_arguments_and_non_lm_batches(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="beta"):
        NPO(beta=0.0)
    with pytest.raises(ValueError, match="idk_answers"):
        IdkPO(idk_answers=[])
    with pytest.raises(ValueError, match="layer"):
        RMU(layer="(")
    dm = _data()
    with pytest.raises(RuntimeError, match="layer"):
        _fit(tmp_path, RMU(layer=r"nothing\.here", save_original=False), _model(dm), dm)
    with pytest.raises(RuntimeError, match="causal-LM sub-batches"):
        NPO().forget_loss(None, (torch.zeros(1), torch.zeros(1)))  # type: ignore[arg-type]


def test_saliency_mask_works_on_lm_batches(tmp_path: Any) -> None:
    # the mask's pass over the forget set collates QA rows and uses the aligned next-token CE
    dm = _data()
    callback = NPO(mask_fraction=0.5, save_original=False)
    _fit(tmp_path, callback, _model(dm), dm)
    assert callback.mask is not None and callback.mask.fraction == pytest.approx(0.5, abs=0.01)



class _UserHFModule(pl.LightningModule):
    """A user's LM: a Hugging Face model in ``self.model``, no ``forward``; the loss is the model's own."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


@pytest.mark.parametrize("make", [
    lambda **kw: GradientAscent(**kw), lambda **kw: GradDiff(retain_loss="kl", **kw), lambda **kw: NPO(**kw),
    lambda **kw: SimNPO(**kw), lambda **kw: IdkPO(**kw), lambda **kw: RMU(**kw),
], ids=["GA", "GradDiff-kl", "NPO", "SimNPO", "IdkPO", "RMU"])
def test_lm_methods_call_the_users_forward_fn(tmp_path: Any, make: Any) -> None:
    # The same step through CausalLMModule's forward and through a module without forward whose
    # HF model `forward_fn="model"` names (its output's .logits read): same losses, same weights.
    dm = _data()
    reference = _model(dm)
    trainer = _fit(tmp_path / "module", make(save_original=False), reference, dm)
    expected = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k and not k.startswith("train/")}
    user = _UserHFModule(_model(dm).model)
    trainer = _fit(tmp_path / "user", make(save_original=False, forward_fn="model"), user, dm)
    got = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k and not k.startswith("train/")}
    assert set(got) == set(expected) and any(k.endswith("forget_loss") for k in got)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for (name, p), q in zip(reference.model.named_parameters(), user.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
