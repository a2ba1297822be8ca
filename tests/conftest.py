"""Test-wide settings."""

import os

# `ddp_spawn` tests run with torch's default (file-descriptor) sharing strategy, as a user's
# process does; the library's objects are made to survive it (see ReplayBuffer.__getstate__).
os.environ.setdefault("PYTHONHASHSEED", "0")
