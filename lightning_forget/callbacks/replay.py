"""Rehearsal baselines: Experience Replay and Dark Experience Replay (DER++)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES
from lightning_forget.batch import BatchFields, SplitBatch, logits_of
from lightning_forget.forward import ModelForward
from lightning_forget.buffers import TASK_KEY, ReplayBuffer, TaskBalancedBuffer, make_buffer, pad_rows
from lightning_forget.distributed import gather_batch, rank_generator, sampler_padding_mask
from lightning_forget.losses import (
    CopySafeHook,
    ReplaySegment,
    StepContext,
    remove_training_step_hooks,
    step_context,
    training_step_hooks,
)
from lightning_forget.nn.adab2n import adab2n_layers
from lightning_forget.tasks import ContinualCallback, task_schedule
from lightning_forget.validation import check_choice, check_float, check_int
from lightning.pytorch.utilities import rank_zero_warn

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["ExperienceReplay", "DarkExperienceReplay"]

FieldKey = Union[str, int, None]

#: Buffer names of the input and target of positional batches (tuples, lists, namedtuples).
_POSITIONAL_INPUT, _POSITIONAL_TARGET = "x", "y"

Update = Literal["auto", "reservoir", "stream", "task_end"]
Draw = Literal["auto", "step", "pass"]


def _first_rows(output: Any, total: int, rows: int) -> Any:
    """``output`` of a forward over ``total`` rows, cut to its first ``rows`` (every tensor whose
    first dimension is ``total``, inside tensors, dicts, tuples, lists and attribute objects)."""
    if isinstance(output, Tensor):
        return output[:rows] if output.dim() > 0 and output.shape[0] == total else output
    if isinstance(output, Mapping):
        cut = copy.copy(output)
        for key, value in output.items():
            cut[key] = _first_rows(value, total, rows)  # type: ignore[index]
        return cut
    if isinstance(output, tuple):
        items = [_first_rows(v, total, rows) for v in output]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    if isinstance(output, list):
        return [_first_rows(v, total, rows) for v in output]
    if hasattr(output, "__dict__"):
        cut = copy.copy(output)
        for key, value in vars(output).items():
            setattr(cut, key, _first_rows(value, total, rows))
        return cut
    return output


def _check_pad_values(pad_values: Any) -> Optional[dict[str, Union[int, float]]]:
    if pad_values is None:
        return None
    if not isinstance(pad_values, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in pad_values.items()
    ):
        raise TypeError(
            f"`pad_values` must map buffer field names to pad numbers, e.g. "
            f"{{'input_ids': 0, 'attention_mask': 0, 'labels': -100}}, got {pad_values!r}."
        )
    return dict(pad_values)


class _BufferCallback(ContinualCallback):
    """Shared machinery: a rank-consistent buffer fed with every stream batch.

    Batches are read through :class:`~lightning_forget.batch.BatchFields` (``input_key``,
    ``target_key``, ``stream``): any tuple, namedtuple or dict of per-sample tensors, or one
    stream of a two-stream batch. Every per-sample tensor is stored. The buffer names them by
    their dict key; for positional batches the input is stored as ``"x"``, the target as ``"y"``
    and any other position under its index (``"2"``, ...) or namedtuple field name.
    """

    def __init__(
        self,
        buffer_size: int,
        replay_batch_size: Optional[int],
        buffer: Literal["reservoir", "class_balanced"],
        seed: int,
        input_key: FieldKey,
        target_key: FieldKey,
        stream: FieldKey,
        update: Update = "reservoir",
        draw: Draw = "step",
        pad_values: Optional[Mapping[str, Union[int, float]]] = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.buffer_size = check_int("buffer_size", buffer_size, min=1, fix="pass the number of samples to keep, e.g. 500")
        self.replay_batch_size = check_int(
            "replay_batch_size", replay_batch_size, min=1, allow_none=True,
            fix="pass the number of replayed samples per step, or None for the stream batch size",
        )
        self.buffer_kind = check_choice("buffer", buffer, ("reservoir", "class_balanced"))
        self.seed = check_int("seed", seed)
        #: The policies as given (``"auto"`` is resolved in the first ``setup``).
        self.requested_update = check_choice("update", update, ("auto", "reservoir", "stream", "task_end"))
        self.requested_draw = check_choice("draw", draw, ("auto", "step", "pass"))
        if self.requested_update == "task_end" and self.buffer_kind != "reservoir":
            raise ValueError(
                f"`buffer={buffer!r}` cannot be combined with `update='task_end'`: a task-end buffer keeps an "
                "equal share per task. Fix: use `buffer='reservoir'` with `update='task_end'`, or "
                "`update='stream'` with the class-balanced buffer."
            )
        self.pad_values = _check_pad_values(pad_values)
        self.fields = BatchFields(input_key, target_key, owner=owner, stream=stream)
        self.input_key, self.target_key, self.stream = input_key, target_key, stream
        self._resolve_policies(task_structured=False)
        #: The epoch the current task started at (the only epoch whose samples are offered
        #: when ``update`` is ``"stream"`` or ``"task_end"``).
        self._task_first_epoch = 0
        #: Where ``draw="pass"`` is in its passes over the buffer.
        self._pass = {"number": 0, "cursor": 0, "revision": -1, "size": 0}

    STATE_VERSION = 2

    #: Constructor arguments whose change a resume refuses (see ContinualCallback.state_arguments).
    state_arguments: tuple[str, ...] = ('buffer_size', 'buffer', 'update', 'input_key', 'target_key', 'stream')
    task_end_edits_weights = False

    def _resolve_policies(self, task_structured: bool) -> None:
        """Fix ``update``/``draw`` (``"auto"`` from whether the run has task boundaries) and build
        the buffer they need. Called at construction and again in the first ``setup``."""
        update, draw = self.requested_update, self.requested_draw
        #: ``update="auto"`` on a run whose task boundaries are not known in advance (fits without
        #: a continual datamodule): until the first task ends, replay rows come from the samples
        #: of the running task (see :meth:`draw`).
        self.replays_open_task = False
        if update == "auto":
            if self.buffer_kind != "reservoir":
                update = "reservoir"
            else:
                update = "task_end"
                self.replays_open_task = not task_structured
        if draw == "auto":
            draw = "pass" if update == "task_end" else "step"
        self.update, self.draw_mode = update, draw
        kind = "task_balanced" if update == "task_end" else self.buffer_kind
        self.buffer: ReplayBuffer = make_buffer(kind, self.buffer_size, seed=self.seed, pad_values=self.pad_values)
        self._policies_fixed = False

    def _fix_policies(self, trainer: "pl.Trainer") -> None:
        """Resolve ``"auto"`` once, before anything is stored or restored (see
        :class:`ExperienceReplay`): the task-end policy with shuffled passes, and, unless the
        trainer's datamodule is a continual stream of several tasks, replay from the running task
        until the first task ends."""
        if self._policies_fixed:
            return
        if "auto" in (self.requested_update, self.requested_draw):
            if len(self.buffer) or self._ended >= 0:  # pragma: no cover - setup comes first
                raise RuntimeError(f"{type(self).__name__}: the replay policy must be fixed before the buffer fills.")
            datamodule = task_schedule(trainer)
            self._resolve_policies(task_structured=datamodule is not None and int(datamodule.num_tasks) > 1)
        self._policies_fixed = True

    @property
    def state_key(self) -> str:
        # `update` joins the key only when it is not the reservoir, so the key of reservoir runs
        # (and their checkpoints) is the one of earlier releases.
        extra = {} if self.update == "reservoir" else {"update": self.update}
        return self._generate_state_key(buffer_size=self.buffer_size, buffer=self.buffer_kind, seed=self.seed, **extra)

    # ------------------------------------------------------------------ batch layout
    def split(self, batch: Any) -> SplitBatch:
        """The batch taken apart (see :class:`~lightning_forget.batch.SplitBatch`), checked.

        Raises:
            KeyError: ``input_key``/``target_key``/``stream`` name no field of the batch.
            TypeError: the input/target is not a per-sample tensor, or the batch holds per-sample
                lists that replayed rows would misalign.
        """
        split = self.fields.split(batch)
        split.require_tensors(type(self).__name__)
        if hasattr(self.buffer, "label_key") and split.target_name is not None:
            self.buffer.label_key = self._buffer_names(split)[split.target_name]  # type: ignore[attr-defined]
        return split

    def _buffer_names(self, split: SplitBatch) -> dict[str, str]:
        """Batch field name -> buffer field name."""
        if isinstance(split._like, Mapping):
            return {name: name for name in split.fields}
        names = {}
        for name in split.fields:
            if name == split.input_name:
                names[name] = _POSITIONAL_INPUT
            elif name == split.target_name:
                names[name] = _POSITIONAL_TARGET
            else:
                names[name] = name
        if len(set(names.values())) != len(names):
            raise ValueError(
                f"{type(self).__name__}: the batch's fields {sorted(split.fields)} clash with the buffer's names "
                f"'x'/'y' for the input and target. Fix: rename the namedtuple field, or use a dict batch."
            )
        return names

    def to_fields(self, batch: Any) -> dict[str, Tensor]:
        """The per-sample tensors of a stream batch, by buffer field name."""
        split = self.split(batch)
        return {self._buffer_names(split)[name]: value for name, value in split.fields.items()}

    def from_fields(self, like: Any, fields: dict[str, Tensor]) -> Any:
        """A batch of the same layout as ``like`` holding ``fields`` (by buffer field name)."""
        split = self.split(like)
        names = self._buffer_names(split)
        return split.rebuild({name: fields[names[name]] for name in split.fields})

    # ------------------------------------------------------------------ drawing and storing
    def draw(self, trainer: "pl.Trainer", batch_idx: int, n: int, salt: int = 0) -> dict[str, Tensor]:
        """``min(n, len(buffer))`` distinct buffer samples, with their slots under ``"index"``.

        ``draw="step"``: a fresh uniform draw each step, with a generator seeded from (seed, step,
        batch, rank). ``draw="pass"``: consecutive slices of shuffled passes over the buffer.
        """
        if self.buffer.is_empty and self.replays_open_task:
            return self._draw_open_task(trainer, batch_idx, n, salt)
        if self.draw_mode == "pass":
            index = self._pass_slots(trainer, n)
            drawn = self.buffer.take(index)
            drawn["index"] = index
            return drawn
        gen = rank_generator(self.seed, trainer.global_step, batch_idx, trainer.global_rank, salt)
        return self.buffer.sample(n, generator=gen, return_indices=True)

    def has_replay(self) -> bool:
        """Whether :meth:`draw` has rows to give (stored ones, or the running task's staged ones
        before the first task end when ``update="auto"`` met no task boundaries)."""
        if not self.buffer.is_empty:
            return True
        staged = getattr(self.buffer, "staging", None)
        return self.replays_open_task and staged is not None and not staged.is_empty

    def _draw_open_task(self, trainer: "pl.Trainer", batch_idx: int, n: int, salt: int) -> dict[str, Tensor]:
        """Uniform draws (seeded like ``draw="step"``) from the running task's staged rows: a
        uniform sample of the task's samples so far, i.e. reservoir ER, before any task ended."""
        buffer: TaskBalancedBuffer = self.buffer  # type: ignore[assignment]
        staged = buffer.staging
        assert staged is not None
        gen = rank_generator(self.seed, trainer.global_step, batch_idx, trainer.global_rank, salt)
        drawn = staged.sample(n, generator=gen, return_indices=True)
        drawn[TASK_KEY] = torch.full((int(drawn["index"].numel()),), int(buffer.staging_task), dtype=torch.long)
        return drawn

    def _pass_slots(self, trainer: "pl.Trainer", n: int) -> Tensor:
        """This rank's next ``n`` slots of the shuffled passes over the buffer (a DataLoader with
        ``shuffle=True`` iterated again whenever it runs out: no sample repeats within a pass).

        All ranks walk the same permutation (seeded from ``(seed, pass number)``) and take
        consecutive slices of it, rank by rank; a pass restarts when the stored rows change.
        """
        size = len(self.buffer)
        k, world, rank = min(int(n), size), int(trainer.world_size), int(trainer.global_rank)
        state = self._pass
        if state["revision"] != self.buffer.revision or state["size"] != size:
            state.update(number=state["number"] + 1, cursor=0, revision=self.buffer.revision, size=size)
        need, parts = k * world, []
        while need > 0:
            order = torch.randperm(size, generator=rank_generator(self.seed, state["number"], 0x9A55))
            part = order[state["cursor"] : state["cursor"] + need]
            parts.append(part)
            need -= int(part.numel())
            state["cursor"] += int(part.numel())
            if state["cursor"] >= size:
                state["number"] += 1
                state["cursor"] = 0
        return torch.cat(parts)[rank * k : (rank + 1) * k]

    def task_ids_of(self, drawn: dict[str, Tensor]) -> Optional[Tensor]:
        """The task ids of drawn samples (the buffer stores them under ``TASK_KEY``)."""
        return drawn.get(TASK_KEY)

    def offers_this_epoch(self, trainer: "pl.Trainer") -> bool:
        """Whether this epoch's stream samples are offered to the buffer.

        ``update="reservoir"`` offers every epoch's samples (a sample re-visited in a later epoch
        counts as a new one). ``"stream"`` and ``"task_end"`` offer each sample once per task: the
        batches carry no sample id, and one epoch covers the task's training set once, so only
        the first epoch of each task is offered.
        """
        return self.update == "reservoir" or trainer.current_epoch == self._task_first_epoch

    def store(self, trainer: "pl.Trainer", batch_idx: int, fields: dict[str, Tensor]) -> None:
        """Offer the stream samples of all ranks to the buffer (the same on every rank).

        Rows a ``DistributedSampler`` repeated to even out the ranks are dropped (after the gather,
        which is then one collective), so every sample of the dataset is offered once per epoch.
        """
        if not self.offers_this_epoch(trainer):
            return
        fields = {k: v.detach() for k, v in fields.items()}
        padded = sampler_padding_mask(trainer, batch_idx, int(next(iter(fields.values())).shape[0]))
        # Under a DistributedSampler every rank holds as many rows as the others, so the padding
        # mask travels with the rows and the gather is one collective.
        keep = None if padded is None else ~padded
        self.buffer.add(gather_batch(trainer, fields, keep=keep), task=self.current_task(trainer))

    def replay_size(self, stream_rows: int) -> int:
        return self.replay_batch_size or int(stream_rows)

    @staticmethod
    def _loader_rows(context: StepContext, split: SplitBatch) -> int:
        """Rows of the loader's batch in the (possibly already joined) sub-batch ``split``."""
        size = context.loader_size(split.stream)
        return int(split.size if size is None else size)

    # ------------------------------------------------------------------ task events
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._fix_policies(trainer)
        if (
            stage == "fit" and self.requested_update == "task_end" and task_schedule(trainer) is None
            and self._ended < 0
        ):
            rank_zero_warn(
                f"{type(self).__name__}(update='task_end') fills its buffer when a task ends; this fit is the "
                "first task (one fit per task), so nothing is replayed before the next fit. For a task-free "
                "stream (one fit, no task boundaries) use `update='reservoir'`.",
                category=UserWarning,
            )

    @override
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        self._task_first_epoch = int(trainer.current_epoch)

    @override
    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if isinstance(self.buffer, TaskBalancedBuffer):
            self.buffer.end_task(task)

    # ------------------------------------------------------------------ state
    @override
    def method_state(self) -> dict[str, Any]:
        return {
            "buffer": self.buffer.state_dict(),
            "update": self.update,
            "task_first_epoch": self._task_first_epoch,
            "pass": dict(self._pass),
        }

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        if state["update"] != self.update and self.requested_update == "auto" and not len(self.buffer):
            # `update="auto"` resolved to the checkpoint's policy in the run that wrote it (a
            # validate/test, or a resume whose datamodule is not known yet, may resolve otherwise).
            self._resolve_policies(task_structured=state["update"] == "task_end")
            self._policies_fixed = True
        if state["update"] != self.update and self._restoring_for not in (None, "fit"):
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's buffer was filled with update={state['update']!r}, this "
                f"callback has update={self.update!r}; the buffer is not loaded for {self._restoring_for}, which does "
                "not train.",
                category=UserWarning,
            )
            return
        if state["update"] != self.update:
            raise RuntimeError(
                f"{type(self).__name__}: the checkpoint was written with update={state['update']!r}, this "
                f"callback has update={self.update!r}; build it with the checkpoint's `update` to resume."
            )
        self.buffer.load_state_dict(state["buffer"])
        self._task_first_epoch = int(state["task_first_epoch"])
        self._pass = {key: int(value) for key, value in state["pass"].items()}

    @override
    def migrate_state(self, state: dict[str, Any], version: int) -> dict[str, Any]:
        if version != 1:
            return super().migrate_state(state, version)
        # Version 1 (reservoir only): no task ids were stored, every epoch was offered and draws
        # were per step. Rows of unknown task get task id -1.
        buffer = dict(state["buffer"])
        storage = dict(buffer["storage"])
        storage[TASK_KEY] = torch.full((int(buffer["size"]),), -1, dtype=torch.long)
        buffer["storage"] = storage
        return {"buffer": buffer, "update": "reservoir", "task_first_epoch": 0,
                "pass": {"number": 0, "cursor": 0, "revision": -1, "size": 0}}

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        remove_training_step_hooks(pl_module, self.state_key)


class ExperienceReplay(_BufferCallback):
    """Experience Replay (ER): train on the stream batch joined with samples from a buffer.

    Chaudhry et al., "On Tiny Episodic Memories in Continual Learning" (arXiv 2019); the
    reservoir variant of Buzzega et al. (NeurIPS 2020). Before each training step, a batch of
    ``replay_batch_size`` samples drawn from the buffer is appended to the stream batch, so the
    module's own ``training_step`` computes its loss over both (the mean loss over the joint
    batch). After the step, the stream samples of every rank are offered to the buffer.

    Works with any LightningModule whose batches are tuples, namedtuples or dicts of per-sample
    tensors (all such fields are stored and replayed; per-sample lists are refused with an error,
    since replayed rows would misalign them), and with two-stream batches from ``CombinedLoader``
    (``stream=`` names the sub-batch replay joins). Under DDP the buffer receives the gathered
    stream samples of all ranks, less the repeats ``DistributedSampler`` pads the last batch with,
    so it is identical on every rank; each rank draws its replay samples with a generator seeded
    from ``(seed, global_step, batch_idx, rank)``.

    **When samples enter the buffer** (``update``):

    - ``"reservoir"``: reservoir sampling over every batch offered (Buzzega et al.'s ER, as in
      Mammoth). In a multi-epoch task each epoch's re-visit of a sample is counted as a new stream
      sample, so a task's samples fill the buffer with duplicates and the last task trained gets
      more than its share. The policy for task-free streams (no task boundaries).
    - ``"stream"``: the same reservoir, but each sample counted once per task: only the first
      epoch of each task is offered (batches carry no sample id; one epoch covers the task once).
    - ``"task_end"``: a :class:`~lightning_forget.buffers.TaskBalancedBuffer`: the task's samples
      (first epoch, once each) are staged in a bounded reservoir and enter the buffer when the task
      ends, every task seen holding an equal share (Avalanche's experience-balanced buffer). Replay
      during task ``t`` therefore draws only tasks ``0..t-1``, and nothing is replayed in task 0.

    **How replay rows are drawn** (``draw``): ``"step"`` draws ``replay_batch_size`` distinct
    samples uniformly each step, independently of other steps; ``"pass"`` walks shuffled passes
    over the buffer (as a ``DataLoader(shuffle=True)`` over it, restarted when exhausted or when
    the stored rows change), so every stored sample is replayed once before any is replayed twice.

    The default ``update="auto", draw="auto"`` is the task-end policy with shuffled passes
    (``update="task_end", draw="pass"``, Avalanche's ``ReplayPlugin`` default) in both ways of
    running a stream, decided in the first ``setup``:

    - one fit over a continual stream of several tasks (the library's datamodules, or any with
      ``num_tasks``, ``epochs_per_task`` and ``task_of_epoch``): exactly ``"task_end"``/``"pass"``;
    - fits without such a datamodule (plain ``DataLoader`` objects): each fit is one task, and its end
      a task boundary (the library's one-fit-per-task protocol), so from the second fit on replay
      draws only tasks that have ended, as above. What the first fit cannot know is whether
      another fit will follow (one fit per task) or not (a task-free stream in one fit). So
      until the first task ends, the replay rows are drawn uniformly, per step, from the running
      task's staged samples, which are a uniform sample of everything the fit has offered so far:
      reservoir ER over the stream (Buzzega et al.), replay from the second step on (as with every
      task-end policy, only the first epoch of a task is offered). A task-free
      stream thus gets reservoir replay, and a sequence of fits gets the task-end policy. The
      state needs no record of the decision: it follows from the stored rows (none stored yet:
      the running task's rows are drawn), so checkpoints and resumes need nothing special.

    A :class:`~lightning_forget.datamodules.ContinualDataModule` of one task counts as a fit
    without boundaries. ``buffer="class_balanced"`` resolves ``"auto"`` to ``"reservoir"``.
    The task-end policy kept more old-task accuracy than the reservoir on every stream of
    ``benchmarks/er_policy.py`` (multi-epoch, online, and online with one fit per task against
    Avalanche itself; docs/results.md). Pass ``update="reservoir", draw="step"`` for the reservoir
    ER of Buzzega et al. and Mammoth (the default of earlier releases, and what published Mammoth
    ER numbers use).

    The replayed rows are appended after the loader's rows and recorded in the step's context
    (:func:`lightning_forget.losses.step_context`): other callbacks can read which rows are
    replayed (``context.replay_rows()``), their stored fields and their task ids
    (``context.replay_task_ids()``; ``-1`` for rows restored from a checkpoint of an older release).

    Token batches: name the variable-length fields in ``pad_values`` (buffer field names, e.g.
    ``{"input_ids": 0, "attention_mask": 0, "labels": -100}``); they are stored with their length,
    re-padded to the longest drawn row, and stream and replay rows are right-padded to a common
    length before they are joined.

    Args:
        buffer_size: samples kept in memory (over the whole stream; memory does not grow).
        replay_batch_size: replayed samples per step (default: the stream batch size).
        buffer: ``"reservoir"`` (uniform over everything seen) or ``"class_balanced"`` (with
            ``update`` ``"reservoir"`` or ``"stream"``).
        seed: seed of the buffer and of the replay draws.
        input_key: the model input's dict key or namedtuple field (``str``) or tuple position
            (``int``); ``None`` finds it (see :class:`~lightning_forget.batch.BatchFields`).
        target_key: the same for the labels.
        stream: the sub-batch of a two-stream batch to replay into (``None``: one-stream batches).
        update: ``"auto"``, ``"reservoir"``, ``"stream"`` or ``"task_end"`` (above).
        draw: ``"auto"``, ``"step"`` or ``"pass"`` (above; ``"auto"``: ``"pass"`` with
            ``"task_end"``, else ``"step"``).
        pad_values: variable-length (token) fields and their pad values (``None``: none).

    Raises:
        TypeError: an argument of the wrong type; a batch layout it cannot read (first batch).
        ValueError: a non-positive size, an unknown buffer kind, update or draw, or
            ``buffer="class_balanced"`` with ``update="task_end"``.
        KeyError: ``input_key``/``target_key``/``stream`` name no field of the batch (first batch).
        RuntimeError: a resume from a checkpoint written with other buffer settings (``update``
            included).

    Note:
        Logged keys: ``replay/buffer_size`` (samples held). Saved state: the buffer (stored
        rows with their task ids and sequence lengths, counters, generator, and for
        ``"task_end"`` the staged rows of the open task), the first epoch of the current task,
        the position of ``draw="pass"`` and the task counters.
    """

    #: Tested single-process and under DDP; sharded strategies are refused in ``setup``.
    supported_strategies: tuple[str, ...] = DDP_STRATEGIES + SHARDED_STRATEGIES

    def __init__(
        self,
        buffer_size: int = 500,
        replay_batch_size: Optional[int] = None,
        buffer: Literal["reservoir", "class_balanced"] = "reservoir",
        seed: int = 0,
        input_key: Optional[Union[str, int]] = None,
        target_key: Optional[Union[str, int]] = None,
        stream: Optional[Union[str, int]] = None,
        update: Update = "auto",
        draw: Draw = "auto",
        pad_values: Optional[dict[str, Union[int, float]]] = None,
    ) -> None:
        super().__init__(
            buffer_size, replay_batch_size, buffer, seed, input_key, target_key, stream,
            update=update, draw=draw, pad_values=pad_values,
        )

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            training_step_hooks(pl_module).add_batch_transform(self.state_key, self._join_replay)

    def _join_replay(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> Any:
        split = self.split(batch)
        if not self.has_replay():
            return batch
        context = step_context(pl_module)
        names = self._buffer_names(split)
        drawn = self.draw(pl_module.trainer, batch_idx, self.replay_size(self._loader_rows(context, split)))
        missing = sorted(set(names.values()) - set(drawn))
        if missing:
            raise RuntimeError(
                f"ExperienceReplay: the batch's fields {sorted(names.values())} are not all in the buffer "
                f"(it holds {sorted(k for k in drawn if k != 'index')}); the batch layout changed during the run."
            )
        joined = {
            name: self._join_rows(names[name], value, drawn[names[name]].to(value.device, value.dtype))
            for name, value in split.fields.items()
        }
        stored = {k: v for k, v in drawn.items() if k not in ("index", TASK_KEY)}
        context.add_replay(
            self.state_key, split.size, int(drawn["index"].numel()), stored, self.task_ids_of(drawn), split.stream
        )
        return split.rebuild(joined)

    def _join_rows(self, key: str, stream: Tensor, replay: Tensor) -> Tensor:
        """Stream rows then replay rows; sequence fields padded to a common length first."""
        pad = (self.pad_values or {}).get(key)
        if pad is not None and stream.dim() > 1:
            width = max(int(stream.shape[1]), int(replay.shape[1]))
            stream, replay = pad_rows(stream, width, pad), pad_rows(replay, width, pad)
        return torch.cat([stream, replay])

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if step_context(pl_module).skipped:
            return
        self.store(trainer, batch_idx, self.to_fields(batch))
        pl_module.log("replay/buffer_size", float(len(self.buffer)), on_step=True, on_epoch=False)


class DarkExperienceReplay(_BufferCallback):
    """Dark Experience Replay++ (DER++): replay logits and labels from a buffer.

    Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple
    Baseline" (NeurIPS 2020). The buffer stores each stream sample with the logits the
    network produced for it when it was seen. The loss of every step is

        CE(stream) + α · MSE(f(x₁), z₁) + β · CE(f(x₂), y₂),

    where ``(x₁, z₁)`` and ``(x₂, y₂)`` are two independent draws from the buffer (the paper's
    defaults on Split MNIST: α = 0.1, β = 0.5). The module's own ``training_step`` computes
    CE(stream); the two replay terms are added inside the same step through
    :mod:`lightning_forget.losses`, so DDP reduces one gradient. Logits are stored in float32
    whatever the training precision (bf16 logits would lose about two decimal digits).

    The stream logits are captured from the first call of the module's logits function inside
    ``training_step`` (``self(x)``, or the submodule named by ``forward_fn``; it may return a tensor, a dict
    or an object with ``logits``, see :func:`~lightning_forget.batch.logits_of`); override
    :meth:`stream_logits` otherwise. The replay forwards call the same function with the stored
    input. Combined with :class:`ExperienceReplay` (in either order), the captured forward covers
    the joined batch and its first rows, the loader's, are the ones stored. The two replay
    forwards run inside :meth:`~lightning_forget.losses.StepContext.forward_of_stored`, so layers
    that need each row's task (AdaB²N) find the drawn rows' stored task ids.

    With AdaB²N layers in the model (:class:`~lightning_forget.callbacks.AdaB2N`), the two draws
    are instead joined as rows of the step's one forward, as in the official AdaB²N DER++ code:
    the first forward of ``training_step`` runs on ``[step's rows; draw 1; draw 2]`` (their
    inputs appended to its first argument, which must then be the input tensor), the user's
    step gets the output of its own rows only, and the two replay terms use the output of the
    appended rows. The normalisation statistics then mix stream and buffer rows, the momentum
    recursion advances once per step, and the statistics loss is counted once. The appended
    rows are announced in :attr:`~lightning_forget.losses.StepContext.joined_forward` (with
    their stored task ids) while that forward runs.

    Args:
        buffer_size: samples kept (with their logits).
        alpha: weight of the logit-matching (MSE) term.
        beta: weight of the buffer cross-entropy term (``beta=0`` gives DER).
        replay_batch_size: samples per buffer draw (default: the stream batch size).
        buffer: ``"reservoir"`` or ``"class_balanced"``.
        seed: seed of the buffer and of the draws.
        input_key: the model input's field (see :class:`ExperienceReplay`).
        target_key: the labels' field.
        stream: the sub-batch of a two-stream batch whose samples are stored.
        forward_fn: the module's logits function for the captured stream forward and the replay
            forwards: ``None`` for its ``forward``, or the name of a submodule (``"net"``) for a
            module without one (see :class:`~lightning_forget.forward.ModelForward`).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: bad sizes, negative or non-finite weights.
        RuntimeError: the module has no ``forward`` and no ``forward_fn`` (``setup``); the
            module's training step never called its logits function; a resume from a
            checkpoint written with other settings; manual optimization without
            :func:`~lightning_forget.losses.add_loss_terms` (first step).

    Note:
        Logged keys: ``derpp/mse``, ``derpp/ce`` (the unweighted replay terms),
        ``derpp/buffer_size``. Saved state: the buffer (inputs, labels, logits) and counters.
    """

    #: Tested single-process and under DDP; sharded strategies are refused in ``setup``.
    supported_strategies: tuple[str, ...] = DDP_STRATEGIES + SHARDED_STRATEGIES

    #: Buffer field of the stored logits.
    LOGITS = "logits"

    def __init__(
        self,
        buffer_size: int = 500,
        alpha: float = 0.1,
        beta: float = 0.5,
        replay_batch_size: Optional[int] = None,
        buffer: Literal["reservoir", "class_balanced"] = "reservoir",
        seed: int = 0,
        input_key: Optional[Union[str, int]] = None,
        target_key: Optional[Union[str, int]] = None,
        stream: Optional[Union[str, int]] = None,
        forward_fn: Optional[str] = None,
    ) -> None:
        super().__init__(buffer_size, replay_batch_size, buffer, seed, input_key, target_key, stream)
        self.model_forward = ModelForward(forward_fn, owner="DarkExperienceReplay")
        self.forward_fn = forward_fn
        self.alpha = check_float("alpha", alpha, min=0.0, fix="pass a finite weight >= 0 for the logit MSE, e.g. 0.1")
        self.beta = check_float("beta", beta, min=0.0, fix="pass a finite weight >= 0 for the buffer CE, e.g. 0.5")
        self._captured: Optional[Tensor] = None
        self._capture_error: Optional[str] = None
        self._armed = False
        self._hook: Any = None
        self._join_hook: Any = None
        self._owner: Any = None
        #: Whether the buffer draws join the step's forward (AdaB²N layers in the model).
        self._join = False
        self._draws: Optional[tuple[dict[str, Tensor], dict[str, Tensor]]] = None
        self._joined_rows: Optional[tuple[int, int, int]] = None
        self._joined_out: Optional[tuple[Tensor, Tensor]] = None
        self._join_input = _POSITIONAL_INPUT

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            buffer_size=self.buffer_size, buffer=self.buffer_kind, seed=self.seed, alpha=self.alpha, beta=self.beta
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update({"_hook": None, "_captured": None, "_armed": False, "_capture_error": None, "_join_hook": None,
                      "_draws": None, "_joined_rows": None, "_joined_out": None, "_owner": None})
        return state

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        hooks = training_step_hooks(pl_module)
        hooks.add_batch_transform(self.state_key, self._arm)
        hooks.add_loss_term(self.state_key, self._replay_loss)
        self._owner = pl_module  # the step context lives on the LightningModule, not on a hooked submodule
        if self._hook is None:
            # On the module whose forward gives the logits (the LightningModule, or the submodule
            # named by `forward_fn`), first among its hooks: the joined forward is cut back to the
            # step's rows before any other hook (or the user's step) sees the output.
            target = self.model_forward.hook_module(pl_module)
            self._hook = target.register_forward_hook(CopySafeHook(self._on_forward), prepend=True)
        if self._join_hook is None:
            target = self.model_forward.hook_module(pl_module)
            self._join_hook = target.register_forward_pre_hook(
                CopySafeHook(self._join_draws), prepend=True, with_kwargs=True
            )

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        # After every callback's setup, so AdaB2N has converted the layers by now.
        self._join = bool(adab2n_layers(pl_module))

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        for name in ("_hook", "_join_hook"):
            handle = getattr(self, name)
            if handle is not None:
                handle.remove()
                setattr(self, name, None)
        self._draws = self._joined_rows = self._joined_out = self._owner = None

    def to_fields(self, batch: Any) -> dict[str, Tensor]:
        fields = super().to_fields(batch)
        if self.LOGITS in fields:
            raise ValueError(
                f"DarkExperienceReplay stores the logits under {self.LOGITS!r}, but the batch already has a "
                f"field of that name. Fix: rename the batch's {self.LOGITS!r} field."
            )
        return fields

    def _arm(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> Any:
        split = self.split(batch)  # check the layout before the step
        self._captured = None
        self._capture_error = None
        self._armed = True
        self._draws = self._joined_rows = self._joined_out = None
        if self._join and not self.buffer.is_empty:
            self._draws = self._draw_pair(pl_module, split, batch_idx)
            self._join_input = self._buffer_names(split)[split.input_name]
        return batch

    def _draw_pair(self, pl_module: "pl.LightningModule", split: SplitBatch, batch_idx: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The step's two independent buffer draws (for the logit and the label term)."""
        n = self.replay_size(self._loader_rows(step_context(pl_module), split))
        trainer = pl_module.trainer
        return self.draw(trainer, batch_idx, n, salt=1), self.draw(trainer, batch_idx, n, salt=2)

    def _join_draws(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[tuple[Any, Any]]:
        """Forward pre-hook: append the two draws' inputs to the step's first forward."""
        if not self._armed or self._draws is None or self._joined_rows is not None:
            return None
        if not args or not isinstance(args[0], Tensor):
            raise RuntimeError(
                "DarkExperienceReplay joins its buffer draws to the step's forward when the model has AdaB2N "
                f"layers, so the forward's first argument must be the input tensor; {type(module).__name__} got "
                f"{type(args[0]).__name__ if args else 'no positional argument'}. Fix: call `self(x)` with the "
                "input tensor first in training_step."
            )
        x = args[0]
        first, second = self._draws
        extra = [d[self._join_input].to(x.device, x.dtype) for d in (first, second)]
        rows, n1, n2 = int(x.shape[0]), int(extra[0].shape[0]), int(extra[1].shape[0])
        self._joined_rows = (rows, n1, n2)
        step_context(self._owner).joined_forward = [  # type: ignore[arg-type]
            ReplaySegment(self.state_key, 0, n1, first, self.task_ids_of(first)),
            ReplaySegment(self.state_key, n1, n1 + n2, second, self.task_ids_of(second)),
        ]
        return (torch.cat([x, *extra]), *args[1:]), kwargs

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._joined_rows is not None and self._joined_out is None:
            rows, n1, n2 = self._joined_rows
            step_context(self._owner).joined_forward = []  # type: ignore[arg-type]
            logits = logits_of(output)
            self._joined_out = (logits[rows : rows + n1], logits[rows + n1 : rows + n1 + n2])
            output = _first_rows(output, rows + n1 + n2, rows)
            self._capture(output)
            return output
        self._capture(output)
        return None

    def _capture(self, output: Any) -> None:
        if self._armed:
            self._armed = False
            try:
                self._captured = logits_of(output).detach()
            except TypeError as error:
                self._captured, self._capture_error = None, str(error)

    def stream_logits(self, pl_module: "pl.LightningModule", batch: Any) -> Tensor:
        """The logits of this step's first forward (override if the step does not call ``self(x)``).

        Rows are those of the batch the user's step saw: the loader's rows first.
        """
        if self._captured is None:
            detail = f" ({self._capture_error})" if self._capture_error else ""
            raise RuntimeError(
                f"DarkExperienceReplay needs the logits of the stream batch, but "
                f"{type(pl_module).__name__}.training_step did not call its logits function "
                f"({self._forward_name(pl_module)}) returning logits{detail}. Call it in training_step, pass "
                "`forward_fn=` naming the submodule training_step calls, or override "
                "`DarkExperienceReplay.stream_logits`."
            )
        return self._captured

    def _forward_name(self, pl_module: "pl.LightningModule") -> str:
        name = self.model_forward.forward_fn
        return "`self(x)`" if name is None else f"`self.{name}(x)`, from `forward_fn`"

    def replay_logits(self, pl_module: "pl.LightningModule", drawn: dict[str, Tensor], input_name: str) -> Tensor:
        """The module's logits for drawn buffer samples (override for forwards taking more than ``x``)."""
        return self.model_forward(pl_module, drawn[input_name].to(pl_module.device))

    def _replay_loss(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int, output: Any) -> Optional[Tensor]:
        self._armed = False
        if self.buffer.is_empty:
            return None
        split = self.split(batch)
        names = self._buffer_names(split)
        input_name, target_name = names[split.input_name], names[split.target_name]  # type: ignore[index]
        if self._draws is not None:  # joined to the step's forward (AdaB²N)
            first, second = self._draws
            if self._joined_out is None:
                raise RuntimeError(
                    "DarkExperienceReplay joins its buffer draws to the step's first forward when the model has "
                    f"AdaB2N layers, but {type(pl_module).__name__}.training_step did not call the module's forward "
                    "(`self(x)`). Fix: call `self(x)` in training_step."
                )
            out, second_out = self._joined_out
            self._draws = self._joined_rows = self._joined_out = None
        else:
            first, second = self._draw_pair(pl_module, split, batch_idx)
            context = step_context(pl_module)
            with context.forward_of_stored(self.state_key, int(first["index"].numel()), first, self.task_ids_of(first)):
                out = self.replay_logits(pl_module, first, input_name)
            with context.forward_of_stored(self.state_key, int(second["index"].numel()), second, self.task_ids_of(second)):
                second_out = self.replay_logits(pl_module, second, input_name)
        dtype = torch.promote_types(out.dtype, torch.float32)
        mse = nn.functional.mse_loss(out.to(dtype), first[self.LOGITS].to(out.device, dtype))
        ce = nn.functional.cross_entropy(second_out, second[target_name].to(pl_module.device))
        pl_module.log_dict({"derpp/mse": mse.detach(), "derpp/ce": ce.detach()}, on_step=True, on_epoch=False)
        return self.alpha * mse + self.beta * ce

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._armed = False
        if step_context(pl_module).skipped:
            self._captured = None
            return
        fields = self.to_fields(batch)
        n = int(next(iter(fields.values())).shape[0])
        logits = self.stream_logits(pl_module, batch)
        if logits.shape[0] < n:
            raise RuntimeError(
                f"DarkExperienceReplay: the captured forward returned {logits.shape[0]} rows of logits for a "
                f"batch of {n} samples; the first forward in training_step must cover the whole batch. "
                "Fix: call `self(x)` on the full batch first, or override `stream_logits`."
            )
        logits = logits[:n]
        # fp32 at least, whatever the training precision (bf16-mixed forwards return bf16 logits)
        fields[self.LOGITS] = logits.to(torch.promote_types(logits.dtype, torch.float32))
        self.store(trainer, batch_idx, fields)
        self._captured = None
        pl_module.log("derpp/buffer_size", float(len(self.buffer)), on_step=True, on_epoch=False)
