"""A callback's constructor arguments: recorded at construction, saved with its state, compared on resume.

Every :class:`~lightning_forget.tasks.ContinualCallback` records the arguments it was built with
(:func:`record_init_arguments`, installed by the base class on every subclass ``__init__``) and
saves them, as plain values, beside its state. On resume :func:`compare_arguments` lists the
arguments whose value differs from the checkpoint's; the callback refuses those it declares in
``state_arguments`` (their change invalidates the saved state: a buffer size, a LoRA rank, the
number of tasks) and goes on with a warning for the others (a step size, a weight).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable

import torch

__all__ = ["plain_value", "record_init_arguments", "compare_arguments", "describe_change"]

#: Attribute under which an instance keeps the arguments it was built with.
ARGUMENTS_ATTR = "_init_arguments"


def plain_value(value: Any) -> Any:
    """``value`` as plain data (numbers, strings, lists, dicts) that a checkpoint can hold and compare.

    Functions and classes become their import path, dataclasses their fields, tensors their
    values, any other object its type's import path (never a ``repr`` with a memory address).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return plain_value(value.value)
    if isinstance(value, Mapping):
        return {str(key): plain_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain_value(item) for item in value), key=repr)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist() if value.numel() <= 64 else f"tensor{tuple(value.shape)}"
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    if isinstance(value, functools.partial):
        return {"partial": plain_value(value.func), "args": plain_value(value.args), "kwargs": plain_value(value.keywords)}
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _bound_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # skip `self`
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            arguments[name] = list(value)
        else:
            arguments[name] = value
    return arguments


def record_init_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``init`` so that the outermost constructor call records its arguments on the instance.

    The most derived class's arguments win (a subclass that maps its own arguments onto its
    parent's records its own). The wrapper keeps ``init``'s signature (``__wrapped__``), so
    LightningCLI/jsonargparse see the same parameters.
    """
    if getattr(init, "_records_arguments", False):
        return init
    signature = inspect.signature(init)

    @functools.wraps(init)
    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        if ARGUMENTS_ATTR not in self.__dict__:
            try:
                self.__dict__[ARGUMENTS_ATTR] = _bound_arguments(signature, (self, *args), kwargs)
            except TypeError:
                pass  # a wrong call: `init` itself raises the error users expect
        init(self, *args, **kwargs)

    recording_init._records_arguments = True  # type: ignore[attr-defined]
    return recording_init


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b  # 1 and 1.0 are the same setting
    return type(a) is type(b) and a == b


def compare_arguments(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (saved, current)}`` for every argument both know whose plain value differs."""
    return {
        name: (saved[name], current[name])
        for name in current
        if name in saved and not _same(plain_value(saved[name]), plain_value(current[name]))
    }


def describe_change(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """``"a: 1 in the checkpoint, 2 now; b: ..."``."""
    return "; ".join(f"`{name}`: {saved!r} in the checkpoint, {new!r} now" for name, (saved, new) in changes.items())
