"""The ``lightning-forget`` command: a LightningCLI for continual runs, plus ``merge``.

Usage::

    lightning-forget fit --config configs/er/split_mnist.yaml
    lightning-forget fit --config configs/quickstart.yaml --trainer.max_epochs 5
    lightning-forget merge --pretrained a.ckpt --finetuned b.ckpt c.ckpt --method ties --output m.pt
    lightning-forget merge --print_config

Numbers the data decides are written once: the datamodule's ``num_tasks``, ``num_classes``
``input_shape`` (classifiers) and ``vocab_size``, ``corpus_names`` and ``block_size`` (language
models) are linked into the model's arguments when the model takes them. A model that takes one
of them from a datamodule that lacks it is an error (unless the value is set in the config), so a
forgotten attribute never leaves the model with its default shape.

Like every LightningCLI, a run refuses to start when its log directory already holds a
``config.yaml`` (an earlier run's results would be overwritten): choose a new
``--trainer.default_root_dir`` or logger version.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

import lightning_forget.callbacks  # noqa: F401  (importable class paths for YAML)
import lightning_forget.datamodules  # noqa: F401
import lightning_forget.modules  # noqa: F401
from lightning_forget.merge_cli import add_merge_arguments, merge_checkpoints

__all__ = ["ForgetCLI", "main", "console_main", "LINKED_ARGUMENTS", "MERGE"]

#: What ``lightning-forget --help`` says first.
DESCRIPTION = "Continual-learning and unlearning runs (Lightning's fit, validate, test, predict) and checkpoint merging."

#: The subcommand that merges checkpoints (:mod:`lightning_forget.merge_cli`) instead of training.
MERGE = "merge"

#: datamodule attribute → model constructor argument, linked at instantiation. A link whose
#: target the model does not take is unused; one whose source the datamodule lacks is an error
#: (:meth:`ForgetCLI.check_links`).
LINKED_ARGUMENTS: tuple[tuple[str, str], ...] = (
    ("data.num_tasks", "model.init_args.num_tasks"),
    ("data.num_classes", "model.init_args.num_classes"),
    ("data.input_shape", "model.init_args.input_shape"),
    ("data.vocab_size", "model.init_args.vocab_size"),
    ("data.corpus_names", "model.init_args.corpus_names"),
    ("data.block_size", "model.init_args.block_size"),
)


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _plain(value: Any) -> Any:
    """Tuples as lists, so a parsed ``[1, 28, 28]`` equals a default ``(1, 28, 28)``."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _init_args(model_config: Any) -> Namespace:
    if isinstance(model_config, Namespace) and isinstance(model_config.get("init_args"), Namespace):
        return model_config.init_args
    return Namespace()


class ForgetCLI(LightningCLI):
    """LightningCLI with the datamodule's stream description linked into the model, and ``merge``.

    ``merge`` sits next to ``fit``/``validate``/``test``/``predict``; its options are those of
    :func:`lightning_forget.merging.merge` (see :mod:`lightning_forget.merge_cli`), and after it
    ran ``cli.merged`` holds the merged state dict (``cli.model``, ``cli.datamodule`` and
    ``cli.trainer`` are ``None``).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in LINKED_ARGUMENTS:
            parser.link_arguments(source, target, apply_on="instantiate")

    # ------------------------------------------------------------------ merge subcommand
    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        description = "Merge models fine-tuned from one pre-trained model (task arithmetic or TIES), optionally with LiNeS."
        merge_parser = self.init_parser(description=description, **kwargs.get(MERGE, {}))
        self._merge_options = add_merge_arguments(merge_parser)
        self._subcommand_parsers[MERGE] = merge_parser
        assert parser._subcommands_action is not None
        parser._subcommands_action.add_subcommand(MERGE, merge_parser, help=description)

    def _setup_parser_kwargs(self, parser_kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        main_kwargs, sub_kwargs = super()._setup_parser_kwargs(parser_kwargs)
        if MERGE in main_kwargs:
            sub_kwargs[MERGE] = main_kwargs.pop(MERGE)
        return main_kwargs, sub_kwargs

    def _set_seed(self) -> None:
        if self.config.get("subcommand") != MERGE:  # a merge draws no random numbers
            super()._set_seed()

    def instantiate_classes(self) -> None:
        if self.subcommand == MERGE:
            self.config_init = self.config
            self.model = self.datamodule = self.trainer = None  # type: ignore[assignment]
            return
        super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand != MERGE:
            return super()._run_subcommand(subcommand)
        cfg = self.config[MERGE]
        options = {name: cfg[name] for name in self._merge_options}
        try:
            self.merged = merge_checkpoints(cfg.pretrained, list(cfg.finetuned), cfg.output, cfg.overwrite, **options)
        except (OSError, ValueError, TypeError, KeyError) as err:
            # A usage error (message, exit status 2), not a traceback.
            self._subcommand_parsers[MERGE].error(str(err))

    # ------------------------------------------------------------------ links
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        # What the user gave (config files and flags, no defaults): a linked argument set
        # there does not need the datamodule's attribute.
        if isinstance(args, (dict, Namespace)):
            self._given = parser.parse_object(args, defaults=False)
        else:
            self._given = parser.parse_args(args, defaults=False)

    def _parse_ckpt_path(self) -> None:
        """Read a ``ckpt_path``'s hyperparameters into the config, as LightningCLI does, without the
        link targets the model does not take.

        Lightning's instantiator records every applied link in the module's hyperparameters, also
        one the model's ``__init__`` has no argument for (``num_tasks`` for ``CausalLMModule``), and
        re-reading them would pass it to the constructor (``validate``/``test --ckpt_path`` failed
        with "unexpected keyword argument").
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            class_path = hparams.pop("_class_path")
            module_name, _, name = class_path.rpartition(".")
            taken = inspect.signature(getattr(importlib.import_module(module_name), name).__init__).parameters
            any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in taken.values())
            for _, target in LINKED_ARGUMENTS:
                if not any_keyword and _leaf(target) not in taken:
                    hparams.pop(_leaf(target), None)
            hparams = {"class_path": class_path, "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def check_links(self) -> None:
        """Refuse a model argument the links should fill when the datamodule lacks its source.

        Raises:
            ValueError: the model takes e.g. ``input_shape``, the datamodule has no
                ``input_shape`` attribute and the config does not set it.
        """
        if self.datamodule is None or self.model is None:
            return
        taken = inspect.signature(type(self.model).__init__).parameters
        given = _init_args(self._get(self._given, "model"))
        parsed = _init_args(self._get(self.config, "model"))  # also holds a checkpoint's hyperparameters
        for source, target in LINKED_ARGUMENTS:
            attr, arg = _leaf(source), _leaf(target)
            if arg not in taken or hasattr(self.datamodule, attr) or arg in given:
                continue
            if arg in parsed and _plain(parsed[arg]) != _plain(taken[arg].default):
                continue  # set by the config or the checkpoint (ckpt_path) rather than left at its default
            data, model = type(self.datamodule).__name__, type(self.model).__name__
            raise ValueError(
                f"`{model}` takes `{arg}`, which the CLI links from the datamodule's `{attr}`, but "
                f"`{data}` has no attribute `{attr}`, so the model would keep its default "
                f"{arg}={taken[arg].default!r}. Fix: set `self.{attr}` in `{data}.__init__`, or give "
                f"the value in the config (`model.init_args.{arg}`, e.g. --model.{arg} ...)."
            )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # Datamodule and model exist here, the Trainer not yet: check the links first.
        self.check_links()
        return super().instantiate_trainer(**kwargs)


def main(args: ArgsType = None, **cli_kwargs: Any) -> Optional[ForgetCLI]:
    """Run the ``lightning-forget`` command and return the :class:`ForgetCLI` it built.

    Args:
        args: the command line as a list (tests, notebooks); ``None`` lets LightningCLI read
            ``sys.argv`` (the console script).
        **cli_kwargs: more :class:`~lightning.pytorch.cli.LightningCLI` arguments, e.g.
            ``save_config_kwargs={"overwrite": True}`` to replace an earlier run's
            ``config.yaml`` (refused by default).
    """
    kwargs: dict[str, Any] = {
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "seed_everything_default": 0,
        "parser_kwargs": {"parser_mode": "omegaconf", "prog": "lightning-forget", "description": DESCRIPTION},
    }
    kwargs.update(cli_kwargs)
    return ForgetCLI(args=args, **kwargs)


def console_main() -> int:
    """The ``lightning-forget`` console script (exit status 0 on success)."""
    main()
    return 0


if __name__ == "__main__":  # pragma: no cover
    console_main()
