"""The `lightning-forget` entry point: LightningCLI subcommands, links and `merge`."""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lightning_forget import merging
from lightning_forget.cli import main
from lightning_forget.merge_cli import MERGE_SKIPPED_ARGUMENTS, merge_checkpoints
from tests.helpers.data import BlobStream

ROOT = Path(__file__).resolve().parents[1]
#: The console script `lightning-forget` (pyproject's `lightning_forget.cli:console_main`).
CONSOLE = [sys.executable, "-c", "from lightning_forget.cli import console_main; console_main()"]


def _console(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*CONSOLE, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=240)


def _trainer_config(tmp_path: Path) -> dict[str, Any]:
    return {"accelerator": "cpu", "fast_dev_run": 1, "logger": False, "enable_progress_bar": False,
            "reload_dataloaders_every_n_epochs": 1, "default_root_dir": str(tmp_path)}


def _write_models(tmp_path: Path) -> list[Path]:
    """θ_0 = 0 and two fine-tuned state dicts θ_0 + 1, θ_0 + 2 as files m0.pt, m1.pt, m2.pt."""
    base = {"net.0.weight": torch.zeros(2, 2), "net.0.bias": torch.zeros(2)}
    tuned = [{k: v + i + 1 for k, v in base.items()} for i in range(2)]
    paths = []
    for i, state in enumerate([base, *tuned]):
        paths.append(tmp_path / f"m{i}.pt")
        torch.save(state, paths[-1])
    return paths


# ------------------------------------------------------------------ the console script
def test_console_help_has_no_args_warning_and_lists_merge() -> None:
    result = _console("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "LightningCLI's args parameter" not in text
    assert "{fit,validate,test,predict,merge}" in text and "usage: lightning-forget" in text


def test_merge_print_config_shows_the_defaults_of_merging_merge(tmp_path: Path) -> None:
    result = _console("merge", "--print_config")
    assert result.returncode == 0, result.stderr
    assert "LightningCLI's args parameter" not in result.stdout + result.stderr
    printed = yaml.safe_load(result.stdout)
    signature = inspect.signature(merging.merge).parameters
    options = {name: p.default for name, p in signature.items() if name not in MERGE_SKIPPED_ARGUMENTS}
    assert {k: printed[k] for k in options} == options  # head_policy included: one source of defaults
    assert printed["overwrite"] is False and {"pretrained", "finetuned", "output"} <= set(printed)


def test_merge_from_a_config_file(tmp_path: Path) -> None:
    paths = _write_models(tmp_path)
    out = tmp_path / "merged.pt"
    config = {"pretrained": str(paths[0]), "finetuned": [str(p) for p in paths[1:]], "output": str(out),
              "method": "task_arithmetic", "scaling": 0.5}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    result = _console("merge", "--config", str(tmp_path / "merge.yaml"))
    assert result.returncode == 0, result.stderr
    merged = torch.load(out, weights_only=True)
    # θ0 + 0.5·(1 + 2) = 1.5
    assert torch.allclose(merged["net.0.weight"], torch.full((2, 2), 1.5))


# ------------------------------------------------------------------ merge in-process
def test_merge_subcommand_writes_a_merged_state_dict(tmp_path: Path) -> None:
    paths = _write_models(tmp_path)
    out = tmp_path / "merged.pt"
    args = ["merge", "--pretrained", str(paths[0]), "--finetuned", str(paths[1]), str(paths[2])]
    cli = main([*args, "--method", "task_arithmetic", "--output", str(out)])
    merged = torch.load(out, weights_only=True)
    # task arithmetic with scaling 1: θ0 + (1 + 2) = 3
    assert torch.allclose(merged["net.0.weight"], torch.full((2, 2), 3.0))
    assert cli is not None and cli.trainer is None and torch.equal(cli.merged["net.0.weight"], merged["net.0.weight"])


def _merge_error(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_merge_never_writes_onto_an_input_through_a_symlink(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = _write_models(tmp_path)
    before = paths[0].read_bytes()
    link = tmp_path / "link.pt"
    link.symlink_to(paths[0])
    for overwrite in ("false", "true"):
        err = _merge_error(capsys, ["--pretrained", str(paths[0]), "--finetuned", str(paths[1]), "--output", str(link),
                                    "--overwrite", overwrite])
        assert "`output` must be a path that is not one of the inputs (it is `pretrained`" in err
    assert paths[0].read_bytes() == before


def test_merge_never_writes_onto_an_input_through_a_hard_link(tmp_path: Path) -> None:
    paths = _write_models(tmp_path)
    os.link(paths[2], tmp_path / "hard.pt")
    with pytest.raises(ValueError, match=r"is `finetuned\[1\]`"):
        merge_checkpoints(str(paths[0]), [str(paths[1]), str(paths[2])], str(tmp_path / "hard.pt"), overwrite=True)


def test_merge_refuses_an_existing_output_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = _write_models(tmp_path)
    out = tmp_path / "merged.pt"
    out.write_bytes(b"an earlier result")
    args = ["--pretrained", str(paths[0]), "--finetuned", str(paths[1]), "--output", str(out)]
    err = _merge_error(capsys, args)
    assert "`output` must be a path that does not exist yet" in err and "--overwrite true" in err
    assert out.read_bytes() == b"an earlier result"
    main(["merge", *args, "--overwrite", "true"])
    assert torch.allclose(torch.load(out, weights_only=True)["net.0.weight"], torch.ones(2, 2))


def test_merge_clear_errors_for_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = _write_models(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    (tmp_path / "folder").mkdir()
    ok = ["--finetuned", str(paths[1]), "--output", str(tmp_path / "out.pt")]
    err = _merge_error(capsys, ["--pretrained", str(text), *ok])
    assert "`pretrained` must be a file torch.load can read, got" in err and "Traceback" not in err
    err = _merge_error(capsys, ["--pretrained", str(paths[0]), "--finetuned", str(paths[1]), "--output", str(tmp_path / "folder")])
    assert "`output` must be a file path, not a directory" in err
    err = _merge_error(capsys, ["--pretrained", str(tmp_path / "missing.pt"), *ok])
    assert "`pretrained` must be the path of an existing file" in err
    err = _merge_error(capsys, ["--pretrained", str(tmp_path / "folder"), *ok])
    assert "`pretrained` must be a file, not a directory" in err
    torch.save([1, 2], tmp_path / "list.pt")
    err = _merge_error(capsys, ["--pretrained", str(paths[0]), "--finetuned", str(tmp_path / "list.pt"), "--output", str(tmp_path / "o.pt")])
    assert "`finetuned[0]` must be a Lightning checkpoint" in err
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "o.pt").exists()


def test_merge_loads_with_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write_models(tmp_path)
    # a Lightning checkpoint whose hyperparameters hold a callable: only the full unpickler reads it
    torch.save({"state_dict": torch.load(paths[2], weights_only=True), "hyper_parameters": {"opt": functools.partial(max, 1)}},
               tmp_path / "ft.ckpt")
    calls = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append((Path(args[0]).name, kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.warns(UserWarning, match=r"`finetuned\[1\]` .* holds non-tensor objects"):
        merge_checkpoints(str(paths[0]), [str(paths[1]), str(tmp_path / "ft.ckpt")], str(tmp_path / "out.ckpt"))
    assert calls == [("m0.pt", True), ("m1.pt", True), ("ft.ckpt", True), ("ft.ckpt", False)]


# ------------------------------------------------------------------ fit
def _fit_config(tmp_path: Path, data: dict[str, Any], model_args: dict[str, Any]) -> Path:
    config: dict[str, Any] = {
        "trainer": _trainer_config(tmp_path),
        "model": {"class_path": "lightning_forget.modules.ContinualClassifier", "init_args": {"report": False, **model_args}},
        "data": data,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_stream_numbers_are_linked_into_the_model(tmp_path: Path) -> None:
    data = {"class_path": "tests.helpers.data.BlobStream", "init_args": {"num_tasks": 4, "dim": 5}}
    cli = main(["fit", "--config", str(_fit_config(tmp_path, data, {"hidden_sizes": [8]}))])
    model = cli.model
    assert model.num_tasks == 4 and model.num_classes == 8 and tuple(model.input_shape) == (5,)


class NoShape(BlobStream):
    """A stream whose datamodule forgot ``input_shape``."""

    def __init__(self) -> None:
        super().__init__(dim=8)
        del self.input_shape


def test_a_link_without_its_datamodule_attribute_is_an_error(tmp_path: Path) -> None:
    data = {"class_path": "tests.test_cli.NoShape"}
    config = _fit_config(tmp_path, data, {"hidden_sizes": [8]})
    with pytest.raises(ValueError, match=r"`ContinualClassifier` takes `input_shape`, which the CLI links from the "
                                         r"datamodule's `input_shape`, but `NoShape` has no attribute `input_shape`.*"
                                         r"Fix: set `self.input_shape` in `NoShape.__init__`"):
        main(["fit", "--config", str(config)])
    # Given in the config, the value needs no link.
    cli = main(["fit", "--config", str(config), "--model.input_shape", "[8]"])
    assert tuple(cli.model.input_shape) == (8,) and cli.trainer.global_step == 1


def test_an_earlier_runs_config_is_not_overwritten(tmp_path: Path) -> None:
    data = {"class_path": "tests.helpers.data.BlobStream", "init_args": {"dim": 5}}
    config = _fit_config(tmp_path, data, {"hidden_sizes": [4]})
    # fast_dev_run saves no config.yaml: one real (short) epoch does
    config_args = ["fit", "--config", str(config), "--trainer.fast_dev_run", "false", "--trainer.max_epochs", "1",
                   "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    main(config_args)
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(RuntimeError, match="config.yaml to NOT exist"):
        main([*config_args, "--model.hidden_sizes", "[6]"])
    assert (tmp_path / "config.yaml").read_text() == saved
    main([*config_args, "--model.hidden_sizes", "[6]"], save_config_kwargs={"overwrite": True})
    assert (tmp_path / "config.yaml").read_text() != saved


def test_backbone_by_class_path(tmp_path: Path) -> None:
    data = {"class_path": "tests.helpers.data.BlobStream", "init_args": {"dim": 6}}
    model_args = {"backbone": {"class_path": "torch.nn.Sequential", "init_args": {}}, "input_shape": [6]}
    cli = main(["fit", "--config", str(_fit_config(tmp_path, data, model_args))])
    # an empty Sequential is the identity: the head sits on the raw 6 features
    assert isinstance(cli.model, pl.LightningModule)
    assert cli.model.head.in_features == 6 and cli.trainer.global_step == 1
