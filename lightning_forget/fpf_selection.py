"""Which modules FPF and k-FPF fine-tune: by module type and name, or by measured sensitivity.

Zhao et al., "Does Continual Learning Equally Forget All Parameters?" (ICML 2023) observe that
during a continual run a few modules change far more than the rest between tasks (for CNNs the
BatchNorm layers and the final classifier, sometimes the first convolution) and attribute most
forgetting to them. Their change measure for a module ``m`` between consecutive training steps
is the L1 distance of its parameters normalised by their number,

    s_m(n) = ‖θ_m(n) − θ_m(n−1)‖₁ / |θ_m|,

so that a large module is not ranked first for being large. This module holds the two ways of
choosing the fine-tuned set, both Lightning-free:

- :func:`select_modules`: module types (``"batchnorm"``, ``"last_linear"``, ``"first_conv"``,
  ``"linear"``, ``"conv"``, ``"norm"``) and regular expressions on module names (``"batchnorm"``
  and ``"norm"`` include AdaB²N layers, which are not ``_BatchNorm`` subclasses);
- :class:`ModuleSensitivity`: accumulates ``s_m(n)`` over the steps it is shown and ranks the
  modules by their mean change (:meth:`ModuleSensitivity.top`).

Modules are named as in ``model.named_modules()``; only modules that own parameters directly
(``recurse=False``) are candidates, so a container is never selected as a whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_forget.nn.adab2n import AdaB2NBatchNorm2d
from lightning_forget.sharding import global_sums, local_view, reshard

__all__ = ["MODULE_TYPES", "ModuleSensitivity", "leaf_modules", "parameters_of", "select_modules"]

#: Type keywords :func:`select_modules` understands.
MODULE_TYPES: tuple[str, ...] = ("batchnorm", "norm", "last_linear", "linear", "first_conv", "conv")

#: BatchNorm layers: PyTorch's, and AdaB²N's (deliberately not a ``_BatchNorm`` subclass).
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm, AdaB2NBatchNorm2d)
_NORMS = (*_BATCHNORMS, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_CONVS = (nn.modules.conv._ConvNd,)


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` that own parameters directly, by name, in registration order."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    }


def _of_type(candidates: Mapping[str, nn.Module], kind: str) -> list[str]:
    if kind == "batchnorm":
        return [n for n, m in candidates.items() if isinstance(m, _BATCHNORMS)]
    if kind == "norm":
        return [n for n, m in candidates.items() if isinstance(m, _NORMS)]
    if kind == "linear":
        return [n for n, m in candidates.items() if isinstance(m, nn.Linear)]
    if kind == "conv":
        return [n for n, m in candidates.items() if isinstance(m, _CONVS)]
    if kind == "last_linear":
        linears = _of_type(candidates, "linear")
        return linears[-1:]
    if kind == "first_conv":
        return _of_type(candidates, "conv")[:1]
    raise ValueError(
        f"`module_types` entries must be one of {list(MODULE_TYPES)}, got {kind!r}. "
        "Fix: use those keywords, or name modules with `module_patterns` (regular expressions)."
    )


def select_modules(
    model: nn.Module, module_types: Sequence[str] = ("batchnorm", "last_linear"), module_patterns: Sequence[str] = ()
) -> list[str]:
    """Names of the modules to fine-tune: the union of type matches and name-pattern matches.

    ``"last_linear"`` and ``"first_conv"`` follow registration order (``model.named_modules()``),
    which for the usual ``backbone`` → ``head`` layout is the classifier and the stem.

    Args:
        model: the network.
        module_types: type keywords (:data:`MODULE_TYPES`).
        module_patterns: regular expressions searched (``re.search``) in module names.

    Returns:
        Module names in registration order, without duplicates.

    Raises:
        ValueError: an unknown type keyword, an invalid pattern, or nothing selected (the message
            lists the candidate modules).
    """
    candidates = leaf_modules(model)
    chosen: set[str] = set()
    for kind in module_types:
        chosen.update(_of_type(candidates, kind))
    for pattern in module_patterns:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"`module_patterns` entry {pattern!r} is not a regular expression ({error}).") from error
        chosen.update(name for name in candidates if regex.search(name))
    if not chosen:
        shown = [f"{name} ({type(module).__name__})" for name, module in list(candidates.items())[:20]]
        raise ValueError(
            f"No module matched module_types={list(module_types)!r} and module_patterns={list(module_patterns)!r}; "
            f"the model's modules with parameters are {shown}. Fix: pass types or name patterns that match some of them."
        )
    return [name for name in candidates if name in chosen]


def parameters_of(model: nn.Module, module_names: Sequence[str]) -> dict[str, nn.Parameter]:
    """The parameters owned directly by the named modules, by full parameter name.

    Raises:
        ValueError: a name is not a module of ``model`` that owns parameters.
    """
    candidates = leaf_modules(model)
    missing = [name for name in module_names if name not in candidates]
    if missing:
        raise ValueError(
            f"The selected modules {missing} are not modules of {type(model).__name__} that own parameters "
            f"(it has {list(candidates)[:20]}). Fix: select modules of this model."
        )
    out: dict[str, nn.Parameter] = {}
    for name in module_names:
        for pname, param in candidates[name].named_parameters(recurse=False):
            out[f"{name}.{pname}" if name else pname] = param
    return out


class ModuleSensitivity:
    """Mean size-normalised L1 change per step of each module's parameters (see the module docstring).

    Call :meth:`observe` after every optimizer step; the first call only takes a snapshot. The
    snapshot is a copy of the tracked parameters (memory: one extra copy of the model).

    Args:
        model: the network whose leaf modules are tracked (all modules owning parameters).
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = list(leaf_modules(model))
        self.totals = torch.zeros(len(self.names), dtype=torch.float64)
        self.steps = 0
        self._previous: dict[str, Tensor] | None = None

    def _current(self, model: nn.Module) -> dict[str, Tensor]:
        """``module.param`` → the parameter (a DTensor when sharded)."""
        modules = leaf_modules(model)
        return {f"{name}.{pname}": p for name in self.names for pname, p in modules[name].named_parameters(recurse=False)}

    def observe(self, model: nn.Module) -> None:
        """Add the change since the previous call (or take the first snapshot).

        Sharded parameters: the snapshot is this rank's local shards, and each module's L1 change
        is summed over the shards (:func:`lightning_forget.sharding.global_sums`), so every rank
        ranks the modules alike, as one process does.
        """
        reshard(model)  # FSDP2: the sharded parameters, also after an evaluation forward
        current = self._current(model)
        if self._previous is not None:
            changes = global_sums(
                {key: (local_view(p).detach().to(torch.float64) - self._previous[key]).abs() for key, p in current.items()},
                like=current,
            )
            change = []
            for name in self.names:
                keys = [key for key in current if key.rsplit(".", 1)[0] == name]
                size = sum(current[key].numel() for key in keys)
                change.append(float(sum(float(changes[key]) for key in keys) / size))
            self.totals += torch.tensor(change, dtype=torch.float64)
            self.steps += 1
        self._previous = {key: local_view(p).detach().to(torch.float64).clone() for key, p in current.items()}

    def scores(self) -> dict[str, float]:
        """Module name → mean change per observed step (zeros before two observations)."""
        mean = self.totals / max(self.steps, 1)
        return {name: float(value) for name, value in zip(self.names, mean)}

    def top(self, n: int) -> list[str]:
        """The ``n`` modules that changed most, highest first (ties: registration order)."""
        scores = self.scores()
        order = sorted(range(len(self.names)), key=lambda i: (-scores[self.names[i]], i))
        return [self.names[i] for i in order[:n]]

    def state_dict(self) -> dict[str, Any]:
        """Names, totals and step count (the snapshot is re-taken from the restored weights)."""
        return {"names": list(self.names), "totals": self.totals.clone(), "steps": int(self.steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise RuntimeError(
                f"ModuleSensitivity: the checkpoint tracked modules {list(state['names'])[:10]}..., this model has "
                f"{self.names[:10]}...; resume with the same model."
            )
        self.totals = state["totals"].clone().to(torch.float64)
        self.steps = int(state["steps"])
        self._previous = None
