"""LiNeS as a Lightning callback: scale the fine-tuning residual linearly with depth at the end."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_forget import merging, reporting
from lightning_forget.sharding import edit_local, full_tensor, is_sharded, local_clone, reshard, shard_like
from lightning_forget.precision import forward_context
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES, atomic_edit, fit_ends_after_batch
from lightning_forget.tasks import ContinualCallback
from lightning_forget.validation import check_bool

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["LiNeS", "load_weights", "scales_figure", "validation_score"]

ScoreFn = Callable[["pl.LightningModule"], float]


def load_weights(path: Union[str, os.PathLike]) -> tuple[dict[str, Tensor], Optional[dict[str, Any]]]:
    """Load a state dict from ``path``: a Lightning checkpoint (its ``"state_dict"``) or a plain one.

    Args:
        path: file written by ``torch.save`` (a state dict) or by Lightning (a checkpoint).

    Returns:
        ``(state_dict, checkpoint)`` where ``checkpoint`` is the whole checkpoint dict when the
        file was a Lightning checkpoint, else ``None``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file holds neither a state dict nor a checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No weights file at {path!r}; pass the path of a Lightning checkpoint or a state dict.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - checkpoints may hold objects the safe unpickler refuses
        rank_zero_warn(f"{path!r} holds non-tensor objects; loading it with the full unpickler (trusted files only).")
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return dict(obj["state_dict"]), dict(obj)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj), None
    raise ValueError(
        f"{path!r} holds a {type(obj).__name__} that is neither a Lightning checkpoint (a dict with "
        "'state_dict') nor a state dict of tensors."
    )


def _align_names(names: list[str], loaded: Mapping[str, Tensor], path: str) -> dict[str, Tensor]:
    """Map the module's parameter names onto the loaded keys, allowing one fixed prefix."""
    if all(n in loaded for n in names):
        return {n: loaded[n] for n in names}
    first = names[0]
    parts = first.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i]) + "."
        if all(n.startswith(prefix) and n[len(prefix):] in loaded for n in names):
            return {n: loaded[n[len(prefix):]] for n in names}
    missing = [n for n in names if n not in loaded][:5]
    raise KeyError(
        f"`pretrained_ckpt`={path!r} lacks parameters of the model, e.g. {missing} (its keys look "
        f"like {list(loaded)[:3]}). Save the pre-trained weights from the same LightningModule, "
        "or a state dict of the wrapped model (a fixed prefix such as 'model.' is recognised)."
    )


class _LogRecorder:
    """What a module's validation hooks pass to ``self.log``/``self.log_dict``, for one metric.

    Installed on the module instance by :func:`validation_score` for the duration of the scoring
    pass and always removed after it: Lightning's own result collection only exists inside its
    loops, and :meth:`lightning.pytorch.Trainer.validate` is not safe to run inside ``fit`` (see
    :func:`validation_score`).
    """

    def __init__(self, monitor: str, multiple: bool) -> None:
        self.monitor = monitor
        self.multiple = multiple  # several loaders: step-level keys get "/dataloader_idx_{i}"
        self.dataloader_idx = 0
        self.total = torch.zeros(2, dtype=torch.float64)  # Σ value·batch_size, Σ batch_size
        self.metric: Any = None
        self.seen: set[str] = set()

    def record(self, name: str, value: Any, batch_size: Optional[int] = None, add_dataloader_idx: bool = True) -> None:
        from torchmetrics import Metric

        key = f"{name}/dataloader_idx_{self.dataloader_idx}" if self.multiple and add_dataloader_idx else name
        self.seen.add(key)
        if key != self.monitor:
            return
        if isinstance(value, Metric):
            self.metric = value
            return
        weight = float(batch_size) if batch_size else 1.0
        self.total[0] += float(value) * weight
        self.total[1] += weight

    def log(self, name: str, value: Any, *args: Any, batch_size: Optional[int] = None, add_dataloader_idx: bool = True, **kwargs: Any) -> None:
        self.record(name, value, batch_size, add_dataloader_idx)

    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, batch_size: Optional[int] = None, add_dataloader_idx: bool = True, **kwargs: Any) -> None:
        for name, value in dictionary.items():
            self.record(name, value, batch_size, add_dataloader_idx)


def validation_score(
    pl_module: "pl.LightningModule", monitor: str, dataloaders: Any = None
) -> float:
    """The mean of ``monitor`` that the module's own validation logs, over ``dataloaders``.

    This is how :class:`LiNeS` scores each α of a sweep when it is given ``monitor`` (and the
    building block for a custom ``score_fn``). It runs, in eval mode and under
    ``torch.no_grad()``, the module's ``on_validation_epoch_start``, its ``validation_step`` on
    every batch of every loader (with ``dataloader_idx`` when there are several) and its
    ``on_validation_epoch_end``, and reads what they pass to ``self.log``/``self.log_dict``:

    - a logged tensor or number: the mean over batches, weighted by ``batch_size`` when given,
      summed across ranks through ``trainer.strategy.reduce`` (each rank sees its shard of the
      loaders Lightning built for ``fit``);
    - a logged ``torchmetrics.Metric``: its ``compute()`` (which syncs across ranks).

    With several loaders a step-level key gets Lightning's ``/dataloader_idx_{i}`` suffix unless
    logged with ``add_dataloader_idx=False``; epoch-level keys carry none. The module's
    ``torchmetrics`` objects are reset for the pass and their states put back after it, so a
    run's accumulated counts (e.g. an accuracy matrix) are not disturbed.

    Why not :meth:`~lightning.pytorch.Trainer.validate`: LiNeS scores at the end of ``fit``,
    where ``trainer.validate`` re-runs the whole Trainer machinery: every callback's validation
    hooks fire again (ModelCheckpoint, EarlyStopping and ContinualMetrics would see the sweep as
    extra validation epochs), the loggers receive the sweep's metrics at the last step, the Trainer's
    state and ``callback_metrics`` are left changed, the strategy tears down (moving the model
    off the GPU), and under ``strategy="ddp_spawn"`` it would try to start new worker processes. Only the
    module's own hooks run here; callbacks, loggers and the progress bar see nothing.

    Args:
        pl_module: a module attached to a Trainer (``pl_module.trainer``).
        monitor: key the module logs in its validation hooks.
        dataloaders: a loader or a list of loaders; ``None`` → ``trainer.val_dataloaders``.

    Returns:
        The score (identical on every rank).

    Raises:
        RuntimeError: no loaders, or ``monitor`` was never logged (the message lists the keys
            that were).
    """
    from torchmetrics import Metric

    trainer = pl_module.trainer
    loaders = trainer.val_dataloaders if dataloaders is None else dataloaders
    if loaders is None:
        raise RuntimeError(
            f"LiNeS scores α with `monitor`={monitor!r} on the validation data, but the trainer has "
            "none. Fix: give the model/datamodule a val_dataloader, or pass `score_fn`."
        )
    loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    multiple = len(loaders) > 1
    recorder = _LogRecorder(monitor, multiple)
    metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
    saved = [{name: copy.deepcopy(getattr(m, name)) for name in m._defaults} for m in metrics]
    for m in metrics:
        m.reset()
    was_training = pl_module.training
    pl_module.eval()
    pl_module.log, pl_module.log_dict = recorder.log, recorder.log_dict  # type: ignore[method-assign]
    metric_value: Optional[float] = None
    try:
        with torch.no_grad():
            pl_module.on_validation_epoch_start()
            for i, loader in enumerate(loaders):
                recorder.dataloader_idx = i
                for batch_idx, batch in enumerate(loader):
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=i)
                    if multiple:
                        pl_module.validation_step(batch, batch_idx, i)
                    else:
                        pl_module.validation_step(batch, batch_idx)
            recorder.multiple = False  # epoch-level logs carry no loader index
            pl_module.on_validation_epoch_end()
            # A logged Metric object is computed before its state is put back.
            if recorder.metric is not None:
                metric_value = float(recorder.metric.compute())
    finally:
        del pl_module.log, pl_module.log_dict
        pl_module.train(was_training)
        for m, states in zip(metrics, saved):
            m.reset()
            for name, value in states.items():
                setattr(m, name, value)
    if metric_value is not None:
        return metric_value
    total = trainer.strategy.reduce(recorder.total.to(pl_module.device), reduce_op="sum").cpu()
    if float(total[1]) == 0.0:
        raise RuntimeError(
            f"LiNeS' sweep `monitor`={monitor!r} was never logged by the module's validation; keys "
            f"logged: {sorted(recorder.seen)}. Fix `monitor` or pass `score_fn`."
        )
    return float(total[0] / total[1])


def scales_figure(
    block_scales: list[float],
    alpha: float,
    beta: float,
    head_policy: str = "exclude",
    sweep_scores: Optional[Mapping[float, float]] = None,
    score_name: str = "score",
) -> Any:
    """A matplotlib ``Figure`` of the LiNeS scales λ(ℓ) per block (and the α sweep, if any).

    Left: λ(ℓ) = α + β·(ℓ−1)/(L−1) for each block, the dashed line at α marks the scale of the
    parameters outside the blocks. Right (only with ``sweep_scores``): the score of each swept α,
    the chosen one highlighted. The figure uses an Agg canvas (no display, no pyplot state); save
    it with ``figure.savefig(path)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if sweep_scores else 1
    figure = Figure(figsize=(4.8 * panels, 3.6), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, panels, 1)
    blocks = list(range(len(block_scales)))
    axes.plot(blocks, block_scales, marker="o", color="tab:blue", label="λ(ℓ) of block ℓ")
    axes.axhline(alpha, color="tab:gray", linestyle="--", linewidth=1, label="non-block parameters (α)")
    axes.set_xlabel("block ℓ (0 = shallowest)")
    axes.set_ylabel("scale of the fine-tuning update")
    axes.set_ylim(min(0.0, min(block_scales, default=0.0)) - 0.05, max(1.0, max(block_scales, default=1.0)) + 0.05)
    if len(blocks) <= 24:
        axes.set_xticks(blocks)
    axes.set_title(f"LiNeS scales: α={alpha:g}, β={beta:g}, head: {head_policy}", fontsize=10)
    axes.legend(fontsize=8, loc="lower right")
    if sweep_scores:
        grid = sorted(sweep_scores)
        right = figure.add_subplot(1, panels, 2)
        right.plot(grid, [sweep_scores[a] for a in grid], marker="o", color="tab:green")
        if alpha in sweep_scores:
            right.plot([alpha], [sweep_scores[alpha]], marker="*", markersize=14, color="tab:red", label=f"chosen α={alpha:g}")
            right.legend(fontsize=8)
        right.set_xlabel("α")
        right.set_ylabel(score_name)
        right.set_title("α sweep", fontsize=10)
    figure.tight_layout()
    return figure


class LiNeS(ContinualCallback):
    """LiNeS: after fine-tuning, scale each layer's update linearly with depth.

    From "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging"
    (Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret, Frossard; ICLR 2025).

    Mechanism: fine-tuning moves the weights from θ_0 to θ_ft; the residual τ = θ_ft − θ_0 of
    block ℓ (of L) is scaled by λ(ℓ) = α + β·(ℓ−1)/(L−1) and the model becomes θ_0 + λ⊙τ.
    Shallow layers return toward the pre-trained weights (restoring general ability and
    reducing forgetting of what the model knew), deep layers keep the task-specific update.
    Parameters outside the blocks (embeddings, final norms) get α; the output head follows
    ``head_policy``. Blocks are found from parameter names (see
    :func:`lightning_forget.merging.block_depths`). The edit is training-free and happens once,
    under ``torch.no_grad()``, right after the fit's last training batch (by ``max_epochs`` or
    ``max_steps``), before its last validation and checkpoint, so that both, and the reports
    recorded at them (:class:`~lightning_forget.callbacks.ContinualMetrics`), see the scaled
    model. A fit stopped early (e.g. by early stopping) is scaled at ``on_train_end`` and its
    last checkpoint rewritten.

    θ_0 is a CPU snapshot of the floating-point parameters taken at ``on_fit_start`` (or loaded
    from ``pretrained_ckpt``). Under DDP every rank holds identical weights, so each snapshots
    itself and applies the same deterministic edit; the swept α is broadcast from rank 0.
    Under ``ModelParallelStrategy`` (FSDP2) θ_0 and the unscaled weights are kept as each rank's
    local shards (in the parameters' layout, never a full copy per rank; a θ_0 loaded from
    ``pretrained_ckpt`` or a checkpoint is cut to the rank's slice), the scaling is applied to
    each shard, and the files and the checkpointed ``theta0`` are full tensors gathered for
    export only. A sweep's scoring forwards are collective there: ``monitor`` scores on the fit's
    validation loaders (Lightning's sampler gives every rank as many batches), and a ``score_fn``
    must run as many forwards on every rank. FSDP1 and DeepSpeed are refused:
    scale a consolidated checkpoint with :func:`lightning_forget.merging.lines_scale` instead.

    **Choosing α.** Either a fixed ``alpha`` or a sweep over ``alpha_grid``: for each α the
    scaled weights are written into the model and scored, then the best is kept. The score is
    ``score_fn(module)`` (called on every rank, rank 0's value decides), or else
    :func:`validation_score` of ``monitor``: the mean of what the module's own validation hooks
    log over ``trainer.val_dataloaders``. The sweep deliberately does not go through
    ``trainer.validate`` (it would fire every callback's validation hooks again, log the sweep
    to the loggers and change the Trainer's state; :func:`validation_score` says why), so the
    sweep works under every strategy LiNeS supports, ``ddp_spawn`` included. A sweep scored by
    ``monitor`` runs after the last batch like a fixed α (the fit's validation loaders are built
    then if the loop has not built them yet); with ``limit_val_batches=0`` it waits for train end.

    **apply_at="task_end" (experimental, not in the paper).** In a continual run the residual
    of each task, relative to the weights at that task's start, is scaled when the task ends
    (after the task's last training batch, before its last validation and checkpoint, which
    see the scaled weights). Optimizer state is left as is.

    **Weights are never lost.** After the edit the scaled model's state dict is written to
    ``<results dir>/lines_scaled_weights.pt`` (the folder of
    :func:`lightning_forget.reporting.results_dir`: the logger's directory, else
    ``default_root_dir``), next to ``unscaled_weights.pt``; the end of the run prints where. When
    a ``ModelCheckpoint`` keeps a last checkpoint (``save_last``), that checkpoint is rewritten at
    the end of ``fit`` and holds the scaled weights (a ``save_last="link"`` link is replaced by a
    file, so the checkpoint it pointed to keeps the unscaled weights). The other checkpoints
    written during ``fit`` (top-k, every-n) hold the unscaled weights: the edit happens after
    them. Resuming the finished run from that last checkpoint trains nothing and leaves the
    weights as they are; training on from it (more epochs) starts from the scaled weights, and
    the new end of ``fit`` scales again relative to the same θ_0.

    Args:
        alpha: scale of the first block and of the non-block parameters (paper default in its
            demo: 0.1; 0 resets them to θ_0, 1 keeps the fine-tuned model).
        beta: increase of the scale to the last block; ``None`` → ``1 − alpha`` (the last block
            keeps its full update).
        layer_pattern: regex whose capture group is the block index, for models the built-in
            patterns do not know.
        depth_map: explicit ``parameter name -> block index`` map.
        head_policy: scale of the output head: ``"exclude"`` keeps the fine-tuned head (default),
            ``"alpha"``, ``"alpha_plus_beta"``, ``"one"``.
        head_pattern: regex of head parameter names (default
            :data:`lightning_forget.merging.DEFAULT_HEAD_PATTERN`).
        pretrained_ckpt: path of θ_0 (a Lightning checkpoint or a state dict) instead of the
            snapshot at fit start.
        apply_at: ``"fit_end"`` (the paper) or ``"task_end"`` (experimental).
        alpha_grid: values of α to sweep (β follows ``beta``, or ``1 − α`` when ``None``).
        monitor: metric logged in ``validation_step`` that scores a sweep.
        mode: ``"max"`` or ``"min"``: which score is best.
        score_fn: callable ``module -> float`` that scores a sweep instead of ``monitor``.
        save_unscaled: keep the unscaled fine-tuned weights in :attr:`unscaled_state_dict`
            and write them to ``<results dir>/unscaled_weights.pt`` (rank 0).
        save_plot: write ``lines_scales.png``, the scale of each block (and the α sweep's
            scores), built by :func:`scales_figure` (rank 0).

    Raises:
        ValueError: an argument is out of range or inconsistent (each message names it).
        TypeError: ``score_fn`` is not callable.

    Note:
        Logged keys (through ``trainer.loggers`` on rank 0): ``lines/alpha``, ``lines/beta``,
        ``lines/scale/block_{i}`` for each block, and in a sweep ``lines/sweep/score_alpha_{a}``.
        Saved state: ``theta0`` (CPU tensors; ``None`` when ``pretrained_ckpt`` is used),
        ``applied_alpha``, the task counters of :class:`ContinualCallback`, ``version``. Files
        in the results dir: ``lines_scaled_weights.pt`` (the scaled module's ``state_dict()``, loadable with
        ``torch.load(path, weights_only=True)``), ``unscaled_weights.pt``, ``lines_scales.png``
        (each with a ``_task_{t}`` suffix under ``apply_at="task_end"``).
        With ``strategy="ddp_spawn"`` the attributes set at the end of fit live in the worker
        processes; use the files.
    """

    #: Tested single-process, under DDP and under ModelParallelStrategy (FSDP2: a fixed α, an α sweep scored
    #: by ``monitor``, ``task_end``).
    supported_strategies: tuple[str, ...] = DDP_STRATEGIES + SHARDED_STRATEGIES
    #: Constructor arguments whose change a resume refuses (see ContinualCallback.state_arguments).
    state_arguments: tuple[str, ...] = ('apply_at', 'pretrained_ckpt', 'layer_pattern', 'depth_map')
    #: Whether the task end edits weights (then it runs inside tasks.atomic_edit).
    task_end_edits_weights = True

    def __init__(
        self,
        alpha: float = 0.1,
        beta: Optional[float] = None,
        layer_pattern: Optional[str] = None,
        depth_map: Optional[dict[str, int]] = None,
        head_policy: merging.HeadPolicy = "exclude",
        head_pattern: Optional[str] = None,
        pretrained_ckpt: Optional[str] = None,
        apply_at: Literal["fit_end", "task_end"] = "fit_end",
        alpha_grid: Optional[list[float]] = None,
        monitor: Optional[str] = None,
        mode: Literal["max", "min"] = "max",
        score_fn: Optional[ScoreFn] = None,
        save_unscaled: bool = True,
        save_plot: bool = True,
    ) -> None:
        super().__init__()
        self.alpha = merging.check_alpha(alpha)
        self.beta = None if beta is None else merging.check_beta(beta)
        if layer_pattern is not None:
            merging.check_layer_pattern(layer_pattern)
        if depth_map is not None and not isinstance(depth_map, Mapping):
            raise ValueError(f"`depth_map` must be a dict parameter name -> block index, got {type(depth_map).__name__}.")
        merging.check_head_policy(head_policy)
        merging.check_head_pattern(head_pattern)
        if pretrained_ckpt is not None and not isinstance(pretrained_ckpt, (str, os.PathLike)):
            raise TypeError(f"`pretrained_ckpt` must be a file path, got {pretrained_ckpt!r}.")
        if pretrained_ckpt is not None and apply_at != "task_end" and not os.path.isfile(pretrained_ckpt):
            # Checked now, not when the fit ends and the reference is needed.
            raise FileNotFoundError(
                f"`pretrained_ckpt`={os.fspath(pretrained_ckpt)!r} is not a file. Fix: pass the path of the "
                "pre-trained checkpoint or state dict, or omit it to use the weights at the start of the fit."
            )
        if apply_at not in ("fit_end", "task_end"):
            raise ValueError(f"`apply_at` must be 'fit_end' or 'task_end', got {apply_at!r}.")
        if apply_at == "task_end" and pretrained_ckpt is not None:
            raise ValueError(
                f"`pretrained_ckpt`={pretrained_ckpt!r} sets the reference of apply_at='fit_end'; with "
                "'task_end' each task is scaled relative to the weights at its start. Drop one of them."
            )
        if mode not in ("max", "min"):
            raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}.")
        if score_fn is not None and not callable(score_fn):
            raise TypeError(f"`score_fn` must be a callable module -> float, got {type(score_fn).__name__}.")
        if alpha_grid is not None:
            if isinstance(alpha_grid, (str, bytes)) or not hasattr(alpha_grid, "__iter__") or len(list(alpha_grid)) == 0:
                raise ValueError(f"`alpha_grid` must be a non-empty list of numbers, got {alpha_grid!r}.")
            alpha_grid = [merging.check_alpha(a, f"alpha_grid[{i}]") for i, a in enumerate(alpha_grid)]
            if score_fn is None and monitor is None:
                raise ValueError(
                    f"`alpha_grid`={alpha_grid} needs a score: pass `monitor` (a metric your "
                    "validation_step logs) or `score_fn` (a callable module -> float)."
                )
            if apply_at == "task_end":
                raise ValueError("`alpha_grid` sweeps are supported with apply_at='fit_end' only; fix `alpha` for 'task_end'.")
        elif monitor is not None or score_fn is not None:
            raise ValueError("`monitor`/`score_fn` score an α sweep; pass `alpha_grid` too (or drop them).")
        self.layer_pattern = layer_pattern
        self.depth_map = dict(depth_map) if depth_map is not None else None
        self.head_policy = head_policy
        self.head_pattern = head_pattern
        self.pretrained_ckpt = None if pretrained_ckpt is None else os.fspath(pretrained_ckpt)
        self.apply_at = apply_at
        self.alpha_grid = alpha_grid
        self.monitor = monitor
        self.mode = mode
        self.score_fn = score_fn
        self.save_unscaled = check_bool("save_unscaled", save_unscaled)
        self.save_plot = check_bool("save_plot", save_plot)

        self.theta0: Optional[dict[str, Tensor]] = None
        self.unscaled_state_dict: Optional[dict[str, Tensor]] = None
        self.applied_alpha: Optional[float] = None
        self.sweep_scores: dict[float, float] = {}
        self.block_scales: list[float] = []
        #: Files written by the last edit: {"scaled": path, "unscaled": path, "plot": path}.
        self.output_paths: dict[str, str] = {}
        self._restored = False  # θ_0 came from a checkpoint
        self._theta0_full = False  # θ_0 holds full tensors (loaded), not yet cut to this rank's shards
        self._layout: dict[str, Tensor] = {}  # name -> parameter: the layout θ_0's local shards have
        self._edited = False  # the weights were scaled during this fit

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, beta=self.beta, apply_at=self.apply_at)

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__.lower()
        if "fsdp" in strategy or "deepspeed" in strategy:
            raise NotImplementedError(
                f"LiNeS edits full parameters and cannot run under the sharded {type(trainer.strategy).__name__}. "
                "Fix: train without the callback, then scale the consolidated checkpoint with "
                "`lightning_forget.merging.lines_scale(pretrained, finetuned, alpha)`."
            )

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._edited = False
        names = self._param_names(pl_module)
        # Fail before training when the depth cannot be inferred.
        merging.block_depths(names, self.layer_pattern, self.depth_map)
        self._layout = {n: p for n, p in pl_module.named_parameters() if p.is_floating_point()}
        if self.apply_at == "fit_end" and not self._restored:
            if self.pretrained_ckpt is not None:
                loaded, _ = load_weights(self.pretrained_ckpt)
                full = {n: t.detach().float().cpu() for n, t in _align_names(names, loaded, self.pretrained_ckpt).items()}
                self.theta0 = {n: shard_like(t, self._layout[n]).clone() for n, t in full.items()}
            else:
                self.theta0 = self._snapshot(pl_module)
            self._theta0_full = False

    @override
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if self.apply_at == "task_end":
            self.theta0 = self._snapshot(pl_module)
            self._theta0_full = False

    @override
    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if self.apply_at == "task_end":
            self._apply(trainer, pl_module, suffix=f"_task_{task}")

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Scale after the fit's last batch, before its last validation and checkpoint: both then
        # see the scaled model, and so do the reports recorded at them. An α sweep scores here too
        # when it can (a `score_fn`, or the fit's validation loaders); otherwise at train end.
        if (self.apply_at == "fit_end" and not self._edited and fit_ends_after_batch(trainer, batch_idx)
                and self._can_score_now(trainer)):
            with atomic_edit(pl_module):
                self._apply(trainer, pl_module, suffix="")

    def _can_score_now(self, trainer: "pl.Trainer") -> bool:
        """Whether the α sweep (if any) can score after the last batch: with ``score_fn`` always;
        with ``monitor`` when the fit's validation loaders exist (built now if the fit's loop has
        not built them yet, e.g. without a sanity check)."""
        if self.alpha_grid is None or self.score_fn is not None:
            return True
        if trainer.val_dataloaders is None and trainer.limit_val_batches != 0:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        return trainer.val_dataloaders is not None

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_end(trainer, pl_module)
        if self.apply_at == "fit_end" and not self._edited:  # a sweep, or a fit stopped early
            with atomic_edit(pl_module):
                self._apply(trainer, pl_module, suffix="")
        if self._edited:
            self._rewrite_last_checkpoints(trainer)
        self._restored = self._edited = False

    # ------------------------------------------------------------------ the edit
    @staticmethod
    def _param_names(pl_module: "pl.LightningModule") -> list[str]:
        return [n for n, p in pl_module.named_parameters() if p.is_floating_point()]

    @staticmethod
    def _snapshot(pl_module: "pl.LightningModule") -> dict[str, Tensor]:
        # This rank's shards under FSDP2 (the whole tensors otherwise); after an evaluation forward
        # (a sanity check, a sweep's scoring) FSDP2's root unit holds gathered copies until resharded.
        reshard(pl_module)
        return {n: local_clone(p, device="cpu") for n, p in pl_module.named_parameters() if p.is_floating_point()}

    def _gathered(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Full CPU tensors of local shards in ``_layout``'s layout (collective when sharded)."""
        return {n: full_tensor(t, like=self._layout.get(n)).detach().cpu() for n, t in state.items()}

    def _beta_for(self, alpha: float) -> float:
        return 1.0 - alpha if self.beta is None else self.beta

    def scaled_state(self, alpha: float) -> tuple[dict[str, Tensor], list[float]]:
        """θ_0 + λ⊙τ for ``alpha`` from the kept unscaled weights, and the per-block scales."""
        if self.theta0 is None or self.unscaled_state_dict is None:
            raise RuntimeError("LiNeS has no θ_0 / fine-tuned weights yet; they exist after `fit` starts and ends.")
        beta = self._beta_for(alpha)
        names = list(self.unscaled_state_dict)
        scales, per_block = merging.lines_scale_map(
            names, alpha, beta, self.layer_pattern, self.depth_map, self.head_policy, self.head_pattern
        )
        out = {}
        for name, ft in self.unscaled_state_dict.items():
            scale = scales[name]
            if scale is None:
                out[name] = ft
            else:
                base = self.theta0[name].float()
                out[name] = (base + scale * (ft.float() - base)).to(ft.dtype)
        return out, per_block

    @staticmethod
    @torch.no_grad()
    def _write(pl_module: "pl.LightningModule", state: Mapping[str, Tensor]) -> None:
        reshard(pl_module)  # the sharded parameters, not the copies an evaluation forward left gathered
        params = dict(pl_module.named_parameters())
        for name, value in state.items():  # shard-wise: each value is the rank's local part
            edit_local(params[name], lambda local, v: v.to(device=local.device, dtype=local.dtype), value)

    def _apply(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", suffix: str) -> None:
        if self.theta0 is None:
            raise RuntimeError("LiNeS has no θ_0 snapshot; it is taken at fit start (was `on_fit_start` skipped?).")
        missing = [n for n in self._param_names(pl_module) if n not in self.theta0]
        if missing:
            raise RuntimeError(f"The model gained parameters after θ_0 was taken, e.g. {missing[:5]}; LiNeS cannot scale them.")
        if self._theta0_full:  # restored whole from a checkpoint: keep this rank's slice only
            params = dict(pl_module.named_parameters())
            self.theta0 = {n: shard_like(t, params[n]).clone() if is_sharded(params[n]) else t for n, t in self.theta0.items()}
            self._theta0_full = False
        self.unscaled_state_dict = self._snapshot(pl_module)
        self.output_paths = {}
        if self.save_unscaled:
            self._save_unscaled(trainer, pl_module, suffix)
        alpha = self.alpha if self.alpha_grid is None else self._sweep(trainer, pl_module)
        state, per_block = self.scaled_state(alpha)
        self._write(pl_module, state)
        self.applied_alpha, self.block_scales = alpha, per_block
        self._edited = True
        if not self.save_unscaled:
            self.unscaled_state_dict = None
        metrics = {"lines/alpha": alpha, "lines/beta": self._beta_for(alpha)}
        metrics.update({f"lines/scale/block_{i}": s for i, s in enumerate(per_block)})
        metrics.update({f"lines/sweep/score_alpha_{a:g}": s for a, s in self.sweep_scores.items()})
        self._log(trainer, metrics)
        rank_zero_info(
            f"LiNeS: scaled the fine-tuning residual over {len(per_block)} blocks with α={alpha:g}, "
            f"β={self._beta_for(alpha):g} (scales {per_block[0]:.3g} → {per_block[-1]:.3g})."
        )
        self._save_scaled(trainer, pl_module, suffix)

    def _save_unscaled(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", suffix: str) -> None:
        # Written before the sweep, so the fine-tuned weights are on disk whatever happens next.
        directory = reporting.results_dir(trainer)  # broadcasts rank 0's folder: call it on every rank
        sharded = is_sharded(pl_module)
        state = self._gathered(self.unscaled_state_dict) if sharded else self.unscaled_state_dict  # every rank
        if trainer.is_global_zero:
            os.makedirs(directory, exist_ok=True)
            path = reporting.output_paths(self, directory, {"unscaled": f"unscaled_weights{suffix}.pt"})["unscaled"]
            torch.save(state, path)
            self.output_paths["unscaled"] = str(path)

    def _save_scaled(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", suffix: str) -> None:
        directory = reporting.results_dir(trainer)  # broadcasts rank 0's folder: call it on every rank
        # FSDP2 state dicts hold DTensors: every rank joins the gathers, rank 0 writes.
        state = {n: full_tensor(v).detach().cpu() for n, v in pl_module.state_dict().items()} if (
            trainer.is_global_zero or is_sharded(pl_module)) else {}
        if not trainer.is_global_zero:
            return
        os.makedirs(directory, exist_ok=True)
        files = reporting.output_paths(
            self, directory, {"scaled": f"lines_scaled_weights{suffix}.pt", "plot": f"lines_scales{suffix}.png"}
        )
        path = str(files["scaled"])
        torch.save(state, path)
        self.output_paths["scaled"] = path
        if self.save_plot:
            figure = scales_figure(
                self.block_scales, self.applied_alpha, self._beta_for(self.applied_alpha), self.head_policy,  # type: ignore[arg-type]
                self.sweep_scores, self.monitor or "score_fn",
            )
            # The same figure reaches the loggers that take images (TensorBoard, MLflow, W&B).
            reporting.log_figure(trainer, figure, f"lines/scales{suffix}", step=trainer.global_step)
            plot = str(files["plot"])
            figure.savefig(plot)
            self.output_paths["plot"] = plot
        reporting.announce_results(trainer, "LiNeS", [self.output_paths[k] for k in ("scaled", "unscaled", "plot") if k in self.output_paths])

    def _rewrite_last_checkpoints(self, trainer: "pl.Trainer") -> None:
        """Make every ``save_last`` checkpoint hold the scaled weights (collective: all ranks)."""
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.save_last or not callback.last_model_path:
                # No last checkpoint yet: ModelCheckpoint writes it in its own on_train_end, which
                # Lightning runs after this callback's (checkpoint callbacks go last).
                continue
            path = callback.last_model_path
            if trainer.is_global_zero and os.path.islink(path):
                # Lightning's writer replaces a link; a CheckpointIO plugin might write through it
                # into the (unscaled) checkpoint it points to.
                os.unlink(path)
            trainer.save_checkpoint(path)
            rank_zero_info(f"LiNeS: the last checkpoint {path} now holds the scaled weights.")

    @staticmethod
    def _log(trainer: "pl.Trainer", metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()

    # ------------------------------------------------------------------ the sweep
    def _sweep(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> float:
        from tqdm.auto import tqdm

        scores = []
        for alpha in tqdm(self.alpha_grid, desc="LiNeS α sweep", disable=not trainer.is_global_zero):
            state, _ = self.scaled_state(alpha)
            self._write(pl_module, state)
            if self.score_fn is not None:
                with forward_context(trainer):
                    score = float(self.score_fn(pl_module))
            else:
                with forward_context(trainer):
                    score = validation_score(pl_module, self.monitor)  # type: ignore[arg-type]
            scores.append(score)
        scores = trainer.strategy.broadcast(scores, src=0)
        self.sweep_scores = dict(zip(self.alpha_grid, scores))
        best: Optional[int] = None
        for i, score in enumerate(scores):  # the first of equal scores wins
            if math.isnan(score):
                continue
            if best is None or (score > scores[best] if self.mode == "max" else score < scores[best]):
                best = i
        if best is None:
            raise RuntimeError(f"Every LiNeS sweep score was NaN for α in {self.alpha_grid}.")
        return self.alpha_grid[best]

    # ------------------------------------------------------------------ state
    @override
    def method_state(self) -> dict[str, Any]:
        keep_theta0 = not (self.pretrained_ckpt is not None and self.apply_at == "fit_end") and self.theta0 is not None
        # Full tensors (gathered from the shards under FSDP2: a collective, as checkpoints are).
        theta0 = None
        if keep_theta0:
            theta0 = {n: t.detach().cpu() for n, t in self.theta0.items()} if self._theta0_full else self._gathered(self.theta0)
        return {
            "theta0": theta0,
            "applied_alpha": self.applied_alpha,
        }

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        theta0 = state["theta0"]
        if theta0 is not None:
            self.theta0 = {n: t.detach().cpu() for n, t in theta0.items()}
            self._theta0_full = True  # cut to this rank's shards when the edit needs it
            self._restored = True
        self.applied_alpha = state["applied_alpha"]
