"""Concept erasure: each method's target against a hand computation on a tiny UNet, UCE's closed form against a
least-squares solve, the frozen teacher, the parameter sets, LoRA, erasure in sequence, and the evaluation."""

from __future__ import annotations

import copy
import json
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.callbacks import ESD, UCE, ConceptAblation, DoCo, SalUnDiffusion
from lightning_forget.callbacks.erasure_eval import ErasureEvaluation, evaluate_erasure
from lightning_forget.distributed import rank_generator
from lightning_forget.modules.diffusion import ddim_sample, digits_data
from lightning_forget.unlearning.erasure import parameter_set, uce_closed_form
from lightning_forget.unlearning.erasure_eval import erasure_scores
from tests.helpers.diffusion import tiny_diffusion


def _loader(n: int = 16, classes: int = 6) -> DataLoader:
    x, y = digits_data()
    keep = y < classes
    return DataLoader(TensorDataset(x[keep][:n], y[keep][:n]), batch_size=8)


def _trainer(tmp_path: Any, callbacks: list, steps: int = 2, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks, **kwargs)


def _attached(module: Any, tmp_path: Any) -> Any:
    """The module with a (not yet fitted) Trainer attached, as inside a step at global step 0 on rank 0."""
    module.trainer = _trainer(tmp_path, [])
    return module


def _perturb(module: Any, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


# ---------------------------------------------------------------------- targets by hand
def test_esd_loss_is_the_negative_guidance_target_of_the_teacher_on_teacher_ddim_samples(tmp_path: Any) -> None:
    torch.manual_seed(0)
    module = _attached(tiny_diffusion(), tmp_path)
    callback = ESD(erase=[2, "4"], negative_guidance=1.5, ddim_steps=3, batch_size=3, seed=4)
    callback._get_teacher(module)  # the teacher: the weights as they are now
    teacher = copy.deepcopy(module).eval()
    _perturb(module)  # the model being trained moves away from its teacher
    loss = callback.erasure_loss(module, None, [2, 4], [0, 1, 3, 5])
    # by hand, drawing in the callback's order: the concepts, the stop step, x_T
    generator = rank_generator(4, 0, 0)
    labels = torch.tensor([2, 4])[torch.randint(0, 2, (3,), generator=generator)]
    stop = int(torch.randint(0, 3, (1,), generator=generator))
    noise = torch.randn((3, 1, 8, 8), generator=generator)
    with torch.no_grad():
        x_t, t = ddim_sample(teacher.eps, teacher.noise_scheduler, labels, noise, 6, 3, 3.0, stop_after=stop)
        eps_c = teacher.eps(x_t, t, labels)
        eps_null = teacher.eps(x_t, t, torch.full_like(labels, 6))
    target = eps_null - 1.5 * (eps_c - eps_null)
    expected = ((module.eps(x_t, t, labels) - target) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    # the gradient reaches the trained model only (the teacher's outputs are constants)
    grads = torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad], allow_unused=True)
    hand = torch.autograd.grad(expected, [p for p in module.parameters() if p.requires_grad], allow_unused=True)
    assert all((a is None and b is None) or torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, hand))
    # erase_from replaces the null concept as the target's base
    callback_from = ESD(erase=[2], erase_from=1, ddim_steps=3, seed=4)
    callback_from._get_teacher(module)
    generator = rank_generator(4, 0, 0)
    labels = torch.tensor([2])[torch.randint(0, 1, (1,), generator=generator)]
    stop = int(torch.randint(0, 3, (1,), generator=generator))
    noise = torch.randn((1, 1, 8, 8), generator=generator)
    frozen = copy.deepcopy(module).eval()
    with torch.no_grad():
        x_t, t = ddim_sample(frozen.eps, frozen.noise_scheduler, labels, noise, 6, 3, 3.0, stop_after=stop)
        base = frozen.eps(x_t, t, torch.ones_like(labels))
        target = base - (frozen.eps(x_t, t, labels) - base)
        expected = ((frozen.eps(x_t, t, labels) - target) ** 2).mean()
    assert torch.allclose(callback_from.erasure_loss(module, None, [2], []), expected, atol=1e-6)


def test_concept_ablation_maps_the_target_onto_the_stopgrad_anchor_prediction_of_the_same_model(tmp_path: Any) -> None:
    torch.manual_seed(0)
    module = _attached(tiny_diffusion(), tmp_path)
    callback = ConceptAblation(erase=[3], anchor=1, num_anchor_samples=4, sample_steps=2, batch_size=2,
                               prior_preservation=True, prior_weight=0.5, seed=2)
    callback._get_teacher(module)
    teacher = copy.deepcopy(module).eval()
    _perturb(module)
    loss = callback.erasure_loss(module, None, [3], [0, 1, 2, 4, 5])
    anchors = teacher.sample(torch.full((4,), 1), seed=2 + 7919 * -1, num_steps=2)  # the teacher's anchor images
    assert torch.allclose(callback.anchor_images(module), anchors, atol=1e-6)
    generator = rank_generator(2, 0, 0)
    rows = torch.randint(0, 4, (2,), generator=generator)
    pick = torch.randint(0, 1, (2,), generator=generator)
    t = torch.randint(0, 50, (2,), generator=generator)
    noise = torch.randn((2, 1, 8, 8), generator=generator)
    x_t = module.add_noise(anchors[rows], noise, t)
    target_labels, anchor_labels = torch.tensor([3, 3])[pick], torch.tensor([1, 1])
    target = module.eps(x_t, t, anchor_labels).detach()  # the same (trained) model, no gradient through it
    expected = ((module.eps(x_t, t, target_labels) - target) ** 2).mean()
    expected = expected + 0.5 * ((module.eps(x_t, t, anchor_labels) - noise) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    params = [p for p in module.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(loss, params, allow_unused=True), torch.autograd.grad(expected, params, allow_unused=True)):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


def test_uce_closed_form_equals_a_direct_least_squares_solve() -> None:
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    c_e, c_g, c_p = (torch.randn(n, 4, generator=generator, dtype=torch.float64) for n in (2, 2, 3))
    s_e, s_p, lamb = 1.3, 0.7, 0.5
    edited = uce_closed_form(w0, c_e, c_g, c_p, s_e, s_p, lamb)
    # argmin_W s_e Σ‖W c_i − W0 g_i‖² + s_p Σ‖W c_j − W0 c_j‖² + λ‖W − W0‖²: stacked least squares per output row
    a = torch.cat([s_e ** 0.5 * c_e, s_p ** 0.5 * c_p, lamb ** 0.5 * torch.eye(4, dtype=torch.float64)])
    b = torch.cat([s_e ** 0.5 * c_g @ w0.T, s_p ** 0.5 * c_p @ w0.T, lamb ** 0.5 * w0.T])
    direct = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(edited, direct, atol=1e-10)
    # without preserved concepts the preservation terms vanish
    a2, b2 = a[[0, 1, 5, 6, 7, 8]], b[[0, 1, 5, 6, 7, 8]]
    assert torch.allclose(uce_closed_form(w0, c_e, c_g, None, s_e, s_p, lamb), torch.linalg.lstsq(a2, b2).solution.T, atol=1e-10)


def test_uce_callback_edits_only_cross_attention_kv_at_task_start_and_sends_the_concept_to_its_guide(tmp_path: Any) -> None:
    torch.manual_seed(0)
    module = tiny_diffusion(lr=1e-9)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    null_token = module.concept_token(None).detach().clone()
    erased_token = module.concept_token(2).detach().clone()
    callback = UCE(erase=[2], erase_scale=1e4, keep=[0, 1])
    edited: dict[str, torch.Tensor] = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if not edited:
                edited.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    _trainer(tmp_path, [callback, Spy()], steps=1).fit(module, _loader())
    changed = [n for n in before if not torch.equal(before[n], edited[n])]
    assert changed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)
    for name in changed:  # W c_erased ≈ W0 c_null with a large erase scale
        w0, w = before[name], edited[name]
        assert torch.allclose(w @ erased_token, w0 @ null_token, atol=1e-2)
    with pytest.raises(ValueError, match="cross-attention"):
        from lightning_forget.callbacks.erasure import erase_with_uce

        erase_with_uce(tiny_diffusion(unet="class"), [1])


# ---------------------------------------------------------------------- parameter sets, teacher, LoRA, sequence
def test_parameter_sets_follow_esd_names_on_both_unets() -> None:
    cond = tiny_diffusion().unet
    x, _ = parameter_set(cond, "x")
    u, _ = parameter_set(cond, "u")
    strict, _ = parameter_set(cond, "x-strict")
    assert x and all(".attn2." in n for n in x)
    assert u and not any(".attn2." in n for n in u) and not set(x) & set(u)
    assert strict and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in strict)
    assert all(".ff." in n for n in parameter_set(cond, "ffn")[0])
    plain = tiny_diffusion(unet="class").unet
    px, _ = parameter_set(plain, "x")
    assert "class_embedding.weight" in px and all(n == "class_embedding.weight" or ".time_emb_proj." in n for n in px)
    assert not set(px) & set(parameter_set(plain, "u")[0])
    with pytest.raises(ValueError, match="parameters"):
        parameter_set(plain, "ffn")
    with pytest.raises(ValueError, match="parameters"):
        parameter_set(plain, "noxattn")


def test_esd_in_sequence_trains_only_its_set_keeps_a_frozen_teacher_and_reports(tmp_path: Any) -> None:
    torch.manual_seed(0)
    module = tiny_diffusion()
    callback = ESD(erase=[[0], [2]], ddim_steps=2, batch_size=2)
    evaluation = ErasureEvaluation(erase=[[0], [2]], samples_per_class=2, judge_epochs=1, num_steps=2, grid_per_class=2,
                                   log_dir=str(tmp_path / "out"))
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    _trainer(tmp_path, [evaluation, callback], steps=2).fit(module, _loader())
    after_first = {n: p.detach().clone() for n, p in module.named_parameters()}
    changed = [n for n in start if not torch.equal(start[n], after_first[n])]
    assert changed and all(".attn2." in n for n in changed)
    # the teacher is the model at the task's start, frozen (saved in the state as taken)
    assert all(torch.equal(callback._teacher_state[n], start[n]) for n in start)
    assert all(not p.requires_grad for n, p in module.named_parameters() if ".attn2." not in n)
    # task 1 (the next fit) erases concept 2 from the model left by task 0: its teacher is that model
    _trainer(tmp_path, [evaluation, callback], steps=2).fit(module, _loader())
    assert all(torch.equal(callback._teacher_state[n], after_first[n]) for n in after_first)
    rows = json.loads((tmp_path / "out" / "erasure.json").read_text())["rows"]
    assert [r["tag"] for r in rows] == ["before", "task0", "task1"]
    assert rows[1]["erased"] == [0] and rows[2]["erased"] == [0, 2]
    for tag in ("before", "task0", "task1"):
        assert (tmp_path / "out" / f"erasure_samples_{tag}.png").stat().st_size > 0
    assert set(rows[2]) >= {"erased_rate", "erased_prob", "false_erased_rate", "retained_acc", "fd"}


def test_lora_trains_adapters_only_with_the_teacher_as_adapters_disabled_and_merges_at_task_end(tmp_path: Any) -> None:
    torch.manual_seed(0)
    module = tiny_diffusion(unet="class", lr=1e-2)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 20, 45]), torch.tensor([0, 1, 6])
    with torch.no_grad():
        original = module.eps(x, t, y)
    callback = ESD(erase=[1], parameters="x", lora_rank=2, ddim_steps=2)
    seen: dict[str, Any] = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            seen["teacher"] = callback.teacher_eps(pl_module, x, t, y)
            with torch.no_grad():
                seen["model"] = pl_module.eps(x, t, y)

    _trainer(tmp_path, [Spy(), callback], steps=2).fit(module, _loader())  # the spy runs before the task end
    assert callback.teacher is not None and callback.teacher.kind == "adapters_disabled"
    assert callback._teacher_state is None  # no copy of the weights
    assert torch.allclose(seen["teacher"], original, atol=1e-6)  # the base model while the adapters train
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0] for n in trainable}
    assert all(n == "unet.class_embedding" or n.endswith("time_emb_proj") for n in targets)  # ESD-x on a UNet2DModel
    # task end: merged into the base weights, lora_B zeroed, the model's outputs unchanged by the merge
    assert all(p.abs().sum() == 0 for n, p in module.named_parameters() if ".lora_B." in n)
    with torch.no_grad():
        assert torch.allclose(module.eps(x, t, y), seen["model"], atol=1e-5)
        assert not torch.allclose(module.eps(x, t, y), original, atol=1e-6)


def test_concept_ablation_default_trains_cross_attention_kv_only(tmp_path: Any) -> None:
    torch.manual_seed(0)
    module = tiny_diffusion()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    _trainer(tmp_path, [ConceptAblation(erase="3", num_anchor_samples=2, sample_steps=2, batch_size=2)], steps=1).fit(module, _loader())
    changed = [n for n, p in module.named_parameters() if not torch.equal(start[n], p)]
    assert changed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)


def test_setup_refuses_a_concept_the_model_lacks_and_a_module_without_the_protocol(tmp_path: Any) -> None:
    with pytest.raises(RuntimeError, match="erase"):
        _trainer(tmp_path, [ESD(erase="cat")], steps=1).fit(tiny_diffusion(), _loader())
    from tests.helpers.harness import tiny_classifier
    from tests.helpers.data import BlobStream

    dm = BlobStream()
    with pytest.raises(RuntimeError, match="DiffusionModule"):
        _trainer(tmp_path, [ESD(erase=1)], steps=1, reload_dataloaders_every_n_epochs=1).fit(tiny_classifier(dm), dm)


# ---------------------------------------------------------------------- evaluation
def test_erasure_scores_by_hand() -> None:
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1], [0.2, 0.1, 0.7], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    intended = torch.tensor([1, 1, 0, 0, 2, 2])
    scores = erasure_scores(probs, intended, erased=[1], kept=[0, 2])
    assert scores["erased_rate"] == pytest.approx(0.5)  # sample 0 judged 1, sample 1 judged 0
    assert scores["erased_prob"] == pytest.approx((0.8 + 0.3) / 2)
    assert scores["retained_acc"] == pytest.approx(2 / 4)  # samples 2 and 5
    assert scores["false_erased_rate"] == pytest.approx(0.0)


def test_evaluation_does_not_depend_on_the_number_of_processes() -> None:
    torch.manual_seed(0)
    module = tiny_diffusion()
    judge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6))
    x, y = digits_data()
    keep = y < 6
    args = dict(samples_per_class=3, seed=1, num_steps=2)
    one, images, labels = evaluate_erasure(module, judge, [1], [0, 2, 3, 4, 5], x[keep][:40], y[keep][:40], **args)
    # two ranks: rank 1 runs first and records what it hands to all_gather; rank 0 then gathers both
    recorded: list[torch.Tensor] = []

    def record(t: torch.Tensor) -> torch.Tensor:
        recorded.append(t)
        return torch.stack([t, t])

    evaluate_erasure(module, judge, [1], [0, 2, 3, 4, 5], x[keep][:40], y[keep][:40], rank=1, world_size=2, gather=record, **args)
    calls = iter(recorded)
    gathered, g_images, g_labels = evaluate_erasure(
        module, judge, [1], [0, 2, 3, 4, 5], x[keep][:40], y[keep][:40], rank=0, world_size=2,
        gather=lambda t: torch.stack([t, next(calls)]), **args)
    assert torch.equal(g_labels, labels) and torch.allclose(g_images, images, atol=1e-5)
    for key in ("erased_rate", "erased_prob", "retained_acc", "false_erased_rate"):
        assert gathered[key] == pytest.approx(one[key])
        assert 0.0 <= one[key] <= 1.0
    assert images.shape == (18, 1, 8, 8) and labels.tolist() == [c for c in range(6) for _ in range(3)]


def test_gpu_scale_config_parses() -> None:
    # configs/erasure/sd_esd.gpu.yml needs a local Stable-Diffusion-style folder and a GPU: parse it only.
    from pathlib import Path

    from lightning_forget.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "erasure" / "sd_esd.gpu.yml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)


def test_model_parallel_runs_the_erasure_methods_and_refuses_conv_lora_naming_the_fix() -> None:
    # ESD, UCE and ConceptAblation run under ModelParallelStrategy (tests/test_sharded_contract.py, group "erasure"); ESD's LoRA
    # merge is shard-wise for linear layers: setup refuses LoRA on convolutions with the reason and the fix.
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(RuntimeError, match=r"lora_rank=2, parameters='all'\) under ModelParallelStrategy puts LoRA on "
                                           r"layers that are not Linear.*Fix: a set of linear layers"):
        ESD(erase=[1], lora_rank=2, parameters="all").setup(trainer, tiny_diffusion(), "validate")
    ESD(erase=[1], lora_rank=2).setup(trainer, tiny_diffusion(), "validate")  # LoRA on linears: group "erasure_lora"
    ESD(erase=[1]).setup(trainer, tiny_diffusion(), "validate")
    UCE(erase=[1]).setup(trainer, tiny_diffusion(), "validate")
    ConceptAblation(erase=[1]).setup(trainer, tiny_diffusion(), "validate")
    # DoCo and SalUnDiffusion run sharded (group "erasure_b"); their LoRA (not checked sharded, unlike ESD's) is refused
    DoCo(erase=[1]).setup(trainer, tiny_diffusion(), "validate")
    SalUnDiffusion(erase=[1]).setup(trainer, tiny_diffusion(), "validate")
    for method in (DoCo, SalUnDiffusion):
        with pytest.raises(RuntimeError, match=rf"{method.__name__}\(lora_rank=2\) under ModelParallelStrategy.*Fix"):
            method(erase=[1], lora_rank=2).setup(trainer, tiny_diffusion(), "validate")


def test_evaluation_samples_as_many_images_on_every_rank_and_gathers_the_one_process_result() -> None:
    # 6 classes × 3 samples over 4 ranks: shares of 5, 5, 4, 4. Every rank samples 5 (a sharded model's forwards
    # are collective), and the padding stays out of the scores and of the gathered samples.
    torch.manual_seed(0)
    module = tiny_diffusion()
    judge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6))
    x, y = digits_data()
    args = dict(samples_per_class=3, seed=1, num_steps=1)
    sampled: list[int] = []
    sample = module.sample

    def counting(labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        sampled.append(len(labels))
        return sample(labels, **kwargs)

    module.sample = counting  # type: ignore[method-assign]
    one, images, labels = evaluate_erasure(module, judge, [1], [0, 2, 3, 4, 5], x[:40], y[:40], **args)
    recorded: dict[int, list[torch.Tensor]] = {}
    for rank in (1, 2, 3):
        recorded[rank] = []
        evaluate_erasure(module, judge, [1], [0, 2, 3, 4, 5], x[:40], y[:40], rank=rank, world_size=4,
                         gather=lambda t, rank=rank: recorded[rank].append(t) or torch.stack([t] * 4), **args)
    calls = iter(range(3))

    def gather(t: torch.Tensor) -> torch.Tensor:
        i = next(calls)
        return torch.stack([t, *(recorded[r][i] for r in (1, 2, 3))])

    gathered, g_images, g_labels = evaluate_erasure(module, judge, [1], [0, 2, 3, 4, 5], x[:40], y[:40], rank=0,
                                                    world_size=4, gather=gather, **args)
    assert sampled == [18, 5, 5, 5, 5]
    assert torch.equal(g_labels, labels) and torch.allclose(g_images, images, atol=1e-5)
    for key in ("erased_rate", "erased_prob", "retained_acc", "false_erased_rate"):
        assert gathered[key] == pytest.approx(one[key])
