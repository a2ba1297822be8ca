"""One batch convention for every callback: which field of a user's batch is the input, which the target.

A user's ``training_step`` receives whatever their loader yields: a ``(x, y)`` tuple, a longer
tuple (``(x, y, task_id)``), a namedtuple, or a dict (``{"image": ..., "label": ...}``). Every
callback of this library that reads batches takes the same two arguments, ``input_key`` and
``target_key``, and reads batches through one :class:`BatchFields` built from them:

- a ``str`` names a dict key or a namedtuple field; an ``int`` names a tuple/list position;
- ``None`` (the default) finds them: position 0 and 1 of a tuple, list or namedtuple; for a dict,
  the first present of :data:`INPUT_KEYS` and of :data:`TARGET_KEYS`.

The first batch is checked (:meth:`BatchFields.check`): a missing field raises an error that
names the argument and lists the fields the batch has. A batch is split into its **per-sample
tensors** (every tensor whose first dimension is the batch size, keyed by dict key, namedtuple
field, or position as a string ``"0"``, ``"1"``, ...) and the rest (scalars, tensors of another
length, non-tensor values), which :meth:`SplitBatch.rebuild` puts back unchanged. Per-sample
values that are not tensors (a list of file names) cannot be stored or joined with replayed
samples; callbacks that need to add rows refuse them with a clear error
(:meth:`SplitBatch.require_tensors`).

**Two-stream batches.** Lightning's ``CombinedLoader`` (a dict of loaders passed as
``train_dataloaders``, e.g. ``{"forget": ..., "retain": ...}`` or ``{"stream": ..., "replay": ...}``)
yields a dict of batches. ``stream`` names the sub-batch to read (``stream="retain"``; an ``int``
for a list of loaders); :meth:`SplitBatch.rebuild` puts the edited sub-batch back beside the
untouched others. A two-stream batch read without ``stream`` raises an error listing the streams.
:func:`stream_names` lists them.

No Lightning in this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import Tensor

from lightning_forget.validation import message

__all__ = [
    "BatchFields",
    "MissingFieldError",
    "SplitBatch",
    "INPUT_KEYS",
    "TARGET_KEYS",
    "logits_of",
    "stream_names",
]

FieldKey = Union[str, int, None]

#: Dict keys tried, in order, for the model input when ``input_key=None``.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "input_ids", "data")
#: Dict keys tried, in order, for the target when ``target_key=None``.
TARGET_KEYS = ("y", "label", "labels", "target", "targets")


class MissingFieldError(KeyError):
    """A batch lacks the field ``input_key``/``target_key`` names (a ``KeyError`` with a readable message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _is_namedtuple(batch: Any) -> bool:
    return isinstance(batch, tuple) and hasattr(batch, "_fields")


def _items(batch: Any) -> list[tuple[str, Any]]:
    """``(name, value)`` of every field of a batch, in order."""
    if isinstance(batch, Mapping):
        return [(str(k), v) for k, v in batch.items()]
    if _is_namedtuple(batch):
        return list(zip(batch._fields, batch))
    if isinstance(batch, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(batch)]
    raise TypeError(
        f"Batches must be a tuple, list, namedtuple or dict of tensors, got {type(batch).__name__}. "
        "Fix: make the loader yield `(x, y, ...)` or a dict of per-sample tensors."
    )


def _is_sub_batch(value: Any) -> bool:
    return isinstance(value, (Mapping, tuple, list)) and not isinstance(value, Tensor)


def stream_names(batch: Any) -> list[str]:
    """The stream names of a two-stream batch (a dict of batches from ``CombinedLoader``), else ``[]``.

    A dict counts as a batch of streams when none of its values is a tensor and at least one is a
    tuple, list or dict (a sub-batch).
    """
    if not isinstance(batch, Mapping) or not batch:
        return []
    values = list(batch.values())
    if any(isinstance(v, Tensor) for v in values) or not any(_is_sub_batch(v) for v in values):
        return []
    # a dict whose sub-batches are lists of per-sample strings is still one batch
    if not any(isinstance(v, Mapping) or (isinstance(v, (tuple, list)) and any(isinstance(i, Tensor) for i in v))
               for v in values):
        return []
    return [str(k) for k in batch]


@dataclass
class SplitBatch:
    """A batch taken apart: its per-sample tensors by name, and how to put it back together.

    Attributes:
        fields: per-sample tensors (first dimension = :attr:`size`), by field name.
        input_name: the name in :attr:`fields` of the model input.
        target_name: the name of the target, or ``None`` when the batch has none.
        size: the number of samples.
        other_per_sample: names of per-sample values that are not tensors (lists of the batch's
            length); they cannot be stored in a buffer or joined with replayed rows.
    """

    fields: dict[str, Tensor]
    input_name: str
    target_name: Optional[str]
    size: int
    other_per_sample: list[str] = field(default_factory=list)
    _like: Any = None
    stream: Union[str, int, None] = None
    _outer: Any = None

    @property
    def input(self) -> Tensor:
        return self.fields[self.input_name]

    @property
    def target(self) -> Optional[Tensor]:
        return None if self.target_name is None else self.fields[self.target_name]

    def require_tensors(self, owner: str, action: str = "join replayed samples to the batch") -> None:
        """Refuse a batch with per-sample values that are not tensors (they would be misaligned).

        Raises:
            TypeError: :attr:`other_per_sample` is not empty.
        """
        if self.other_per_sample:
            raise TypeError(
                f"{owner}: the batch's per-sample field(s) {self.other_per_sample} are lists, not tensors, "
                f"so {owner} cannot {action} without misaligning them with the tensor fields. Fix: "
                "return them as tensors from the loader's collate_fn, or drop them from the training batch."
            )

    def rebuild(self, fields: Mapping[str, Tensor]) -> Any:
        """A batch of the original layout (same type, same non-per-sample values) holding ``fields``.

        ``fields`` must have every name of :attr:`fields`; rows may have been added (replay). For
        a two-stream batch, the other streams are returned unchanged.
        """
        inner = self._rebuild_inner(fields)
        if self.stream is None:
            return inner
        outer = self._outer
        if isinstance(outer, Mapping):
            out = dict(outer)
            out[self.stream] = inner
            return type(outer)(out) if type(outer) is not dict else out
        values = list(outer)
        values[int(self.stream)] = inner  # type: ignore[arg-type]
        return type(outer)(values)

    def _rebuild_inner(self, fields: Mapping[str, Tensor]) -> Any:
        missing = set(self.fields) - set(fields)
        if missing:
            raise KeyError(f"Cannot rebuild the batch: fields {sorted(missing)} are missing.")
        like = self._like
        if isinstance(like, Mapping):
            out = dict(like)
            for name in self.fields:
                out[name] = fields[name]
            return type(like)(out) if type(like) is not dict else out
        names = [name for name, _ in _items(like)]
        values = [fields[name] if name in self.fields else value for name, value in zip(names, like)]
        if _is_namedtuple(like):
            return type(like)(*values)
        return type(like)(values)


class BatchFields:
    """Reads the input and target of any batch layout (see the module docstring).

    Args:
        input_key: dict key or namedtuple field (``str``), or tuple position (``int``) of the
            model input; ``None`` finds it (position 0, or the first of :data:`INPUT_KEYS`).
        target_key: the same for the target (labels); ``None`` finds it (position 1, or the
            first of :data:`TARGET_KEYS`).
        stream: for two-stream batches (a dict of batches from ``CombinedLoader``), the name
            (``str``) or position (``int``) of the sub-batch to read; ``None`` for one-stream batches.
        owner: the name of the class using it, for error messages.

    Raises:
        TypeError: a key that is neither ``str``, ``int`` nor ``None``.
    """

    def __init__(
        self,
        input_key: FieldKey = None,
        target_key: FieldKey = None,
        owner: str = "callback",
        stream: FieldKey = None,
    ) -> None:
        for name, value in (("input_key", input_key), ("target_key", target_key), ("stream", stream)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
                raise TypeError(
                    message(name, "a str (dict key or namedtuple field), an int (tuple position) or None", value,
                            "e.g. input_key='image', target_key='label' for dict batches")
                )
        self.input_key = input_key
        self.target_key = target_key
        self.stream = stream
        self.owner = owner

    def __repr__(self) -> str:
        stream = f", stream={self.stream!r}" if self.stream is not None else ""
        return f"BatchFields(input_key={self.input_key!r}, target_key={self.target_key!r}{stream})"

    # ------------------------------------------------------------------ streams
    def sub_batch(self, batch: Any) -> Any:
        """The one-stream batch to read: ``batch[stream]``, or ``batch`` itself when ``stream=None``.

        Raises:
            KeyError: ``stream`` names no stream of ``batch``, or ``batch`` has several streams and
                ``stream`` is ``None`` (the message lists them).
        """
        names = stream_names(batch) if isinstance(batch, Mapping) else []
        if self.stream is None:
            if names:
                raise MissingFieldError(
                    f"{self.owner}: the batch holds several streams {names} (a dict of batches, as "
                    "Lightning's CombinedLoader yields); `stream`=None does not say which one to read. "
                    f"Fix: pass `stream=` naming one of {names}."
                )
            return batch
        if isinstance(batch, Mapping):
            if self.stream in batch:
                return batch[self.stream]
            raise MissingFieldError(
                f"{self.owner}: `stream`={self.stream!r} is not a stream of the batch; its keys are "
                f"{[str(k) for k in batch]}. Fix: pass `stream=` naming one of them."
            )
        if isinstance(batch, (tuple, list)) and isinstance(self.stream, int) and -len(batch) <= self.stream < len(batch):
            inner = batch[self.stream]
            if _is_sub_batch(inner):
                return inner
        raise MissingFieldError(
            f"{self.owner}: `stream`={self.stream!r} names a sub-batch, but the batch is a "
            f"{type(batch).__name__} without one there. Fix: pass `stream=None` for one-stream batches."
        )

    # ------------------------------------------------------------------ finding fields
    def _find(self, batch: Any, key: FieldKey, defaults: tuple[str, ...], position: int, arg: str,
              required: bool) -> Optional[str]:
        items = _items(batch)
        names = [name for name, _ in items]
        if key is not None:
            if isinstance(key, int):
                if isinstance(batch, Mapping):
                    raise MissingFieldError(self._missing(arg, key, names, "the batch is a dict: name the key as a str"))
                if not -len(items) <= key < len(items):
                    raise MissingFieldError(self._missing(arg, key, names, f"the batch has {len(items)} positions"))
                return names[key]
            if key in names:
                return key
            raise MissingFieldError(self._missing(arg, key, names, "name one of the batch's fields"))
        if isinstance(batch, Mapping):
            for candidate in defaults:
                if candidate in names:
                    return candidate
            if not required:
                return None
            raise MissingFieldError(self._missing(arg, None, names, f"none of the default keys {list(defaults)} is present"))
        if position < len(items):
            return names[position]
        if not required:
            return None
        raise MissingFieldError(self._missing(arg, None, names, f"the batch has no position {position}"))

    def _missing(self, arg: str, key: FieldKey, names: list[str], why: str) -> str:
        return (
            f"{self.owner}: cannot find the batch's {'input' if arg == 'input_key' else 'target'} with "
            f"`{arg}`={key!r} ({why}); the batch's fields are {names}. Fix: pass `{arg}=` naming "
            f"the field (a dict key or namedtuple field as a str, a tuple position as an int)."
        )

    def input_name(self, batch: Any) -> str:
        """The name of the input field of ``batch``."""
        name = self._find(batch, self.input_key, INPUT_KEYS, 0, "input_key", required=True)
        assert name is not None
        return name

    def target_name(self, batch: Any, required: bool = True) -> Optional[str]:
        """The name of the target field of ``batch`` (``None`` if absent and not ``required``)."""
        return self._find(batch, self.target_key, TARGET_KEYS, 1, "target_key", required=required)

    def input(self, batch: Any) -> Tensor:
        """The model input of ``batch`` (of its ``stream`` for a two-stream batch)."""
        inner = self.sub_batch(batch)
        return dict(_items(inner))[self.input_name(inner)]

    def target(self, batch: Any) -> Tensor:
        """The target of ``batch`` (of its ``stream`` for a two-stream batch)."""
        inner = self.sub_batch(batch)
        name = self.target_name(inner)
        return dict(_items(inner))[name]  # type: ignore[index]

    # ------------------------------------------------------------------ splitting
    def split(self, batch: Any, require_target: bool = True) -> SplitBatch:
        """Take ``batch`` apart into per-sample tensors (see :class:`SplitBatch`).

        Raises:
            KeyError: the input or target cannot be found (the message names the argument).
            TypeError: the input or target is not a tensor with a batch dimension.
        """
        outer = batch
        batch = self.sub_batch(outer)
        input_name = self.input_name(batch)
        target_name = self.target_name(batch, required=require_target)
        items = dict(_items(batch))
        for arg, name in (("input_key", input_name), ("target_key", target_name)):
            if name is None:
                continue
            value = items[name]
            if not isinstance(value, Tensor) or value.dim() == 0:
                raise TypeError(
                    f"{self.owner}: the batch's field {name!r} (found by `{arg}`) is "
                    f"{type(value).__name__}{'' if not isinstance(value, Tensor) else ' of shape ()'}, "
                    f"not a tensor with a batch dimension. Fix: pass `{arg}=` naming the right field."
                )
        anchor = items[target_name] if target_name is not None else items[input_name]
        size = int(anchor.shape[0])
        fields: dict[str, Tensor] = {}
        others: list[str] = []
        for name, value in items.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
                fields[name] = value
            elif isinstance(value, (list, tuple)) and not isinstance(value, Tensor) and len(value) == size and size > 1:
                others.append(name)
        stream = None if batch is outer else self.stream
        return SplitBatch(fields, input_name, target_name, size, others, _like=batch, stream=stream, _outer=outer)

    def check(self, batch: Any, require_target: bool = True) -> SplitBatch:
        """:meth:`split`, meant for the first batch of a fit (same errors)."""
        return self.split(batch, require_target=require_target)


def logits_of(output: Any) -> Tensor:
    """The logits in what a model's forward returned: a tensor, a dict or model output with
    ``logits``, or a tuple whose first item is the logits.

    Raises:
        TypeError: none of these.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"Cannot find logits in a forward output of type {type(output).__name__}: return a tensor, a dict "
        "with 'logits', an object with a `.logits` tensor, or a tuple starting with the logits."
    )
