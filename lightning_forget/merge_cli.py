"""``lightning-forget merge``: merge fine-tuned checkpoints by task arithmetic or TIES, ± LiNeS.

Example::

    lightning-forget merge --pretrained base.ckpt --finetuned task0.ckpt task1.ckpt task2.ckpt \\
        --method ties --k 0.2 --lines-beta 1.0 --output merged.ckpt

Inputs are Lightning checkpoints (their ``state_dict`` is merged; no key is renamed) or plain
state dicts saved with ``torch.save``. The output is the merged state dict; when the first
fine-tuned input was a Lightning checkpoint, the output is that checkpoint with its
``state_dict`` replaced and its training state (optimizer, schedulers, loops, callbacks)
removed, so ``LightningModule.load_from_checkpoint`` and ``Trainer(ckpt_path=...)`` for
evaluation accept it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional

import torch

from lightning_forget import merging

__all__ = ["build_parser", "main"]

_TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``merge`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="lightning-forget merge",
        description="Merge models fine-tuned from one pre-trained model (task arithmetic or TIES), optionally with LiNeS layer scaling.",
    )
    parser.add_argument("--pretrained", required=True, help="pre-trained weights θ_0 (Lightning checkpoint or state dict)")
    parser.add_argument("--finetuned", required=True, nargs="+", help="fine-tuned weights, one path per task")
    parser.add_argument("--method", choices=("task_arithmetic", "ties"), default="task_arithmetic")
    parser.add_argument("--lines-beta", type=float, default=None, help="enable LiNeS with this β (depth increase of the scale)")
    parser.add_argument("--alpha", type=float, default=None, help="LiNeS α (default: the norm ratio (1/T)·‖Στ‖₁/‖τ_merged‖₁)")
    parser.add_argument("--k", type=float, default=0.2, help="TIES: fraction of each task vector kept (default 0.2)")
    parser.add_argument("--scaling", type=float, default=1.0, help="coefficient of the merged vector without LiNeS")
    parser.add_argument("--layer-pattern", default=None, help="regex whose capture group is the block index")
    parser.add_argument(
        "--head-policy", choices=("exclude", "alpha", "alpha_plus_beta", "one"), default="alpha_plus_beta",
        help="LiNeS scale of a shared output head (default: that of the deepest block)"
    )
    parser.add_argument("--output", required=True, help="where to write the merged weights")
    return parser


def _load(path: str) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    from lightning_forget.callbacks.lines import load_weights

    return load_weights(path)


def main(argv: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Run the merge CLI and return the merged state dict.

    Args:
        argv: the arguments (``sys.argv[1:]`` when ``None``).

    Raises:
        SystemExit: bad arguments (argparse), or an output path that is one of the inputs.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    inputs = [os.path.abspath(p) for p in [args.pretrained, *args.finetuned]]
    if os.path.abspath(args.output) in inputs:
        parser.error(f"--output {args.output!r} is one of the inputs; choose a new path so no weights are overwritten.")
    pretrained, _ = _load(args.pretrained)
    loaded = [_load(p) for p in args.finetuned]
    try:
        merged = merging.merge(
            pretrained,
            [state for state, _ in loaded],
            method=args.method,
            lines_beta=args.lines_beta,
            alpha=args.alpha,
            k=args.k,
            scaling=args.scaling,
            layer_pattern=args.layer_pattern,
            head_policy=args.head_policy,
        )
    except (ValueError, KeyError, TypeError) as err:
        parser.error(str(err))
    checkpoint = loaded[0][1]
    if checkpoint is not None:
        out: Any = {k: v for k, v in checkpoint.items() if k not in _TRAINING_STATE_KEYS}
        out["state_dict"] = merged
        out["lightning_forget_merge"] = {
            "method": args.method,
            "lines_beta": args.lines_beta,
            "alpha": args.alpha,
            "k": args.k,
            "scaling": args.scaling,
            "inputs": [args.pretrained, *args.finetuned],
        }
    else:
        out = merged
    directory = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(directory, exist_ok=True)
    torch.save(out, args.output)
    print(f"Merged {len(args.finetuned)} model(s) with {args.method}" + (f" + LiNeS (β={args.lines_beta})" if args.lines_beta is not None else "") + f" into {args.output}")
    return merged


if __name__ == "__main__":  # pragma: no cover
    main()
