"""Test-wide settings."""

import os

import torch.multiprocessing

# `ddp_spawn` pickles the model, datamodule and callbacks into its workers. The default
# file-descriptor sharing cannot share empty tensors ("unable to resize file"), which
# buffers and metrics legitimately hold; the file-system strategy can.
torch.multiprocessing.set_sharing_strategy("file_system")
os.environ.setdefault("PYTHONHASHSEED", "0")
