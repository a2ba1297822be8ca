"""The ``lightning-forget`` command: a LightningCLI for continual runs, plus ``merge``.

Usage::

    lightning-forget fit --config configs/er/split_mnist.yaml
    lightning-forget fit --config configs/quickstart.yaml --trainer.max_epochs 5
    lightning-forget merge --pretrained a.ckpt --finetuned b.ckpt c.ckpt --method ties --output m.pt

Numbers the data decides are written once: the datamodule's ``num_tasks``, ``num_classes``
``input_shape`` (classifiers) and ``vocab_size``, ``corpus_names`` and ``block_size`` (language
models) are linked into the model's arguments when the model takes them.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

import lightning_forget.callbacks  # noqa: F401  (importable class paths for YAML)
import lightning_forget.datamodules  # noqa: F401
import lightning_forget.modules  # noqa: F401

__all__ = ["ForgetCLI", "main", "console_main", "LINKED_ARGUMENTS"]

#: datamodule attribute → model constructor argument, linked at instantiation. jsonargparse
#: skips a link whose source attribute or target argument the chosen classes do not have.
LINKED_ARGUMENTS: tuple[tuple[str, str], ...] = (
    ("data.num_tasks", "model.init_args.num_tasks"),
    ("data.num_classes", "model.init_args.num_classes"),
    ("data.input_shape", "model.init_args.input_shape"),
    ("data.vocab_size", "model.init_args.vocab_size"),
    ("data.corpus_names", "model.init_args.corpus_names"),
    ("data.block_size", "model.init_args.block_size"),
)


class ForgetCLI(LightningCLI):
    """LightningCLI with the datamodule's stream description linked into the model."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        for source, target in LINKED_ARGUMENTS:
            parser.link_arguments(source, target, apply_on="instantiate")


def main(args: Optional[list[str]] = None) -> Optional[ForgetCLI]:
    """Entry point of ``lightning-forget`` (``args`` for tests; defaults to ``sys.argv``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "merge":
        from lightning_forget.merge_cli import main as merge_main

        merge_main(argv[1:])
        return None
    return ForgetCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        args=argv,
    )


def console_main() -> int:
    """The ``lightning-forget`` console script (exit status 0 on success)."""
    main()
    return 0


if __name__ == "__main__":  # pragma: no cover
    console_main()
