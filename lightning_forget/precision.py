"""Precision context: forwards that callbacks run from hooks use the trainer's precision.

Lightning runs ``training_step`` (and the validation/test/predict steps) inside the precision
plugin's ``forward_context()``: under ``precision="bf16-mixed"`` or ``"16-mixed"`` that is
``torch.autocast``, under ``"64-true"`` the default dtype, under ``"32-true"`` nothing. A forward
that a callback runs from a hook (a continual evaluation, a LiNeS sweep score) is outside those
steps, so without this context it would run in fp32 while training runs in bf16, and measure a
different model than the one being trained.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import lightning.pytorch as pl

__all__ = ["forward_context"]


def forward_context(trainer: "pl.Trainer") -> AbstractContextManager[None]:
    """The context manager the trainer's precision plugin wraps its steps' forwards in.

    Use it around any forward a callback runs outside the Lightning steps::

        with torch.no_grad(), forward_context(trainer):
            logits = pl_module(x)

    Args:
        trainer: the running Trainer (its ``precision_plugin`` decides the context).
    """
    return trainer.precision_plugin.forward_context()
