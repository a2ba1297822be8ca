"""Test package. Importing it (as every `ddp_spawn` worker does when it unpickles a test's
objects) applies the clean-exit fix below."""

from tests.helpers.ddp_exit import install_clean_worker_exit

install_clean_worker_exit()
