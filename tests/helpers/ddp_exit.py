"""Make `ddp_spawn` workers leave cleanly.

A gloo process group sometimes aborts a worker at interpreter exit, after all its work is done
("terminate called without an active exception", SIGABRT; most likely a C++ thread destroyed
while still joinable during teardown; the root cause was not found; plain `ddp` shows the
same). Destroying the group first was not enough (CI still saw the abort), so a worker whose
function returned normally now leaves with ``os._exit(0)``, skipping the interpreter's
teardown. That is safe here: Lightning hands rank 0's results back through a `SimpleQueue`,
whose `put` has written them to the pipe before it returns, and torch's spawn wrapper has nothing
left to do on success. A worker that raises still goes through the normal path, so torch reports
its traceback.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from typing import Any

import torch.distributed as dist
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

_ORIGINAL = _MultiProcessingLauncher._wrapping_function


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _wrapping_function(self: _MultiProcessingLauncher, *args: Any, **kwargs: Any) -> None:
    faulthandler.enable(all_threads=True)  # a native abort prints where each thread was
    try:
        _ORIGINAL(self, *args, **kwargs)
    except BaseException:
        _destroy_group()
        raise
    _destroy_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def install_clean_worker_exit() -> None:
    """Wrap Lightning's spawn worker function: destroy the group, then ``os._exit(0)`` (idempotent)."""
    if _MultiProcessingLauncher._wrapping_function is not _wrapping_function:
        _MultiProcessingLauncher._wrapping_function = _wrapping_function  # type: ignore[method-assign]
