"""AdaB²N: batch normalisation with task-balanced statistics for continual learning.

Lyu et al., "Overcoming Recency Bias of Normalization Statistics in Continual Learning: Balance
and Adaptation" (NeurIPS 2023). BatchNorm's batch statistics, and the running statistics used at
test time, drift toward the most recent task. :class:`AdaB2NBatchNorm2d` replaces
``nn.BatchNorm2d`` with

- **balanced batch statistics** (training): with task ids ``t_i`` of the rows, per-task counts
  ``n_k`` and learnable weights ``w`` (:attr:`~AdaB2NBatchNorm2d.task_weight`), the tasks
  ``k = 0..T`` seen so far get mass ``π_k = a_k / Σ_j a_j`` with ``a_k = exp(w_k) + n_k``; each row
  gets weight ``s_i = π_{t_i} / n_{t_i}``, and ``μ = Σ_i s_i mean_HW(x_i)``,
  ``σ² = Σ_i s_i mean_HW((x_i - μ)²)`` (a biased variance);
- **adaptive momentum** for the running statistics: ``η_1 = m^κ``,
  ``η_t = η_{t-1} / (η_{t-1} + (1 - m)^κ)``; ``κ = 1`` is BatchNorm's constant momentum ``m``,
  ``κ = 0`` the cumulative average ``1/t``;
- a **statistics loss** ``MSE(μ, running_mean) + MSE(σ², running_var)`` against the running
  statistics after this step's update (:attr:`~AdaB2NBatchNorm2d.stat_loss`).

Evaluation uses the running statistics, as BatchNorm does.

Why the layer is not a ``torch.nn.modules.batchnorm._BatchNorm``
----------------------------------------------------------------
The layer is a plain ``nn.Module`` on purpose:

- ``SyncBatchNorm.convert_sync_batchnorm`` (what ``Trainer(sync_batchnorm=True)`` runs under DDP)
  replaces every ``_BatchNorm`` by a ``SyncBatchNorm``: a subclass would be swapped silently for
  plain synchronised BatchNorm, losing the task weights and the momentum recursion. As a plain
  module it is left alone (its statistics stay per rank; the :class:`~lightning_forget.callbacks.AdaB2N`
  callback refuses ``sync_batchnorm=True`` with an error, since the balanced statistics have no
  synchronised form here).
- Lightning's ``BaseFinetuning.freeze(modules, train_bn=...)`` special-cases ``_BatchNorm``: with
  ``train_bn=True`` such layers stay trainable, with ``train_bn=False`` they are frozen and stop
  tracking running statistics. This layer is treated like any other module: ``freeze`` freezes
  its parameters (``weight``, ``bias``, ``task_weight``) whatever ``train_bn`` says, and it keeps
  updating its running statistics in training mode (set ``track_running_stats=False`` on it to
  stop that, as ``freeze`` does for BatchNorm).
- DDP's ``broadcast_buffers=True`` (the default) copies rank 0's buffers (running statistics,
  step counter, the recursion's ``eta``, the task index) to every rank before each training
  forward, exactly as for BatchNorm: rank 0's statistics are the model's.

Checkpoints: the task index (``cur_task``), the step counter and the recursion's last momentum
(``eta``) are registered buffers, so a resumed run continues the recursion where it stopped.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_forget.validation import check_bool, check_float, check_int

__all__ = ["AdaB2NBatchNorm2d", "adab2n_conflicts", "adab2n_layers", "convert_adab2n", "revert_adab2n"]


class AdaB2NBatchNorm2d(nn.Module):
    """A drop-in ``BatchNorm2d`` with AdaB²N's balanced statistics and adaptive momentum.

    Args:
        num_features: channels ``C`` of the ``(N, C, H, W)`` input.
        num_tasks: tasks of the stream (the length of :attr:`task_weight`).
        kappa: ``κ ∈ [0, 1]`` of the running-statistics momentum (1: BatchNorm's EMA, 0: the
            cumulative average). The official code sweeps {0.1, 0.4, 0.7, 1.0}; it has no default.
        eps: added to the variance (BatchNorm's default 1e-5).
        momentum: ``m`` of the recursion (BatchNorm's default 0.1; ``None`` is refused).
        affine: learnable per-channel ``weight``/``bias`` (BatchNorm's default ``True``).
        init_weight: initial value of every task weight ``w_k`` (official default 0.0, i.e. one
            pseudo-count per task).
        renormalize: spread the mass of tasks absent from the batch over the present ones (the
            row weights then sum to 1). Off by default, as in the official code, where an absent
            task's mass is dropped and the statistics shrink toward 0.

    Raises:
        TypeError / ValueError: an argument of the wrong type or outside its range.

    The training forward is a single autograd node with a hand-written backward (the gradients
    autograd would give through the formulas above; a few passes over the input instead of many
    small autograd nodes), so second-order gradients through the layer in training mode raise.
    Statistics are computed in float32 at least (in float64 for float64 inputs), also under
    autocast.

    Attributes:
        task_weight: the learnable ``w`` (a ``Parameter`` of shape ``(num_tasks,)``).
        track_running_stats: ``False`` stops the running-statistics update (and the recursion)
            in training mode; evaluation still uses the stored statistics.
    """

    def __init__(
        self,
        num_features: int,
        num_tasks: int,
        kappa: float,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        init_weight: float = 0.0,
        renormalize: bool = False,
    ) -> None:
        super().__init__()
        self.num_features = check_int("num_features", num_features, min=1)
        self.num_tasks = check_int("num_tasks", num_tasks, min=1, fix="pass the number of tasks of the stream")
        self.kappa = check_float("kappa", kappa, min=0.0, max=1.0, fix="pass a kappa in [0, 1], e.g. 0.7")
        self.eps = check_float("eps", eps, min=0.0, min_inclusive=False)
        if momentum is None:
            raise ValueError(
                "`momentum` is None (BatchNorm's cumulative average), but AdaB2N needs a momentum m for its "
                "recursion. Fix: pass momentum=0.1 and kappa=0.0 for the cumulative average."
            )
        self.momentum = check_float("momentum", momentum, min=0.0, max=1.0, min_inclusive=False)
        self.affine = check_bool("affine", affine)
        self.init_weight = check_float("init_weight", init_weight)
        self.renormalize = check_bool("renormalize", renormalize)
        self.track_running_stats = True
        if self.affine:
            self.weight = nn.Parameter(torch.ones(self.num_features))
            self.bias = nn.Parameter(torch.zeros(self.num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.task_weight = nn.Parameter(torch.full((self.num_tasks,), self.init_weight))
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_var", torch.ones(self.num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        #: The last momentum of the recursion (0: no step yet); float64 like the official float.
        self.register_buffer("eta", torch.tensor(0.0, dtype=torch.float64))
        #: The current task index ``T`` (advanced by :meth:`next_task`).
        self.register_buffer("cur_task", torch.tensor(0, dtype=torch.long))
        self._task_ids: Optional[Tensor] = None
        self._stat_loss: Optional[Tensor] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, num_tasks: int, kappa: float, init_weight: float = 0.0, renormalize: bool = False
    ) -> "AdaB2NBatchNorm2d":
        """An AdaB²N layer with ``bn``'s settings, affine parameters and running statistics.

        Raises:
            ValueError: ``bn`` does not track running statistics or has ``momentum=None``.
        """
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError(
                f"`bn` ({bn!r}) has track_running_stats=False; AdaB2N keeps running statistics. "
                "Fix: build the BatchNorm2d with track_running_stats=True."
            )
        layer = cls(bn.num_features, num_tasks, kappa, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    init_weight=init_weight, renormalize=renormalize)
        ref = bn.running_mean
        layer.to(device=ref.device)
        with torch.no_grad():
            if bn.affine:
                layer.weight.data = bn.weight.detach().clone()
                layer.bias.data = bn.bias.detach().clone()
            layer.task_weight.data = layer.task_weight.data.to(ref.dtype)
            layer.running_mean = bn.running_mean.detach().clone()
            layer.running_var = bn.running_var.detach().clone()
            layer.num_batches_tracked.copy_(bn.num_batches_tracked)
        layer.train(bn.training)
        return layer

    def to_batchnorm(self) -> nn.BatchNorm2d:
        """A ``BatchNorm2d`` with this layer's affine parameters and running statistics."""
        bn = nn.BatchNorm2d(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine)
        bn.to(device=self.running_mean.device, dtype=self.running_mean.dtype)
        with torch.no_grad():
            if self.affine:
                bn.weight.copy_(self.weight)
                bn.bias.copy_(self.bias)
            bn.running_mean.copy_(self.running_mean)
            bn.running_var.copy_(self.running_var)
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        bn.train(self.training)
        return bn

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_tasks={self.num_tasks}, kappa={self.kappa}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, renormalize={self.renormalize}")

    # ------------------------------------------------------------------ task protocol
    def set_task_ids(self, task_ids: Optional[Tensor]) -> None:
        """The per-row task index of the next training forward (``None``: plain batch statistics).

        The ids stay set until replaced; a training forward whose batch size differs raises.
        """
        if task_ids is not None:
            task_ids = torch.as_tensor(task_ids)
            if task_ids.dim() != 1 or task_ids.dtype.is_floating_point:
                raise ValueError(
                    f"`task_ids` must be a 1-D integer tensor (one task index per row), got shape "
                    f"{tuple(task_ids.shape)} and dtype {task_ids.dtype}."
                )
        self._task_ids = task_ids

    def next_task(self) -> None:
        """Advance the current task index (the layer's ``end_task`` in the official code)."""
        self.cur_task.add_(1)

    @property
    def stat_loss(self) -> Optional[Tensor]:
        """The statistics loss of the last training forward (``None`` before the first one)."""
        return self._stat_loss

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_stat_loss"] = None  # a graph tensor: neither picklable nor worth copying
        return state

    # ------------------------------------------------------------------ forward
    def _next_eta(self) -> float:
        """Advance the momentum recursion by one step and return ``η_t``."""
        m, kappa = self.momentum, self.kappa
        t = int(self.num_batches_tracked)
        if kappa == 1.0:
            eta = m
        elif kappa == 0.0:
            eta = 1.0 / t
        else:
            last = float(self.eta)
            eta = m**kappa if last <= 0.0 else last / (last + (1.0 - m) ** kappa)
        self.eta.fill_(eta)
        return eta

    def _task_counts(self, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(ids, counts)``: the ids as a long tensor on the layer's device and the per-task row
        counts ``n_0..n_T``, after checking the ids against the current task ``T``."""
        task = int(self.cur_task)
        if task == self.num_tasks:
            # The stream has ended (the last task end advanced the index): a training forward now
            # (FPF's or k-FPF's fine-tuning at the stream's end) balances over every task seen.
            task = self.num_tasks - 1
        elif task > self.num_tasks:
            raise RuntimeError(
                f"AdaB2NBatchNorm2d is at task {task} but was built for num_tasks={self.num_tasks}. "
                f"Fix: build it (or the AdaB2N callback) with num_tasks >= {task + 1}."
            )
        ids = task_ids.to(self.task_weight.device, torch.long)
        # bincount's length shows an id above the current task without reading the ids back
        try:
            counts = torch.bincount(ids, minlength=task + 1) if ids.numel() else None
        except RuntimeError:  # a negative id
            counts = None
        if counts is None or counts.numel() != task + 1:
            if not ids.numel():
                raise ValueError("`task_ids` is empty; pass one task index per row of the batch.")
            if int(self.cur_task) == self.num_tasks and int(ids.max()) >= self.num_tasks:
                raise RuntimeError(
                    f"AdaB2NBatchNorm2d has seen all its num_tasks={self.num_tasks} tasks, but got rows of task "
                    f"{int(ids.max())}. Fix: build it (or the AdaB2N callback) with num_tasks >= {int(ids.max()) + 1}."
                )
            raise ValueError(
                f"task ids must lie in [0, {task}] (the tasks seen so far), got values in "
                f"[{int(ids.min())}, {int(ids.max())}]. Fix: pass each row's task index; rows restored from "
                "old checkpoints with task id -1 need a labels-to-task mapping."
            )
        return ids, counts

    def row_weights(self, task_ids: Tensor) -> Tensor:
        """The per-row weights ``s_i`` for ``task_ids`` under the current task weights."""
        ids, counts = self._task_counts(task_ids)
        counts = counts.to(self.task_weight.dtype)
        concentration = self.task_weight[: counts.numel()].exp() + counts
        if self.renormalize:
            concentration = concentration * (counts > 0)
        pi = concentration / concentration.sum()
        return pi[ids] / counts[ids]

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"AdaB2NBatchNorm2d expects a 4-D (N, C, H, W) input, got {input.dim()}-D.")
        if not self.training:
            self._stat_loss = None
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        ids = self._task_ids
        if ids is not None and int(ids.numel()) != int(input.shape[0]):
            raise RuntimeError(
                f"AdaB2NBatchNorm2d got {input.shape[0]} rows but task ids for {ids.numel()}; call "
                "`set_task_ids` with one id per row before each training forward."
            )
        counts: Optional[Tensor] = None
        if ids is not None and int(self.cur_task) > 0:
            ids, counts = self._task_counts(ids)
        eta: Optional[float] = None
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            eta = self._next_eta()
        # ``counts is None``: plain (biased) batch statistics, every row weighs 1/N. The task
        # weights stay in the graph either way (a zero gradient then), so that DDP without
        # `find_unused_parameters` finds every parameter used in every step.
        settings = _Settings(ids, counts, self.renormalize, self.eps, eta, self.running_mean, self.running_var)
        with torch.autocast(input.device.type, enabled=False):  # the statistics stay in float32 or wider
            output, self._stat_loss = _BalancedBatchNorm.apply(input, self.task_weight, self.weight, self.bias, settings)
        return output


class _Settings:
    """The non-tensor (or non-differentiable) arguments of :class:`_BalancedBatchNorm`."""

    __slots__ = ("ids", "counts", "renormalize", "eps", "eta", "running_mean", "running_var")

    def __init__(self, ids: Optional[Tensor], counts: Optional[Tensor], renormalize: bool, eps: float,
                 eta: Optional[float], running_mean: Tensor, running_var: Tensor) -> None:
        self.ids, self.counts, self.renormalize, self.eps = ids, counts, renormalize, eps
        self.eta, self.running_mean, self.running_var = eta, running_mean, running_var


class _BalancedBatchNorm(torch.autograd.Function):
    """The training forward of :class:`AdaB2NBatchNorm2d` as one autograd node.

    Forward, with row weights ``s_i`` (``π_{t_i} / n_{t_i}``, or ``1/N`` without task counts):
    ``m_i = mean_HW(x_i)``, ``μ = Σ_i s_i m_i``, ``q_i = mean_HW((x_i - μ)²)``, ``σ² = Σ_i s_i q_i``,
    ``out = γ (x - μ) / √(σ² + eps) + β``; the running statistics are updated with ``eta`` and the
    statistics loss ``mean_c (μ - running_mean)² + mean_c (σ² - running_var)²`` is the second
    output. The backward is written out by hand (the same gradients as autograd through these
    formulas, to rounding, for ``x``, the task weights, ``γ`` and ``β``): a few full-size passes over
    ``x`` instead of the dozens of small autograd nodes that made the layer much slower than
    BatchNorm. Gradients of order two are not supported.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, task_weight: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                settings: _Settings) -> tuple[Tensor, Tensor]:
        n, c = x.shape[0], x.shape[1]
        out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
        dtype = torch.promote_types(out_dtype, torch.float32)  # statistics in float32 at least
        xs = x.to(dtype)
        if settings.counts is None:
            s = torch.full((n,), 1.0 / n, dtype=dtype, device=x.device)
            concentration = pi = exp_w = None
        else:
            counts = settings.counts.to(dtype)
            exp_w = task_weight[: counts.numel()].detach().to(dtype).exp()
            concentration = exp_w + counts
            if settings.renormalize:
                concentration = concentration * (counts > 0)
            pi = concentration / concentration.sum()
            s = (pi / counts)[settings.ids]
        m = xs.mean(dim=(2, 3))  # (N, C)
        mean = s @ m
        d = (xs - mean.view(1, c, 1, 1)).flatten(2)
        q = torch.linalg.vecdot(d, d) / d.shape[2]  # (N, C)
        var = s @ q
        w = None if weight is None else weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        out = torch.batch_norm(xs, w, b, mean, var, False, 0.0, settings.eps, False)
        rm, rv = settings.running_mean, settings.running_var
        if settings.eta is not None:
            eta = settings.eta
            rm.mul_(1.0 - eta).add_(mean.to(rm.dtype), alpha=eta)
            rv.mul_(1.0 - eta).add_(var.to(rv.dtype), alpha=eta)
        # against the running statistics after this step's update
        d_mean = mean - rm.to(dtype)
        d_var = var - rv.to(dtype)
        loss = d_mean.square().mean() + d_var.square().mean()
        ctx.save_for_backward(xs, s, m, q, mean, var, d_mean, d_var, w, pi, concentration, exp_w)
        ctx.settings = settings
        ctx.num_tasks = task_weight.shape[0]
        ctx.dtypes = (x.dtype, task_weight.dtype, None if weight is None else weight.dtype)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.set_materialize_grads(False)  # no statistics loss in the objective: its part is skipped
        return out.to(out_dtype), loss.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_out: Optional[Tensor], g_loss: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        xs, s, m, q, mean, var, d_mean, d_var, w, pi, concentration, exp_w = ctx.saved_tensors
        settings: _Settings = ctx.settings
        x_dtype, tw_dtype, w_dtype = ctx.dtypes
        n, c = xs.shape[0], xs.shape[1]
        hw = xs.shape[2] * xs.shape[3]
        dtype = xs.dtype
        if g_loss is not None:
            scale = 2.0 * g_loss.to(dtype) / c
            g_mean, g_var = scale * d_mean, scale * d_var
        else:
            g_mean = g_var = torch.zeros_like(mean)
        g_x: Optional[Tensor] = None
        g_weight = g_bias = None
        if g_out is not None:
            gamma = w if w is not None else torch.ones_like(mean)
            g_x, g_gamma, g_beta = torch.ops.aten.native_batch_norm_backward(
                g_out.to(dtype), xs, gamma, mean, var, None, None, False, settings.eps, [True, True, True]
            )
            inv = torch.rsqrt(var + settings.eps)
            # the output's dependence on μ and σ² (native backward treats them as constants);
            # Σ g·(x - μ) per channel = g_gamma / inv
            g_var = g_var - 0.5 * gamma * inv * inv * g_gamma
            g_mean = g_mean - gamma * inv * g_beta
            g_weight = g_gamma.to(w_dtype) if ctx.has_weight else None
            g_bias = g_beta.to(w_dtype) if ctx.has_bias else None
        # σ² = Σ_i s_i mean_HW((x_i - μ)²): ∂/∂x_i = 2 s_i (x_i - μ) / HW at fixed μ, ∂/∂μ below
        g_mean = g_mean - 2.0 * g_var * (s @ (m - mean))
        coef = (2.0 / hw) * s.unsqueeze(1) * g_var.unsqueeze(0)  # (N, C)
        const = s.unsqueeze(1) * (g_mean / hw).unsqueeze(0) - coef * mean.unsqueeze(0)  # μ = Σ s_i mean_HW(x_i)
        g_stats = torch.addcmul(const.view(n, c, 1, 1), xs, coef.view(n, c, 1, 1))
        g_x = g_stats if g_x is None else g_x.add_(g_stats)
        g_task_weight = None
        if ctx.needs_input_grad[1]:
            g_task_weight = torch.zeros(ctx.num_tasks, dtype=tw_dtype, device=xs.device)
            if settings.counts is not None:
                g_s = m @ g_mean + q @ g_var  # (N,)
                counts = settings.counts.to(dtype)
                # s_i = π_{t_i} / n_{t_i}, π = a / Σ a, a_k = (exp(w_k) + n_k) [· 1(n_k > 0)]
                g_pi = torch.zeros_like(counts).index_add_(0, settings.ids, g_s / counts[settings.ids])
                g_a = (g_pi - (g_pi * pi).sum()) / concentration.sum()
                g_w = g_a * exp_w
                if settings.renormalize:
                    g_w = g_w * (counts > 0)
                g_task_weight[: counts.numel()] = g_w.to(tw_dtype)
        return g_x.to(x_dtype), g_task_weight, g_weight, g_bias, None


# ---------------------------------------------------------------------- model surgery
def adab2n_layers(model: nn.Module) -> list[AdaB2NBatchNorm2d]:
    """Every :class:`AdaB2NBatchNorm2d` inside ``model`` (in ``modules()`` order)."""
    return [m for m in model.modules() if isinstance(m, AdaB2NBatchNorm2d)]


def _swap(model: nn.Module, convert: Any) -> nn.Module:
    new = convert(model)
    if new is not None:
        return new
    for name, child in model.named_children():
        replaced = _swap(child, convert)
        if replaced is not child:
            setattr(model, name, replaced)
    return model


def convert_adab2n(model: nn.Module, num_tasks: int, kappa: float, **kwargs: Any) -> nn.Module:
    """Replace every module whose type is exactly ``nn.BatchNorm2d`` by an :class:`AdaB2NBatchNorm2d`.

    Affine parameters and running statistics are copied (:meth:`AdaB2NBatchNorm2d.from_batchnorm`;
    ``kwargs``: ``init_weight``, ``renormalize``). Subclasses of ``BatchNorm2d`` (``SyncBatchNorm``
    is not one, but e.g. frozen-BN variants are) and other norms are left untouched. Returns the
    model (a new layer if ``model`` itself is a ``BatchNorm2d``); call it before the optimizer is
    built, since the new layers have new parameters. Converting a model again with the settings
    of its AdaB²N layers converts only the BatchNorm2d layers left.

    Raises:
        ValueError: the model already has AdaB²N layers with another ``num_tasks``, ``kappa`` or
            ``renormalize`` (they would be left as they are); the message lists them.
    """
    conflicts = adab2n_conflicts(model, num_tasks, kappa, kwargs.get("renormalize"))
    if conflicts:
        raise ValueError(
            f"convert_adab2n: the model already has AdaB2N layers built with other settings ({'; '.join(conflicts)}); "
            "converting again would leave them as they are. Fix: pass the layers' settings, or build the model "
            "again from BatchNorm2d layers (revert_adab2n) before converting with new ones."
        )

    def convert(module: nn.Module) -> Optional[nn.Module]:
        if type(module) is nn.BatchNorm2d:
            return AdaB2NBatchNorm2d.from_batchnorm(module, num_tasks, kappa, **kwargs)
        return None

    return _swap(model, convert)


def adab2n_conflicts(model: nn.Module, num_tasks: int, kappa: float, renormalize: Optional[bool] = None) -> list[str]:
    """How the :class:`AdaB2NBatchNorm2d` layers already in ``model`` differ from ``num_tasks``,
    ``kappa`` (and ``renormalize`` unless ``None``): one ``"name: setting=layer's value (asked: value)"``
    line per difference, empty when they agree (or there are none)."""
    out = []
    for name, layer in model.named_modules():
        if not isinstance(layer, AdaB2NBatchNorm2d):
            continue
        asked = {"num_tasks": num_tasks, "kappa": kappa}
        if renormalize is not None:
            asked["renormalize"] = renormalize
        for setting, value in asked.items():
            have = getattr(layer, setting)
            if have != value:
                out.append(f"{name or 'model'}: {setting}={have!r} (asked: {value!r})")
    return out


def revert_adab2n(model: nn.Module) -> nn.Module:
    """Replace every :class:`AdaB2NBatchNorm2d` by a ``BatchNorm2d`` with its affine parameters and
    running statistics (the task weights are dropped)."""
    def convert(module: nn.Module) -> Optional[nn.Module]:
        return module.to_batchnorm() if isinstance(module, AdaB2NBatchNorm2d) else None

    return _swap(model, convert)

