"""Test-wide settings."""

import os

# `ddp_spawn` tests run with torch's default (file-descriptor) sharing strategy, as a user's
# process does; the library's objects are made to survive it (see ReplayBuffer.__getstate__).
os.environ.setdefault("PYTHONHASHSEED", "0")

# Under pytest-xdist (`make test` runs one worker per core) each worker keeps to one torch thread,
# so the workers do not oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
