"""The optimizer-step boundary: one hook point per *real* optimizer step.

Several methods act once per parameter update rather than once per batch: I-LoRA's slow learner
follows the fast one by an EMA after every update (Ren et al., "Analyzing and Reducing
Catastrophic Forgetting in Parameter Efficient Tuning", 2024); k-FPF runs its inner fine-tuning
every ``interval`` optimizer steps (Zhao et al., ICML 2023); refresh learning counts its
``every_n_steps`` in updates. A batch is not an update:

- with ``Trainer(accumulate_grad_batches=k)`` the optimizer steps on every k-th batch only;
- under ``precision="16-mixed"`` the AMP ``GradScaler`` *skips* ``optimizer.step()`` when the
  gradients hold inf/NaN (and lowers its scale). Lightning still counts that step in
  ``trainer.global_step`` (``global_step`` counts calls of Lightning's optimizer step, not
  updates), so a hook keyed on ``global_step`` would run an EMA on weights that did not move.

How "the optimizer really stepped" is detected: a post-step hook
(:meth:`torch.optim.Optimizer.register_step_post_hook`, public torch API) on each of
``trainer.optimizers``. It runs only when the wrapped ``optimizer.step()`` itself runs, which
excludes accumulation batches and steps the scaler skipped, and it works the same under
automatic and manual optimization (in manual optimization every ``opt.step()`` the user's
``training_step`` makes and the scaler lets through is one real step). Optimizers created
outside the Trainer (k-FPF's own inner optimizer) are not watched, so an inner loop never counts
as a step of the run.

Where each kind of method hooks in:

- **after the step** (EMA, periodic inner loops): subclass :class:`OptimizerStepHooks` and
  override :meth:`OptimizerStepHooks.on_optimizer_step_end`. It is called from
  ``on_train_batch_end`` of the batch whose update ran, once per real step, with the running
  count of real steps; the parameters hold the updated values.
- **before the step, after gradient reduction** (parameter-only penalties such as GS-LoRA's
  group sparsity): Lightning's own ``on_before_optimizer_step`` already is that point. It fires
  once per optimizer step (never on accumulation batches), after DDP has reduced the gradients
  and after AMP has unscaled them (for optimizers that do not unscale inside ``step``). Under AMP
  it also fires for a step the scaler then skips; an additive gradient penalty is harmless there
  because the scaler discards those gradients.

:class:`StepCounter` is the Lightning-free part (the hooks and the count);
:class:`OptimizerStepHooks` wires it to a Trainer.
"""

from __future__ import annotations

from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["OptimizerStepHooks", "StepCounter"]


class StepCounter:
    """Counts the ``step()`` calls that really ran on a set of torch optimizers.

    ``watch(optimizers)`` registers a post-step hook on each optimizer not yet watched (call it
    again when optimizers may have been replaced; it is idempotent); :meth:`pop` returns how many
    real steps ran since the last pop; :meth:`close` removes the hooks.
    """

    def __init__(self) -> None:
        self.pending = 0
        self._handles: dict[int, Any] = {}

    def watch(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        current = {id(opt): opt for opt in optimizers}
        for key in [key for key in self._handles if key not in current]:
            self._handles.pop(key).remove()
        for key, optimizer in current.items():
            if key not in self._handles:
                self._handles[key] = optimizer.register_step_post_hook(self._on_step)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.pending += 1

    def discard_outside_batches(self) -> None:
        """Forget steps counted before a training batch starts: none is the run's. A resume under
        ``ModelParallelStrategy`` restores the optimizer after ``on_fit_start`` through
        ``torch.distributed.checkpoint``, which calls ``optimizer.step()`` (zero gradients, lr 0)
        to create its state: not an update of the run. Call it in ``on_train_batch_start``."""
        self.pending = 0

    def pop(self) -> int:
        count, self.pending = self.pending, 0
        return count

    def close(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self.pending = 0

    def __getstate__(self) -> dict[str, Any]:
        # Hook handles belong to this process's optimizers; a copy (spawn worker, deepcopy)
        # watches nothing until `watch` is called again.
        return {"pending": 0, "_handles": {}}


class OptimizerStepHooks(Callback):
    """Base for callbacks that act once per real optimizer step (see the module docstring).

    Override :meth:`on_optimizer_step_end`. Subclasses that override ``on_fit_start``,
    ``on_train_batch_start``, ``on_train_batch_end`` or ``teardown`` call ``super()``. The count
    of real steps is :attr:`optimizer_steps`; a stateful subclass saves and restores it with the
    rest of its state (it starts at 0 and continues across fits of the same instance).
    """

    def __init__(self) -> None:
        super().__init__()
        self.optimizer_steps = 0
        self._step_counter = StepCounter()

    def on_optimizer_step_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int) -> None:
        """Called once per real optimizer step, after it; ``step`` counts real steps from 1."""

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        self._step_counter.watch(trainer.optimizers)
        self._step_counter.pop()

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._step_counter.watch(trainer.optimizers)  # optimizers may be replaced mid-fit
        self._step_counter.discard_outside_batches()

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        for _ in range(self._step_counter.pop()):
            self.optimizer_steps += 1
            self.on_optimizer_step_end(trainer, pl_module, self.optimizer_steps)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._step_counter.close()
