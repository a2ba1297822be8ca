"""Make `ddp_spawn` workers leave cleanly.

A gloo process group that is still alive when a worker's interpreter exits sometimes aborts the
process ("terminate called without an active exception", SIGABRT) after all its work is done;
DESIGN.md §10 records the same for plain `ddp`, fixed by destroying the group after `fit`. Lightning's
spawn launcher does not destroy it, so in tests the worker function is wrapped to do so once the
worker has handed back its results.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

_ORIGINAL = _MultiProcessingLauncher._wrapping_function


def _wrapping_function(self: _MultiProcessingLauncher, *args: Any, **kwargs: Any) -> None:
    try:
        _ORIGINAL(self, *args, **kwargs)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def destroy_process_group_when_workers_finish() -> None:
    """Install the wrapper (idempotent)."""
    if _MultiProcessingLauncher._wrapping_function is not _wrapping_function:
        _MultiProcessingLauncher._wrapping_function = _wrapping_function  # type: ignore[method-assign]
