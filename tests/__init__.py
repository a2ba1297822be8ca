"""Test package. Importing it (as every `ddp_spawn` worker does when it unpickles a test's
objects) applies the clean-exit fix below."""

from tests.helpers.ddp_exit import destroy_process_group_when_workers_finish

destroy_process_group_when_workers_finish()
