"""Rehearsal baselines: Experience Replay and Dark Experience Replay (DER++)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_forget.buffers import ReplayBuffer, make_buffer
from lightning_forget.distributed import gather_batch, rank_generator
from lightning_forget.losses import remove_training_step_hooks, training_step_hooks
from lightning_forget.tasks import ContinualCallback

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["ExperienceReplay", "DarkExperienceReplay"]


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


class _BufferCallback(ContinualCallback):
    """Shared machinery: a rank-consistent buffer fed with every stream batch.

    Batches are ``(x, y)`` pairs or dicts of tensors with a common first dimension. Subclasses
    may override :meth:`to_fields` / :meth:`from_fields` for other layouts.
    """

    def __init__(
        self,
        buffer_size: int,
        replay_batch_size: Optional[int],
        buffer: Literal["reservoir", "class_balanced"],
        seed: int,
        target_key: str,
    ) -> None:
        super().__init__()
        _positive_int("buffer_size", buffer_size)
        _positive_int("replay_batch_size", replay_batch_size, allow_none=True)
        if buffer not in ("reservoir", "class_balanced"):
            raise ValueError(f"`buffer` must be 'reservoir' or 'class_balanced', got {buffer!r}.")
        if not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
        self.buffer_size = buffer_size
        self.replay_batch_size = replay_batch_size
        self.buffer_kind = buffer
        self.seed = seed
        self.target_key = target_key
        self.buffer: ReplayBuffer = make_buffer(buffer, buffer_size, seed=seed)
        if buffer == "class_balanced":
            self.buffer.label_key = target_key  # type: ignore[attr-defined]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(buffer_size=self.buffer_size, buffer=self.buffer_kind, seed=self.seed)

    # ------------------------------------------------------------------ batch layout
    def to_fields(self, batch: Any) -> dict[str, Tensor]:
        """The per-sample tensors of a stream batch, by field name."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(b, Tensor) for b in batch):
            return {"x": batch[0], self.target_key: batch[1]}
        if isinstance(batch, dict):
            fields = {k: v for k, v in batch.items() if isinstance(v, Tensor) and v.dim() > 0}
            if self.target_key in fields:
                n = fields[self.target_key].shape[0]
                return {k: v for k, v in fields.items() if v.shape[0] == n}
        raise TypeError(
            f"{type(self).__name__} handles batches `(x, y)` or dicts of tensors with a "
            f"{self.target_key!r} key, got {type(batch).__name__}. Override "
            f"`{type(self).__name__}.to_fields` and `.from_fields` for other batch layouts."
        )

    def from_fields(self, like: Any, fields: dict[str, Tensor]) -> Any:
        """A batch of the same layout as ``like`` holding ``fields``."""
        if isinstance(like, (tuple, list)):
            return type(like)((fields["x"], fields[self.target_key]))
        out = dict(like)
        out.update(fields)
        return out

    # ------------------------------------------------------------------ drawing and storing
    def draw(self, trainer: "pl.Trainer", batch_idx: int, n: int, salt: int = 0) -> dict[str, Tensor]:
        """``n`` buffer samples, drawn with a generator seeded from (seed, step, batch, rank)."""
        gen = rank_generator(self.seed, trainer.global_step, batch_idx, trainer.global_rank, salt)
        return self.buffer.sample(n, generator=gen, return_indices=True)

    def store(self, trainer: "pl.Trainer", fields: dict[str, Tensor]) -> None:
        """Offer the stream samples of all ranks to the buffer (same on every rank)."""
        fields = {k: v.detach() for k, v in fields.items()}
        self.buffer.add(gather_batch(trainer, fields))

    def replay_size(self, stream_fields: dict[str, Tensor]) -> int:
        return self.replay_batch_size or int(stream_fields[self.target_key].shape[0])

    # ------------------------------------------------------------------ state
    @override
    def method_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        remove_training_step_hooks(pl_module, self.state_key)


class ExperienceReplay(_BufferCallback):
    """Experience Replay (ER): train on the stream batch joined with samples from a buffer.

    Chaudhry et al., "On Tiny Episodic Memories in Continual Learning" (arXiv 2019); the
    reservoir variant used by Mammoth and the DER paper. Before each training step, a batch of
    ``replay_batch_size`` samples drawn from the buffer is concatenated to the stream batch, so
    the module's own ``training_step`` computes its loss over both (the mean cross-entropy over
    the joint batch, as in Mammoth's ``er``). After the step, the stream samples of every rank
    are offered to the buffer.

    Works with any LightningModule whose batches are ``(x, y)`` pairs or dicts of tensors
    sharing a first dimension (all such fields are stored and replayed). Under DDP the buffer
    receives the gathered stream samples of all ranks, so it is identical on every rank; each
    rank draws its replay samples with a generator seeded from ``(seed, global_step,
    batch_idx, rank)``.

    Args:
        buffer_size: samples kept in memory (over the whole stream; memory does not grow).
        replay_batch_size: replayed samples per step (default: the stream batch size).
        buffer: ``"reservoir"`` (uniform over everything seen) or ``"class_balanced"``.
        seed: seed of the buffer and of the replay draws.
        target_key: name of the label field (dict batches; for ``(x, y)`` it names ``y``).

    Raises:
        ValueError: a non-positive size or an unknown buffer kind.
        TypeError: a batch layout it cannot split (override ``to_fields``/``from_fields``).

    Note:
        Logged keys: ``replay/buffer_size`` (samples held). Saved state: the buffer (stored
        rows, counters and generator) and the task counters.
    """

    def __init__(
        self,
        buffer_size: int = 500,
        replay_batch_size: Optional[int] = None,
        buffer: Literal["reservoir", "class_balanced"] = "reservoir",
        seed: int = 0,
        target_key: str = "y",
    ) -> None:
        super().__init__(buffer_size, replay_batch_size, buffer, seed, target_key)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            training_step_hooks(pl_module).add_batch_transform(self.state_key, self._join_replay)

    def _join_replay(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> Any:
        if self.buffer.is_empty:
            return batch
        stream = self.to_fields(batch)
        replay = self.draw(pl_module.trainer, batch_idx, self.replay_size(stream))
        device = stream[self.target_key].device
        joined = {k: torch.cat([v, replay[k].to(device, v.dtype)]) for k, v in stream.items()}
        return self.from_fields(batch, joined)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.store(trainer, self.to_fields(batch))
        pl_module.log("replay/buffer_size", float(len(self.buffer)), on_step=True, on_epoch=False)


class DarkExperienceReplay(_BufferCallback):
    """Dark Experience Replay++ (DER++): replay logits and labels from a buffer.

    Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple
    Baseline" (NeurIPS 2020). The buffer stores each stream sample with the logits the
    network produced for it when it was seen. The loss of every step is

        CE(stream) + α · MSE(f(x₁), z₁) + β · CE(f(x₂), y₂),

    where ``(x₁, z₁)`` and ``(x₂, y₂)`` are two independent draws from the buffer
    (METHODS.md §1.3; Mammoth defaults α = 0.1, β = 0.5). The module's own ``training_step``
    computes CE(stream); the two replay terms are added inside the same step through
    :mod:`lightning_forget.losses`, so DDP reduces one gradient.

    The stream logits are captured from the module's forward call inside ``training_step``
    (the first ``pl_module(x)`` of the step), so the module must call ``self(x)``; override
    :meth:`stream_logits` otherwise.

    Args:
        buffer_size: samples kept (with their logits).
        alpha: weight of the logit-matching (MSE) term.
        beta: weight of the buffer cross-entropy term (``beta=0`` gives DER).
        replay_batch_size: samples per buffer draw (default: the stream batch size).
        buffer: ``"reservoir"`` or ``"class_balanced"``.
        seed: seed of the buffer and of the draws.
        target_key: name of the label field.

    Raises:
        ValueError: bad sizes or negative weights.
        RuntimeError: the module's training step never called its forward.

    Note:
        Logged keys: ``derpp/mse``, ``derpp/ce`` (the unweighted replay terms),
        ``replay/buffer_size``. Saved state: the buffer (inputs, labels, logits) and counters.
    """

    def __init__(
        self,
        buffer_size: int = 500,
        alpha: float = 0.1,
        beta: float = 0.5,
        replay_batch_size: Optional[int] = None,
        buffer: Literal["reservoir", "class_balanced"] = "reservoir",
        seed: int = 0,
        target_key: str = "y",
    ) -> None:
        super().__init__(buffer_size, replay_batch_size, buffer, seed, target_key)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative float, got {value!r}.")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self._captured: Optional[Tensor] = None
        self._armed = False
        self._hook: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            buffer_size=self.buffer_size, buffer=self.buffer_kind, seed=self.seed, alpha=self.alpha, beta=self.beta
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update({"_hook": None, "_captured": None, "_armed": False})
        return state

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        hooks = training_step_hooks(pl_module)
        hooks.add_batch_transform(self.state_key, self._arm)
        hooks.add_loss_term(self.state_key, self._replay_loss)
        self._hook = pl_module.register_forward_hook(self._capture)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _arm(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> Any:
        self._captured = None
        self._armed = True
        return batch

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._armed:
            self._armed = False
            self._captured = output.detach() if isinstance(output, Tensor) else None

    def stream_logits(self, pl_module: "pl.LightningModule", batch: Any) -> Tensor:
        """The logits of the stream batch from this step's forward (override if not captured)."""
        if self._captured is None:
            raise RuntimeError(
                f"DarkExperienceReplay needs the logits of the stream batch, but "
                f"{type(pl_module).__name__}.training_step did not call the module's forward "
                "(`self(x)`) returning a logits tensor. Call `self(x)` in training_step, or "
                "override `DarkExperienceReplay.stream_logits`."
            )
        return self._captured

    def _replay_loss(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int, output: Any) -> Optional[Tensor]:
        self._armed = False
        if self.buffer.is_empty:
            return None
        trainer = pl_module.trainer
        n = self.replay_size(self.to_fields(batch))
        first = self.draw(trainer, batch_idx, n, salt=1)
        second = self.draw(trainer, batch_idx, n, salt=2)
        device = pl_module.device
        mse = nn.functional.mse_loss(pl_module(first["x"].to(device)), first["logits"].to(device))
        ce = nn.functional.cross_entropy(pl_module(second["x"].to(device)), second[self.target_key].to(device))
        pl_module.log_dict({"derpp/mse": mse.detach(), "derpp/ce": ce.detach()}, on_step=True, on_epoch=False)
        return self.alpha * mse + self.beta * ce

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        fields = self.to_fields(batch)
        fields["logits"] = self.stream_logits(pl_module, batch)
        self.store(trainer, fields)
        self._captured = None
        pl_module.log("replay/buffer_size", float(len(self.buffer)), on_step=True, on_epoch=False)
