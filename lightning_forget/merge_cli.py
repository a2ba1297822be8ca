"""``lightning-forget merge``: merge fine-tuned checkpoints by task arithmetic or TIES, ± LiNeS.

Example::

    lightning-forget merge --pretrained base.ckpt --finetuned task0.ckpt task1.ckpt task2.ckpt \\
        --method ties --k 0.2 --lines_beta 1.0 --output merged.ckpt
    lightning-forget merge --print_config > merge.yaml   # every option with its default
    lightning-forget merge --config merge.yaml

``merge`` is a subcommand of the LightningCLI (:class:`lightning_forget.cli.ForgetCLI`), so it
takes ``--config`` and ``--print_config`` like ``fit``. Its merge options (``--method``, ``--k``,
``--lines_beta``, ``--alpha``, ``--scaling``, ``--head_policy``, the TIES variants, ...) are the
arguments of :func:`lightning_forget.merging.merge`, read from its signature: their defaults and
help are that function's.

Inputs are Lightning checkpoints (their ``state_dict`` is merged; no key is renamed; the checkpoint
folder of a sharded strategy, ``ModelParallelStrategy``, is joined in this process first, see
:func:`lightning_forget.export.consolidate_sharded_checkpoint`) or plain
state dicts saved with ``torch.save``, loaded with ``torch.load(weights_only=True)``; a file
holding other Python objects (e.g. hyperparameters that are classes) falls back to the full
unpickler with a warning, so only load files you trust. The output is the merged state dict;
when the first fine-tuned input was a Lightning checkpoint, the output is that checkpoint with
its ``state_dict`` replaced and its training state (optimizer, schedulers, loops, callbacks)
removed, so ``LightningModule.load_from_checkpoint`` and ``Trainer(ckpt_path=...)`` for
evaluation accept it.

An input is never overwritten (also not through a symlink or a hard link), and an existing
output is refused unless ``--overwrite true``.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_forget import merging
from lightning_forget.validation import check_bool, check_str, check_type, message

__all__ = ["MERGE_SKIPPED_ARGUMENTS", "add_merge_arguments", "main", "merge_checkpoints"]

_TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")
_OPTIMIZER_KEY = re.compile(r"optimizer_\d+$")

#: Arguments of :func:`lightning_forget.merging.merge` the command does not expose: the models
#: themselves (given as paths) and ``depth_map`` (a per-parameter dict, for the Python API).
MERGE_SKIPPED_ARGUMENTS = frozenset({"pretrained", "finetuned_list", "depth_map"})

_INPUT_FIX = ("pass a Lightning checkpoint (.ckpt: a file, or the folder of a sharded strategy) or a state dict saved "
              "with torch.save")


def add_merge_arguments(parser: Any) -> list[str]:
    """Add the ``merge`` arguments to a jsonargparse parser; return the merge option names.

    ``--pretrained``, ``--finetuned`` (one or more paths), ``--output`` and ``--overwrite`` are
    the command's own; the rest come from the signature of :func:`lightning_forget.merging.merge`.
    """
    parser.add_argument("--pretrained", type=str, required=True, help="pre-trained weights θ_0 (Lightning checkpoint or state dict)")
    parser.add_argument("--finetuned", type=str, nargs="+", required=True, help="fine-tuned weights, one path per task")
    parser.add_argument("--output", type=str, required=True, help="where to write the merged weights (a new file)")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing --output (never an input)")
    return parser.add_function_arguments(merging.merge, skip=set(MERGE_SKIPPED_ARGUMENTS), fail_untyped=True)


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _check_output(output: str, inputs: list[tuple[str, str]], overwrite: bool) -> None:
    for name, path in inputs:
        if _same_file(output, path):
            raise ValueError(
                message("output", f"a path that is not one of the inputs (it is `{name}` {path!r})", output,
                        "choose a new file, e.g. merged.ckpt: an input is never overwritten, --overwrite included")
            )
    if os.path.isdir(output):
        raise IsADirectoryError(message("output", "a file path, not a directory", output,
                                        f"name the file, e.g. {os.path.join(output, 'merged.ckpt')!r}"))
    if os.path.lexists(output) and not overwrite:
        raise FileExistsError(message("output", "a path that does not exist yet", output,
                                      "choose a new file, or pass --overwrite true to replace it"))
    parent = os.path.dirname(os.path.abspath(output))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise NotADirectoryError(message("output", "a path whose parent is a directory", output,
                                         f"{parent!r} is a file; choose another folder"))


def _read(name: str, path: str) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """Load input ``name`` at ``path``: ``(state_dict, checkpoint or None)``, clear errors."""
    if not os.path.exists(path):
        raise FileNotFoundError(message(name, "the path of an existing file", path, _INPUT_FIX))
    if os.path.isdir(path):
        from lightning_forget.export import consolidate_sharded_checkpoint, is_sharded_checkpoint

        if not is_sharded_checkpoint(path):
            raise IsADirectoryError(message(
                name, "a file, not a directory (or the checkpoint folder of a sharded strategy)", path, _INPUT_FIX))
        # ModelParallelStrategy's distributed checkpoint: joined in this process (full tensors).
        checkpoint = consolidate_sharded_checkpoint(path)
        return dict(checkpoint["state_dict"]), checkpoint
    unreadable = ValueError(message(name, "a file torch.load can read", path, _INPUT_FIX))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The safe unpickler names the global it refused ("Unsupported global: GLOBAL ..."): a real
        # checkpoint whose extra entries (e.g. hyperparameters) are Python objects. Any other
        # failure means the file is not a torch file at all.
        if "unsupported global" not in str(err).lower():
            raise unreadable from err
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as full_err:  # noqa: BLE001
            raise unreadable from full_err
        rank_zero_warn(f"`{name}` {path!r} holds non-tensor objects; it was loaded with the full unpickler (trusted files only).")
    except Exception as err:  # noqa: BLE001 - torch raises KeyError, EOFError, RuntimeError... on non-torch files
        raise unreadable from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return dict(obj["state_dict"]), dict(obj)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None
    raise ValueError(message(name, "a Lightning checkpoint (a dict with 'state_dict') or a state dict of tensors",
                             f"{path!r} holding a {type(obj).__name__}", _INPUT_FIX))


def merge_checkpoints(
    pretrained: str, finetuned: list[str], output: str, overwrite: bool = False, **options: Any
) -> dict[str, torch.Tensor]:
    """Merge the checkpoints at ``finetuned`` onto ``pretrained`` and write the result to ``output``.

    Args:
        pretrained: path of θ_0.
        finetuned: paths of the fine-tuned models, one per task.
        output: path of the merged file; never one of the inputs, and a new file unless
            ``overwrite``.
        overwrite: replace an existing ``output``.
        **options: the options of :func:`lightning_forget.merging.merge` (``method``, ``k``,
            ``lines_beta``, ...).

    Returns:
        The merged state dict.

    Raises:
        ValueError: ``output`` is an input, an input is not a checkpoint or state dict, or the
            merge refuses its options.
        FileNotFoundError, IsADirectoryError, FileExistsError, NotADirectoryError: bad paths.
    """
    check_str("pretrained", pretrained)
    check_type("finetuned", finetuned, (list, tuple), fix="pass one path per fine-tuned model")
    if not finetuned:
        raise ValueError(message("finetuned", "a non-empty list of paths", finetuned, "pass one path per fine-tuned model"))
    for i, path in enumerate(finetuned):
        check_str(f"finetuned[{i}]", path)
    check_str("output", output)
    overwrite = check_bool("overwrite", overwrite)
    inputs = [("pretrained", pretrained), *((f"finetuned[{i}]", p) for i, p in enumerate(finetuned))]
    _check_output(output, inputs, overwrite)
    state0, _ = _read("pretrained", pretrained)
    loaded = [_read(name, path) for name, path in inputs[1:]]
    merged = merging.merge(state0, [state for state, _ in loaded], **options)
    checkpoint = loaded[0][1]
    out: Any = merged
    if checkpoint is not None:
        # (a consolidated sharded checkpoint holds its optimizers as optimizer_0, optimizer_1, ...)
        out = {k: v for k, v in checkpoint.items() if k not in _TRAINING_STATE_KEYS and not _OPTIMIZER_KEY.match(k)}
        out["state_dict"] = merged
        out["lightning_forget_merge"] = {**options, "inputs": [pretrained, *finetuned]}
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    # Write next to the output, then rename: a failed save never leaves a half-written file.
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".merge-", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(out, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the result from the group
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    method = options.get("method", "task_arithmetic")
    beta = options.get("lines_beta")
    print(f"Merged {len(finetuned)} model(s) with {method}" + (f" + LiNeS (β={beta})" if beta is not None else "") + f" into {output}")
    return merged


def main(argv: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """``lightning-forget merge ARGV``: run the merge subcommand and return the merged state dict.

    Raises:
        SystemExit: bad arguments, or an error of :func:`merge_checkpoints` (printed as a
            usage error, without a traceback).
    """
    import sys

    from lightning_forget.cli import main as cli_main

    cli = cli_main(["merge", *(sys.argv[1:] if argv is None else argv)])
    return cli.merged
