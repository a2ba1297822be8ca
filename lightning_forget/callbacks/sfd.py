"""SFD: score forgetting distillation into a one-step generator, data-free."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn.utils.stateless import _reparametrize_module

from lightning_forget.callbacks.erasure import ConceptSpec, ErasureMethod, check_optional_concept
from lightning_forget.gradients import average_gradients, compute_gradients, input_vjp
from lightning_forget.modules.diffusion import Concept
from lightning_forget.precision import forward_context
from lightning_forget.sharding import full_tensor, is_sharded, local_clone, local_view, reshard, shard_like
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES
from lightning_forget.unlearning.distill import fake_score_loss, sid_generator_loss
from lightning_forget.unlearning.reference import local_shards_swapped
from lightning_forget.validation import check_float, check_int, message

__all__ = ["SFD"]


class SFD(ErasureMethod):
    """SFD: distil the model into a one-step generator whose forgotten class imitates another class's scores.

    Chen et al., "Score Forgetting Distillation: A Swift, Data-Free Method for Machine Unlearning in
    Diffusion Models" (ICLR 2025), ``DDPM/runners/diffusion.py: train_sfd`` with
    ``configs/cifar10_sfd.yml``. Three networks: the frozen teacher ``p`` (the model at the task's
    start), a **fake-score** network ``s`` (a trainable copy of it, owned by this callback, with its
    own Adam) and the **generator** ``G`` (the module itself, started from the teacher), which maps
    noise to an image in one step: ``x₀ = x̂₀(σ z, t_init, G(σ z, t_init, c))``,
    ``σ = √(1 − ᾱ_{t_init})``. Each step, with classes ``c`` drawn from the kept concepts (no data
    is read) and ``c_f`` from the erased ones:

    1. ``s`` learns the scores of ``G``'s current samples: ``Σ_pixels (ε − ε_s(x_t, t, c))²`` on
       ``G``'s samples of ``c`` plus ``fake_forget_weight`` × the same on its samples of ``c_f``
       (with ``c_f``), ``t ∈ [t_min, t_max)``; gradients averaged across ranks, clipped by value,
       one Adam step;
    2. ``G`` minimises score identity distillation
       (:func:`~lightning_forget.unlearning.distill.sid_generator_loss`) between the teacher's and
       ``s``'s ``x₀``-predictions on its own samples: for ``c`` the teacher is asked about ``c``;
       for the forgotten ``c_f`` (weight ``forget_weight``) it is asked about the **override**
       class, so ``G``'s samples of ``c_f`` are pulled toward another class's distribution.

    After the fit the module is a one-step generator: :meth:`generate` samples it (not the DDIM
    sampler of the module). Defaults are the official config's (``t_init``/``t_min``/``t_max``
    440/38/712 of 1,000 steps, here fractions of ``T``; α = 1.2; weights 1 and 0.01 for both
    networks; the fake score's Adam lr 1e-5, betas (0, 0.999), value clip 1; batch 128; the
    override ``(c_f + 1) mod K``, the config's ``label_to_override: 1`` when forgetting class 0).
    The generator's optimizer (the same Adam, value clip 1 through ``gradient_clip_algorithm="value"``,
    50,000 iterations) and EMA (0.9999) are the module's and the trainer's to set.

    Args:
        erase: the concepts to forget.
        override: the class the teacher is asked about for forgotten samples: ``None`` (``(c_f + 1)
            mod K``), ``"random"`` (a random kept class per sample, the code's ``pseudo_label_type:
            rand``) or a concept.
        alpha: SiD's α (default 1.2).
        t_init: the generator's timestep as a fraction of ``T`` (default 0.44).
        t_min: the lowest timestep of both losses as a fraction of ``T`` (default 0.038).
        t_max: the end of their range (exclusive) as a fraction of ``T`` (default 0.712).
        batch_size: samples per step of each kind (default 128).
        remain_weight: the generator's weight on kept classes (default 1).
        forget_weight: the generator's weight on the forgotten class (default 0.01).
        fake_remain_weight: the fake score's weight on kept classes (default 1).
        fake_forget_weight: the fake score's weight on the forgotten class (default 0.01).
        fake_lr: the fake score's Adam learning rate (default 1e-5).
        fake_grad_clip: its gradient value clip (default 1; ``None``: none).
        **kwargs: :class:`~lightning_forget.callbacks.erasure.ErasureMethod`'s arguments
            (``parameters`` default ``"full"``: the whole generator trains, as the code's).

    Logged: ``sfd/fake_loss``, ``sfd/remain_loss``, ``sfd/forget_loss``, and the base's ``sfd/erasure_loss``, ``sfd/loss``.

    **Under ModelParallelStrategy** (FSDP2: the module's ``configure_model`` shards its UNet) the
    teacher and the fake score network are each rank's **local shards** of the module's parameter
    layout (never a whole copy per rank), and the fake's Adam steps those shards (elementwise,
    so it equals the whole tensors' step). The network's forward cannot take other weights
    through :func:`torch.func.functional_call` there: FSDP2's pre-forward hook sets the weights it
    gathers from its own shards on the modules, over the substitutes, so the call silently runs
    the live weights (checked with torch 2.13 on a ``fully_shard``-ed ``Linear``), and its
    backward regathers them too. The fake (or the teacher) is therefore **swapped into the
    module's own shards** around each use
    (:func:`~lightning_forget.unlearning.reference.local_shards_swapped`), and anything that
    differentiates through it runs its backward before the live shards come back:

    - the fake's own step: its loss is backpropagated inside the swap with every parameter made
      to require gradients for it (:func:`~lightning_forget.gradients.compute_gradients`'
      sharded path: ``.grad`` stashed and restored, FSDP2's reduce-scatter gives the
      data-parallel mean of the ranks' gradients, which DDP's path takes with
      :func:`~lightning_forget.gradients.average_gradients`; a parameter outside the sharded
      units, e.g. a replicated concept table, is averaged that way too);
    - the generator's loss: the teacher's and the fake's ``ε`` are taken without a graph, the
      loss's gradients with respect to them are taken at once, and each network's input
      gradient (:func:`~lightning_forget.gradients.input_vjp`, inside its swap) is joined to the
      step's graph as a term ``⟨x_t, v⟩ − ⟨sg(x_t), v⟩`` (value 0, gradient ``v``): the
      generator gets the gradient DDP's single backward gives, for two more forwards of each
      network per loss.

    Note:
        Saved state: the base's ``teacher``, ``fake`` (the fake score's weights) and
        ``fake_optimizer`` (its Adam state): whole tensors, gathered from the shards under
        ModelParallelStrategy and cut back to them on load. Supported strategies: single device,
        DDP and ModelParallelStrategy (FSDP2; LoRA refused there, as for every erasure method).
    """

    method_name = "SFD"
    log_prefix = "sfd"
    default_parameters = "full"
    state_arguments = ErasureMethod.state_arguments + ("t_init",)
    supported_strategies = DDP_STRATEGIES + SHARDED_STRATEGIES

    def __init__(
        self,
        erase: ConceptSpec,
        override: Union[None, Literal["random"], Concept] = None,
        alpha: float = 1.2,
        t_init: float = 0.44,
        t_min: float = 0.038,
        t_max: float = 0.712,
        batch_size: int = 128,
        remain_weight: float = 1.0,
        forget_weight: float = 0.01,
        fake_remain_weight: float = 1.0,
        fake_forget_weight: float = 0.01,
        fake_lr: float = 1e-5,
        fake_grad_clip: Optional[float] = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(erase, **kwargs)
        self.override = check_optional_concept("override", override, "None, 'random' or a concept id or name")
        self.alpha = check_float("alpha", alpha, min=0)
        self.t_init = check_float("t_init", t_init, min=0, max=1, min_inclusive=False, max_inclusive=False)
        self.t_min = check_float("t_min", t_min, min=0, max=1, max_inclusive=False)
        self.t_max = check_float("t_max", t_max, min=0, max=1, min_inclusive=False)
        if self.t_min >= self.t_max:
            raise ValueError(message("t_min", f"below t_max={t_max}", t_min, "pass t_min < t_max, e.g. 0.038 and 0.712"))
        self.batch_size = check_int("batch_size", batch_size, min=1)
        self.remain_weight = check_float("remain_weight", remain_weight, min=0)
        self.forget_weight = check_float("forget_weight", forget_weight, min=0)
        self.fake_remain_weight = check_float("fake_remain_weight", fake_remain_weight, min=0)
        self.fake_forget_weight = check_float("fake_forget_weight", fake_forget_weight, min=0)
        self.fake_lr = check_float("fake_lr", fake_lr, min=0, min_inclusive=False)
        self.fake_grad_clip = check_float("fake_grad_clip", fake_grad_clip, min=0, min_inclusive=False, allow_none=True)
        self.fake: Optional[dict[str, Tensor]] = None
        self.fake_optimizer: Optional[torch.optim.Optimizer] = None
        self._fake_state: Optional[dict[str, Any]] = None
        #: Under FSDP2: the module's (sharded) parameters, whose local shards ``fake`` holds.
        self._layout: dict[str, Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if self.fake is not None and not self._layout:  # shards are not gathered here (a collective)
            state["_fake_state"] = self._fake_snapshot()
        state.update(fake=None, fake_optimizer=None, _layout={})
        return state

    # ------------------------------------------------------------------ timesteps and the one-step generator
    def _steps(self, pl_module: "pl.LightningModule") -> tuple[int, int, int]:
        total = int(pl_module.noise_scheduler.config.num_train_timesteps)
        t_init = min(total - 1, max(1, int(round(self.t_init * total))))
        t_min = int(round(self.t_min * total))
        return t_init, t_min, max(t_min + 1, int(round(self.t_max * total)))

    def _generate(self, pl_module: "pl.LightningModule", labels: Tensor, noise: Tensor) -> Tensor:
        t_init, _, _ = self._steps(pl_module)
        t = torch.full((labels.shape[0],), t_init, dtype=torch.long, device=noise.device)
        abar = pl_module.noise_scheduler.alphas_cumprod[t_init].to(noise.device, noise.dtype)
        x_init = (1 - abar).sqrt() * noise
        with forward_context(pl_module.trainer):
            eps = pl_module.eps(x_init, t, labels)
        return pl_module.predict_x0(x_init, t, eps)

    @torch.no_grad()
    def generate(self, pl_module: "pl.LightningModule", labels: Tensor, seed: int = 0) -> Tensor:
        """Samples of the one-step generator (the module after SFD) for ``labels``; the same seed gives the same images."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            noise = pl_module.initial_noise(labels.shape[0], seed)
            return self._generate(pl_module, labels.to(noise.device).long(), noise).clamp(-1, 1)
        finally:
            pl_module.train(was_training)

    # ------------------------------------------------------------------ the fake score network
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        super().on_task_start(trainer, pl_module, task)
        self.fake, self.fake_optimizer, self._fake_state = None, None, None
        self._build_fake(pl_module)

    def _build_fake(self, pl_module: "pl.LightningModule") -> dict[str, Tensor]:
        if self.fake is None:
            if is_sharded(pl_module):
                self._build_sharded_fake(pl_module)
                return self.fake  # type: ignore[return-value]
            self._layout = {}
            source = self._fake_state["weights"] if self._fake_state is not None else dict(pl_module.named_parameters())
            self.fake = {n: source[n].detach().to(p.device, copy=True).requires_grad_(True)
                         for n, p in pl_module.named_parameters()}
            self.fake_optimizer = torch.optim.Adam(list(self.fake.values()), lr=self.fake_lr, betas=(0.0, 0.999), eps=1e-8)
            if self._fake_state is not None:
                self.fake_optimizer.load_state_dict(self._fake_state["optimizer"])
        return self.fake

    def _build_sharded_fake(self, pl_module: "pl.LightningModule") -> None:
        """The fake as this rank's local shards: of the live weights, or cut from the saved whole ones."""
        reshard(pl_module)  # a root unit may hold its gathered weights since a forward: the shards instead
        self._layout = dict(pl_module.named_parameters())
        saved = self._fake_state
        self.fake = {n: local_clone(shard_like(saved["weights"][n], p) if saved is not None else p,
                                    device=local_view(p).device).requires_grad_(True) for n, p in self._layout.items()}
        self.fake_optimizer = torch.optim.Adam(list(self.fake.values()), lr=self.fake_lr, betas=(0.0, 0.999), eps=1e-8)
        if saved is not None:
            self.fake_optimizer.load_state_dict(self._per_element(saved["optimizer"], shard_like))

    def _per_element(self, optimizer_state: dict[str, Any], convert: Callable[[Tensor, Tensor], Tensor]) -> dict[str, Any]:
        """The fake's Adam state with each parameter's elementwise entries (its moments) passed through
        ``convert(tensor, parameter)``: gathered to whole tensors, or cut to this rank's shards."""
        layout = list(self._layout.values())
        state = {index: {key: convert(value, layout[int(index)]).clone() if isinstance(value, Tensor) and value.dim() > 0
                         else value for key, value in entries.items()}
                 for index, entries in optimizer_state["state"].items()}
        return {"state": state, "param_groups": optimizer_state["param_groups"]}

    def _fake_snapshot(self) -> dict[str, Any]:
        assert self.fake is not None and self.fake_optimizer is not None
        if self._layout:  # whole tensors gathered from the shards (a collective: every rank saves)
            return {"weights": {n: full_tensor(v.detach(), like=self._layout[n]).detach().cpu().clone()
                                for n, v in self.fake.items()},
                    "optimizer": self._per_element(self.fake_optimizer.state_dict(),
                                                   lambda value, like: full_tensor(value, like=like).cpu())}
        return {"weights": {n: v.detach().cpu().clone() for n, v in self.fake.items()},
                "optimizer": self.fake_optimizer.state_dict()}

    def _fake_swapped(self, pl_module: "pl.LightningModule") -> Any:
        """Under FSDP2: the fake's shards in the module's own shards for the ``with`` block (forwards and
        their backwards), the live ones after."""
        assert self.fake is not None
        return local_shards_swapped(pl_module, self._layout, self.fake)

    def fake_eps(self, pl_module: "pl.LightningModule", x_t: Tensor, t: Tensor, labels: Tensor, trainable: bool) -> Tensor:
        """``ε_s(x_t, t, c)`` of the fake score network (its weights detached unless ``trainable``).

        Under FSDP2 (its weights swapped into the module's shards) without a graph: a graph through
        the module would regather the live weights at its backward.
        """
        fake = self._build_fake(pl_module)
        if self._layout:
            with torch.no_grad(), self._fake_swapped(pl_module), forward_context(pl_module.trainer):
                return pl_module.eps(x_t, t, labels)
        weights = fake if trainable else {n: v.detach() for n, v in fake.items()}
        with _reparametrize_module(pl_module, weights, tie_weights=True, strict=False), forward_context(pl_module.trainer):
            return pl_module.eps(x_t, t, labels)

    def teacher_eps_with_input_grad(self, pl_module: "pl.LightningModule", x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """``ε*(x_t, t, c)`` of the frozen teacher, differentiable with respect to ``x_t`` (SiD needs it).

        Not under FSDP2: a graph through the sharded module would regather the live weights at its
        backward; the sharded step takes the teacher's input gradient inside its swap instead
        (:func:`~lightning_forget.gradients.input_vjp`).
        """
        teacher = self._get_teacher(pl_module)
        if teacher.sharded:
            raise RuntimeError("SFD.teacher_eps_with_input_grad under ModelParallelStrategy: its backward would run "
                               "after the teacher's shards are swapped out. Fix: take the input gradient inside the "
                               "teacher call, e.g. teacher(lambda model: input_vjp(model.eps-based fn, x_t, grad)).")

        def call(model: Any) -> Tensor:
            with torch.enable_grad(), forward_context(pl_module.trainer):
                return model.eps(x_t, t, labels)

        return teacher(call)

    # ------------------------------------------------------------------ the step
    def override_ids(self, pl_module: "pl.LightningModule", forget: Tensor, keep: list[int], generator: torch.Generator) -> Tensor:
        """The classes the teacher is asked about for forgotten samples ``forget``."""
        if self.override == "random":
            pick = torch.randint(0, len(keep), (forget.shape[0],), generator=generator)
            return torch.tensor(keep, dtype=torch.long)[pick].to(forget.device)
        if self.override is not None:
            return torch.full_like(forget, self._index(pl_module, self.override, "override"))
        return (forget + 1) % int(pl_module.num_classes)

    def _noised(self, pl_module: "pl.LightningModule", x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        _, t_min, t_max = self._steps(pl_module)
        t = torch.randint(t_min, t_max, (x0.shape[0],), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        return pl_module.add_noise(x0, noise, t), t, noise

    def _fake_loss(self, pl_module: "pl.LightningModule", samples: list[tuple[Tensor, Tensor, float]],
                   generator: torch.Generator, eps: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        loss = torch.zeros((), device=pl_module.device)
        for x0, labels, weight in samples:
            if weight == 0:
                continue
            x_t, t, noise = self._noised(pl_module, x0, generator)
            loss = loss + weight * fake_score_loss(noise, eps(x_t, t, labels))
        return loss

    def _fake_step(self, pl_module: "pl.LightningModule", samples: list[tuple[Tensor, Tensor, float]],
                   generator: torch.Generator) -> Tensor:
        fake = self._build_fake(pl_module)
        if self._layout:  # sharded: forward and backward with the fake swapped in (see the class docstring)
            with self._fake_swapped(pl_module), _all_requiring_grad(pl_module):
                params = dict(pl_module.named_parameters())  # the sharded parameters (resharded by the swap)

                def eps(x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
                    with forward_context(pl_module.trainer):
                        return pl_module.eps(x_t, t, labels)

                loss = self._fake_loss(pl_module, samples, generator, eps)
                named = compute_gradients(loss, params)
        else:
            loss = self._fake_loss(pl_module, samples, generator,
                                   lambda x_t, t, labels: self.fake_eps(pl_module, x_t, t, labels, trainable=True))
            grads = torch.autograd.grad(loss, list(fake.values()), allow_unused=True)
            named = {n: torch.zeros_like(v) if g is None else g for (n, v), g in zip(fake.items(), grads)}
        named = average_gradients(pl_module.trainer.strategy, named)
        with torch.no_grad():
            for n, v in fake.items():
                g = local_view(named[n])
                v.grad = g.clamp(-self.fake_grad_clip, self.fake_grad_clip) if self.fake_grad_clip is not None else g
        self.fake_optimizer.step()  # type: ignore[union-attr]
        self.fake_optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        return loss.detach()

    def _sid(self, pl_module: "pl.LightningModule", x0: Tensor, labels: Tensor, teacher_labels: Tensor,
             generator: torch.Generator) -> Tensor:
        x_t, t, _ = self._noised(pl_module, x0, generator)
        if self._layout:
            return self._sharded_sid(pl_module, x0, x_t, t, labels, teacher_labels)
        x0_teacher = pl_module.predict_x0(x_t, t, self.teacher_eps_with_input_grad(pl_module, x_t, t, teacher_labels))
        x0_fake = pl_module.predict_x0(x_t, t, self.fake_eps(pl_module, x_t, t, labels, trainable=False))
        return sid_generator_loss(x0, x0_teacher, x0_fake, self.alpha)

    def _sharded_sid(self, pl_module: "pl.LightningModule", x0: Tensor, x_t: Tensor, t: Tensor, labels: Tensor,
                     teacher_labels: Tensor) -> Tensor:
        """:meth:`_sid` under FSDP2: both networks' input gradients taken inside their swaps (see the class docstring)."""
        x = x_t.detach()
        eps_teacher = self.teacher_eps(pl_module, x, t, teacher_labels).requires_grad_(True)
        eps_fake = self.fake_eps(pl_module, x, t, labels, trainable=False).requires_grad_(True)
        loss = sid_generator_loss(x0, pl_module.predict_x0(x_t, t, eps_teacher), pl_module.predict_x0(x_t, t, eps_fake),
                                  self.alpha)
        to_teacher, to_fake = torch.autograd.grad(loss, [eps_teacher, eps_fake], retain_graph=True)
        with forward_context(pl_module.trainer):
            v = self._get_teacher(pl_module)(
                lambda model: input_vjp(lambda inputs: model.eps(inputs, t, teacher_labels), x, to_teacher))
            with self._fake_swapped(pl_module):
                v = v + input_vjp(lambda inputs: pl_module.eps(inputs, t, labels), x, to_fake)
        return loss + ((x_t * v).sum() - (x * v).sum())  # the value is the loss's, the gradient reaches x_t

    def erasure_loss(self, pl_module: "pl.LightningModule", batch: Any, erase: list[int], keep: list[int]) -> Optional[Tensor]:
        generator = self.generator(pl_module.trainer)
        if not keep:
            raise RuntimeError(f"SFD: no concept is kept (erase={erase}); the generator distils the kept classes. "
                               "Fix: keep at least one concept.")
        n, shape = self.batch_size, self._image_shape(pl_module)
        c = torch.tensor(keep, dtype=torch.long)[torch.randint(0, len(keep), (n,), generator=generator)].to(pl_module.device)
        c_f = torch.tensor(erase, dtype=torch.long)[torch.randint(0, len(erase), (n,), generator=generator)].to(pl_module.device)

        def noise() -> Tensor:
            return torch.randn((n, *shape), generator=generator).to(pl_module.device)

        with torch.no_grad():
            remain, forget = self._generate(pl_module, c, noise()), self._generate(pl_module, c_f, noise())
        fake_loss = self._fake_step(pl_module, [(remain, c, self.fake_remain_weight), (forget, c_f, self.fake_forget_weight)],
                                    generator)
        pl_module.log("sfd/fake_loss", fake_loss, on_step=True, on_epoch=False)
        remain_loss = self._sid(pl_module, self._generate(pl_module, c, noise()), c, c, generator)
        loss = self.remain_weight * remain_loss
        pl_module.log("sfd/remain_loss", remain_loss.detach(), on_step=True, on_epoch=False)
        if self.forget_weight > 0:
            override = self.override_ids(pl_module, c_f, keep, generator)
            forget_loss = self._sid(pl_module, self._generate(pl_module, c_f, noise()), c_f, override, generator)
            pl_module.log("sfd/forget_loss", forget_loss.detach(), on_step=True, on_epoch=False)
            loss = loss + self.forget_weight * forget_loss
        return loss

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        state = super().method_state()
        state["fake"] = self._fake_snapshot() if self.fake is not None else self._fake_state
        return state

    def load_method_state(self, state: dict[str, Any]) -> None:
        super().load_method_state(state)
        self._fake_state = state["fake"]
        self.fake, self.fake_optimizer = None, None


@contextmanager
def _all_requiring_grad(module: "pl.LightningModule") -> Iterator[None]:
    """Every parameter of ``module`` requires gradients in the ``with`` block (the flags restored after): the fake
    score network trains all of its weights, also those the generator keeps frozen."""
    flags = {p: p.requires_grad for p in module.parameters()}
    try:
        for p in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
