"""Language-model unlearning methods (open-unlearning's) as callbacks on the shared unlearning mechanism.

They are :class:`~lightning_forget.callbacks.unlearning.UnlearningMethod` subclasses, so they get
its forget/retain streams, its reference model (the base with PEFT adapters disabled when the
module carries LoRA adapters and no trainable base weight, else a frozen copy), its safety rails
and its state handling; their losses are the plain functions of
:mod:`lightning_forget.unlearning.losses`. Batches are two-stream dicts of causal-LM sub-batches
(``input_ids``, ``attention_mask``, ``labels`` with ``-100`` on the question and padding), as
:class:`~lightning_forget.datamodules.FictitiousQADataModule` serves them with ``phase="unlearn"``;
the module is called as ``pl_module(input_ids, attention_mask=...)`` and returns logits (as
:class:`~lightning_forget.modules.CausalLMModule`), or, with ``forward_fn="model"`` (any submodule
or method name), that function is (e.g. a user's module keeping a Hugging Face model in
``self.model`` and no ``forward``; a model output's ``logits`` are read). Token-level :class:`GradientAscent` and
:class:`GradDiff` are the classifier callbacks themselves (the mechanism aligns an LM's logits
and labels).

All of them are open-unlearning's ``γ·forget_loss + α·retain_loss`` with the retain term the
module's own loss on the retain batch (``retain_loss="nll"``) or ``KL(p_ref ‖ p_θ)`` (``"kl"``),
as :class:`GradDiff`.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_forget.callbacks.unlearning import GradDiff, _lm_call, is_lm_batch
from lightning_forget.datamodules.instructions import pad_token_batch
from lightning_forget.datamodules.tokenizers import load_tokenizer
from lightning_forget.distributed import rank_generator
from lightning_forget.precision import forward_context
from lightning_forget.unlearning import losses as L
from lightning_forget.validation import check_float, check_str, message

__all__ = ["IDK_ANSWERS", "IdkPO", "NPO", "RMU", "SimNPO"]

#: Built-in "I don't know" answers of :class:`IdkPO` (ours, in the spirit of TOFU's ``idk.jsonl``).
IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure about that.",
    "I have no information about that.",
    "That is not something I know.",
    "I cannot answer that.",
    "I'm afraid I don't know.",
    "I have no idea.",
    "I don't have that information.",
    "Sorry, I can't help with that.",
    "I am unable to answer this question.",
)


def _require_lm(method: str, sub_batch: Any) -> dict[str, Tensor]:
    if not is_lm_batch(sub_batch):
        raise RuntimeError(
            f"{method} needs causal-LM sub-batches (dicts with 'input_ids' and 'labels', -100 where not "
            f"predicted), got {type(sub_batch).__name__}. Fix: use FictitiousQADataModule(phase='unlearn') or "
            "serve such dicts under the 'forget' and 'retain' keys."
        )
    return sub_batch


class NPO(GradDiff):
    """NPO: lower the forget answers' likelihood relative to the frozen reference, with a bounded loss.

    Zhang et al., "Negative Preference Optimization: From Catastrophic Collapse to Effective
    Unlearning" (COLM 2024); open-unlearning ``NPO``. Forget term
    ``γ·(−2/β)·mean log σ(−β·[log π_θ(y|x) − log π_ref(y|x)])`` with the answer log-probabilities
    summed over tokens (:func:`~lightning_forget.unlearning.losses.npo_loss`); at the task's start
    ``π_θ = π_ref`` and the term is ``γ·(2/β)·log 2``.

    Args:
        beta: ``β`` (default 0.1).
        gamma: weight of the forget term (default 1).
        alpha: weight of the retain term (default 1).
        retain_loss: ``"nll"`` or ``"kl"`` (see :class:`GradDiff`).
        **kwargs: :class:`~lightning_forget.callbacks.unlearning.UnlearningMethod`'s arguments.

    Logged: ``npo/forget_loss``, ``npo/retain_loss``, ``npo/loss``.
    """

    method_name = "NPO"
    log_prefix = "npo"

    def __init__(self, beta: float = 0.1, gamma: float = 1.0, alpha: float = 1.0,
                 retain_loss: Literal["nll", "kl"] = "nll", **kwargs: Any) -> None:
        super().__init__(gamma=gamma, alpha=alpha, retain_loss=retain_loss, **kwargs)
        self.beta = check_float("beta", beta, min=0, min_inclusive=False)
        self.needs_reference = True

    def forget_loss(self, pl_module: "pl.LightningModule", forget: Any) -> Optional[Tensor]:
        forget = _require_lm(type(self).__name__, forget)
        log_prob = L.sequence_log_prob(*self.logits(pl_module, forget))
        reference = L.sequence_log_prob(*L.shift_for_next_token(self.reference_logits(pl_module, forget), forget["labels"]))
        return self.gamma * L.npo_loss(log_prob, reference, self.beta)


class SimNPO(GradDiff):
    """SimNPO: NPO without a reference, on the length-normalised forget NLL.

    Fan et al., "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
    Unlearning" (2024); open-unlearning ``SimNPO``. Forget term
    ``γ·(−2/β)·mean log σ(β·(NLL_sum/|y| − δ))``
    (:func:`~lightning_forget.unlearning.losses.simnpo_loss`). No reference model is built
    (unless ``retain_loss="kl"``).

    Args:
        beta: ``β`` (default 4.5).
        delta: ``δ`` (default 0).
        gamma: weight of the forget term (default 0.125, open-unlearning's config).
        alpha: weight of the retain term (default 1).
        retain_loss: ``"nll"`` or ``"kl"``.
        **kwargs: :class:`~lightning_forget.callbacks.unlearning.UnlearningMethod`'s arguments.

    Logged: ``simnpo/forget_loss``, ``simnpo/retain_loss``, ``simnpo/loss``.
    """

    method_name = "SimNPO"
    log_prefix = "simnpo"

    def __init__(self, beta: float = 4.5, delta: float = 0.0, gamma: float = 0.125, alpha: float = 1.0,
                 retain_loss: Literal["nll", "kl"] = "nll", **kwargs: Any) -> None:
        super().__init__(gamma=gamma, alpha=alpha, retain_loss=retain_loss, **kwargs)
        self.beta = check_float("beta", beta, min=0, min_inclusive=False)
        self.delta = check_float("delta", delta)

    def forget_loss(self, pl_module: "pl.LightningModule", forget: Any) -> Optional[Tensor]:
        forget = _require_lm(type(self).__name__, forget)
        logits, labels = self.logits(pl_module, forget)
        return self.gamma * L.simnpo_loss(L.sequence_log_prob(logits, labels), L.answer_lengths(labels), self.beta,
                                          self.delta)


class IdkPO(GradDiff):
    """IdkPO: DPO preferring an "I don't know" answer to the forget answer, against the frozen reference.

    Rafailov et al.'s DPO (NeurIPS 2023) as open-unlearning's ``DPO`` trainer runs it on TOFU's
    ``forget_idk`` data (Maini et al., TOFU, 2024). For each forget row the question (the tokens
    before the first label that counts) is joined to an "I don't know" answer drawn from
    ``idk_answers`` (a generator seeded by ``(seed, global step, rank)``) and the tokenizer's end
    id; forget term ``γ·(−2/β)·mean log σ(β·[(log π_θ − log π_ref)(idk) − (log π_θ − log π_ref)(answer)])``
    (:func:`~lightning_forget.unlearning.losses.dpo_loss`); ``γ·(2/β)·log 2`` at the task's start.

    Args:
        beta: ``β`` (default 0.1).
        gamma: weight of the forget term (default 1).
        alpha: weight of the retain term (default 1).
        retain_loss: ``"nll"`` or ``"kl"``.
        idk_answers: the preferred answers (default :data:`IDK_ANSWERS`).
        tokenizer: ``None``/``"bytes"`` (the byte tokenizer) or a local Hugging Face tokenizer's path;
            must be the data's.
        **kwargs: :class:`~lightning_forget.callbacks.unlearning.UnlearningMethod`'s arguments.

    Logged: ``idkpo/forget_loss``, ``idkpo/retain_loss``, ``idkpo/loss``.
    """

    method_name = "IdkPO"
    log_prefix = "idkpo"

    def __init__(self, beta: float = 0.1, gamma: float = 1.0, alpha: float = 1.0,
                 retain_loss: Literal["nll", "kl"] = "nll", idk_answers: Optional[Sequence[str]] = None,
                 tokenizer: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(gamma=gamma, alpha=alpha, retain_loss=retain_loss, **kwargs)
        self.beta = check_float("beta", beta, min=0, min_inclusive=False)
        # A lone string is one answer mistyped as a list: list("no idea") would be its characters.
        answers = [] if isinstance(idk_answers, str) else list(IDK_ANSWERS if idk_answers is None else idk_answers)
        if not answers or not all(isinstance(a, str) and a for a in answers):
            raise ValueError(message("idk_answers", "a non-empty list of non-empty strings", idk_answers,
                                     "pass e.g. ['I don't know.'] or None for the built-in answers"))
        self.idk_answers = answers
        self.tokenizer = check_str("tokenizer", tokenizer, allow_none=True)
        self.needs_reference = True

    def idk_batch(self, forget: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """The forget rows' questions with "I don't know" answers (right-padded, labels on the answer only)."""
        tokenizer = load_tokenizer(self.tokenizer)
        end = tokenizer.eos_id
        labels, ids = forget["labels"], forget["input_ids"]
        choice = torch.randint(len(self.idk_answers), (labels.shape[0],), generator=generator)
        rows = []
        for i in range(labels.shape[0]):
            counted = (labels[i] != L.IGNORE_INDEX).nonzero()
            start = int(counted[0]) if counted.numel() else int(labels.shape[1])
            answer = torch.tensor(tokenizer.encode(self.idk_answers[int(choice[i])]) + ([end] if end is not None else []),
                                  dtype=ids.dtype, device=ids.device)
            prompt = ids[i, :start]
            row_ids = torch.cat([prompt, answer])
            rows.append({"input_ids": row_ids, "attention_mask": torch.ones_like(row_ids),
                         "labels": torch.cat([torch.full_like(prompt, L.IGNORE_INDEX), answer])})
        return pad_token_batch(rows)

    def forget_loss(self, pl_module: "pl.LightningModule", forget: Any) -> Optional[Tensor]:
        forget = _require_lm(type(self).__name__, forget)
        trainer = pl_module.trainer
        idk = self.idk_batch(forget, rank_generator(self.seed, trainer.global_step, trainer.global_rank))

        def log_probs(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            current = L.sequence_log_prob(*self.logits(pl_module, batch))
            reference = L.sequence_log_prob(*L.shift_for_next_token(self.reference_logits(pl_module, batch), batch["labels"]))
            return current, reference

        chosen, reference_chosen = log_probs(idk)
        rejected, reference_rejected = log_probs(forget)
        return self.gamma * L.dpo_loss(chosen, rejected, reference_chosen, reference_rejected, self.beta)


class RMU(GradDiff):
    """RMU: steer one layer's activations on forget data toward a fixed random direction; keep them on retain data.

    Li et al., "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning" (ICML
    2024); open-unlearning ``RMU``. Forget term ``γ·MSE(h_f, c·u)``, retain term
    ``α·MSE(h_r, h_r^ref)`` (``EMBED_DIFF``), ``h`` the output of the module named by ``layer``
    and the MSE masked to the answer tokens
    (:func:`~lightning_forget.unlearning.losses.activation_mse`); ``u`` is uniform in
    ``[0, 1)^d`` scaled to unit length, drawn once from a generator seeded by ``seed``, so it is
    the same on every rank and after a resume with no communication.

    Args:
        layer: regular expression that must fully match exactly one module name of the
            LightningModule (e.g. ``r"model\\.transformer\\.h\\.1"``); ``None`` picks the middle
            block (index ``n // 2``) of the first module list named ``h`` or ``layers``
            (open-unlearning's default is layer 7 of Llama-3.2-1B's 16).
        steering_coeff: ``c`` (default 2, open-unlearning's TOFU config; its class default is 20
            and WMDP's notebook uses 6.5).
        trainable_params: regular expression of the parameter names that train (the others are
            frozen at setup); ``None`` trains every parameter that requires gradients (TOFU's ``.*``).
        gamma: weight of the forget term (default 1).
        alpha: weight of the retain term (default 1).
        **kwargs: :class:`~lightning_forget.callbacks.unlearning.UnlearningMethod`'s arguments.

    Raises:
        RuntimeError: (setup) ``layer`` matches no module or several, or ``trainable_params``
            matches no parameter.

    Logged: ``rmu/forget_loss``, ``rmu/retain_loss``, ``rmu/loss``.
    """

    method_name = "RMU"
    log_prefix = "rmu"
    needs_reference = True

    def __init__(self, layer: Optional[str] = None, steering_coeff: float = 2.0,
                 trainable_params: Optional[str] = None, gamma: float = 1.0, alpha: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(gamma=gamma, alpha=alpha, retain_loss="nll", **kwargs)
        self.layer = check_str("layer", layer, allow_none=True)
        self.steering_coeff = check_float("steering_coeff", steering_coeff, min=0, min_inclusive=False,
                                          fix="pass c > 0 (a zero control vector steers to zero, not to a random "
                                              "direction), e.g. 2 (open-unlearning's TOFU setting)")
        self.trainable_params = check_str("trainable_params", trainable_params, allow_none=True)
        for name, pattern in (("layer", self.layer), ("trainable_params", self.trainable_params)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(message(name, "a regular expression", pattern, f"fix the pattern ({err})")) from None
        self.needs_reference = True
        self.layer_name: Optional[str] = None
        self._control: Optional[Tensor] = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_control"] = None
        return state

    def _find_layer(self, module: nn.Module) -> str:
        names = [n for n, _ in module.named_modules() if n]
        if self.layer is not None:
            found = [n for n in names if re.fullmatch(self.layer, n)]
            if len(found) != 1:
                raise RuntimeError(message("layer", "a pattern matching exactly one module", self.layer,
                                           f"it matched {found[:5] or 'none'}; module names include {names[:12]}"))
            return found[0]
        for name, child in module.named_modules():
            if isinstance(child, nn.ModuleList) and name.split(".")[-1] in ("h", "layers") and len(child):
                return f"{name}.{len(child) // 2}"
        raise RuntimeError(message("layer", "a module name pattern", None,
                                   f"no 'h'/'layers' block list found; pass layer=, names include {names[:12]}"))

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self.layer_name = self._find_layer(pl_module)
            if self.trainable_params is not None:
                matched = [n for n, p in pl_module.named_parameters() if re.fullmatch(self.trainable_params, n)]
                if not matched:
                    raise RuntimeError(message("trainable_params", "a pattern matching parameter names",
                                               self.trainable_params,
                                               f"names include {[n for n, _ in pl_module.named_parameters()][:8]}"))
                for name, p in pl_module.named_parameters():
                    if name not in matched:
                        p.requires_grad_(False)
        super().setup(trainer, pl_module, stage)

    def _activations(self, model: nn.Module, batch: dict[str, Tensor], forward: Any) -> Tensor:
        assert self.layer_name is not None
        captured: list[Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = dict(model.named_modules())[self.layer_name].register_forward_hook(hook)
        try:
            forward(model, batch)
        finally:
            handle.remove()
        return captured[0]

    def control_vector(self, hidden_size: int) -> Tensor:
        """``c·u`` of shape ``(1, 1, hidden_size)``, drawn once from ``seed``."""
        if self._control is None or self._control.shape[-1] != hidden_size:
            self._control = L.rmu_control_vector(hidden_size, self.steering_coeff, torch.Generator().manual_seed(self.seed))
        return self._control

    def _forward(self, pl_module: "pl.LightningModule") -> Any:
        def run(model: nn.Module, batch: dict[str, Tensor]) -> Any:
            with forward_context(pl_module.trainer):
                return _lm_call(model, batch, self.model_forward)
        return run

    def forget_loss(self, pl_module: "pl.LightningModule", forget: Any) -> Optional[Tensor]:
        forget = _require_lm(type(self).__name__, forget)
        h = self._activations(pl_module, forget, self._forward(pl_module))
        control = self.control_vector(h.shape[-1]).to(h.device)
        return self.gamma * L.activation_mse(h, control, forget["labels"])

    def retain_loss(self, pl_module: "pl.LightningModule", retain: Any, module_loss: Tensor) -> Tensor:
        retain = _require_lm(type(self).__name__, retain)
        h = self._activations(pl_module, retain, self._forward(pl_module))
        reference = self._get_reference(pl_module)
        moved = {k: v.to(reference.device()) for k, v in retain.items() if isinstance(v, Tensor)}
        h_ref = reference(lambda model: self._activations(model, moved, self._forward(pl_module))).to(h.device)
        return self.alpha * L.activation_mse(h, h_ref, retain["labels"]) + 0.0 * module_loss
