"""The device check: every callback on one CUDA device, and the step-time ratios users ask about.

Run it whenever a GPU machine is lent (one command, under 8 minutes on one GPU); it writes
``device_check.json`` and ``device_check.md`` (a short table) into ``--out``:

    PYTHONPATH=$PWD python benchmarks/device_check.py --out runs/device_check

1. **Contract runs.** One shipped config per callback (:data:`CALLBACK_CONFIGS`), through the
   CLI with two tasks of a few batches, under each setting of :data:`SETTINGS`: one CUDA device
   with ``bf16-mixed``; Lightning's ``strategy="fsdp"`` (FSDP1) on one device; and
   ``ModelParallelStrategy`` (FSDP2; ``ContinualClassifier.configure_model`` shards the
   backbone and head) on one device. A run is ``ok`` (it trained, the weights are finite),
   ``refused`` (the callback's ``setup`` refused the strategy with its reason: expected where
   docs/sharding.md says so), ``skipped`` (with the reason) or ``error`` (the message).
2. **Step-time ratios**, measured in the same process, median seconds per training batch of the
   second task (replay active), with the peak CUDA memory of each run: AdaB²N vs BatchNorm (both
   with DER++, as the configs), refresh vs its base (ER), ER and DER++ vs fine-tuning (a ResNet
   on Split MNIST), I-LoRA vs ER-LoRA (a tiny ViT with LoRA, as ``benchmarks/ilora.py``).

Without CUDA the CUDA settings are skipped with a message, and the contract runs use the CPU at
32-bit, on one device (``cpu_32``) and under ``ModelParallelStrategy`` on one process
(``cpu_model_parallel``), and the ratios the CPU, so the script still runs end to end;
``--quick`` keeps two callbacks, ``cpu_32`` and one ratio at three batches (what
``tests/test_benchmarks.py`` runs);
``--dry-run`` trains nothing and writes the plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import StepClock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: One shipped config per callback (the callback under check is in it).
CALLBACK_CONFIGS: dict[str, str] = {
    "ExperienceReplay": "er/split_mnist.yaml",
    "DarkExperienceReplay": "derpp/split_mnist.yaml",
    "LRRewarming": "lr_rewarming/split_digits.yaml",
    "InfiniteLRSchedule": "lr_rewarming/infinite_split_digits.yaml",
    "ContinualEvaluation": "continual_eval/split_mnist_er.yaml",
    "AdaB2N": "adab2n/derpp_adab2n.yaml",
    "RefreshLearning": "refresh/er_refresh_split_mnist.yaml",
    "KFPF": "kfpf/split_mnist_kfpf.yaml",
    "FPF": "kfpf/split_mnist_er_fpf.yaml",
    "LiNeS": "lines/split_digits_task_end.yaml",
    "ILoRA": "i_lora/vit_split_mnist.yaml",
    "GSLoRA": "gs_lora/cnn_mnist_forget.yaml",
    "FineTune": "unlearning/ft_digits.yaml",
    "GradientAscent": "unlearning/ga_digits.yaml",
    "GradDiff": "unlearning/graddiff_digits.yaml",
    "RandomLabels": "unlearning/rl_digits.yaml",
    "L1Sparse": "unlearning/l1sparse_digits.yaml",
    "SCRUB": "unlearning/scrub_digits.yaml",
    "SalUn": "unlearning/salun_digits.yaml",
    # one fit each (no task stream): max_steps instead of epochs per task
    "LMGradientAscent": "unlearning_lm/ga_fqa.yaml",
    "LMGradDiff": "unlearning_lm/graddiff_fqa.yaml",
    "ESD": "erasure/esd_digits.yaml",
    "UCE": "erasure/uce_digits.yaml",
    "ConceptAblation": "erasure/ca_digits.yaml",
    "DoCo": "erasure/doco_digits.yaml",
    "SalUnDiffusion": "erasure/salun_digits.yaml",
    "SFD": "erasure/sfd_digits.yaml",
}

#: Trainer overrides per setting, and whether it needs CUDA.
SETTINGS: dict[str, tuple[bool, list[str]]] = {
    "cuda_bf16": (True, ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed"]),
    "fsdp": (True, ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
                    "--trainer.strategy", "fsdp"]),
    "model_parallel": (True, ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
                              "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
                              "--trainer.strategy.data_parallel_size", "1", "--trainer.strategy.tensor_parallel_size", "1"]),
    "cpu_32": (False, ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]),
    "cpu_model_parallel": (False, ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
                                   "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
                                   "--trainer.strategy.data_parallel_size", "1", "--trainer.strategy.tensor_parallel_size", "1"]),
}

#: Keeps a config's data small (as tests/test_configs.py does).
SMALL = {"kfpf": ["--model.init_args.resnet_width", "4", "--trainer.callbacks.init_args.finetune_steps", "2"]}

QUICK_CALLBACKS = ("ExperienceReplay", "LiNeS")


def _class_of(config: str, key: str) -> type:
    import importlib

    import yaml

    path = str((yaml.safe_load((ROOT / "configs" / config).read_text()).get(key) or {}).get("class_path", ""))
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _shards_itself(config: str) -> bool:
    """Whether the config's LightningModule overrides ``configure_model`` (ModelParallelStrategy refuses one that does not)."""
    return _class_of(config, "model").configure_model is not pl.LightningModule.configure_model


def _is_stream(config: str) -> bool:
    """Whether the config's datamodule runs a task stream in one fit (it takes ``epochs_per_task``)."""
    import inspect

    return "epochs_per_task" in inspect.signature(_class_of(config, "data")).parameters


def _contract_args(config: str, setting: str, root: str, batches: int) -> list[str]:
    # A stream: two tasks of `batches` steps; one fit (unlearning of a language model, concept erasure): 2 × `batches` steps.
    length = (["--data.init_args.epochs_per_task", "1", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", str(batches)]
              if _is_stream(config) else ["--trainer.max_steps", str(2 * batches), "--trainer.max_epochs", "-1"])
    return [
        "fit", "--config", str(ROOT / "configs" / config), *SETTINGS[setting][1],
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", root, *length,
        "--trainer.limit_val_batches", "1", "--trainer.enable_checkpointing", "false", *SMALL.get(config.split("/")[0], []),
    ]


def contract_run(name: str, setting: str, batches: int) -> dict[str, Any]:
    """One callback's config under one setting: ok / refused / error, with seconds and peak memory."""
    from lightning_forget.cli import main as cli_main

    row: dict[str, Any] = {"callback": name, "config": CALLBACK_CONFIGS[name], "setting": setting}
    if "model_parallel" in setting and not _shards_itself(CALLBACK_CONFIGS[name]):
        row.update(status="skipped", seconds=0.0, peak_mb=None,
                   message="the config's module has no configure_model (ModelParallelStrategy needs one): subclass it "
                   "with fully_shard in configure_model as docs/sharding.md shows; the sharded runs of this callback "
                   "are in tests/test_sharded_contract.py")
        return row
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    environment = dict(os.environ)  # a strategy sets MASTER_ADDR/PORT, ranks...: the next run starts clean
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as root:
            cli = cli_main(_contract_args(CALLBACK_CONFIGS[name], setting, root, batches))
            finite = all(torch.isfinite(p.detach().float()).all() for p in cli.model.parameters())
            row.update(status="ok" if finite and cli.trainer.global_step > 0 else "error",
                       message="" if finite else "non-finite weights", steps=int(cli.trainer.global_step))
    except Exception as error:  # noqa: BLE001 - every failure is a row of the report
        text = f"{type(error).__name__}: {error}"
        refused = isinstance(error, RuntimeError) and "does not support strategy=" in text
        row.update(status="refused" if refused else "error", message=text.splitlines()[0][:300])
        if not refused:
            row["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the next run's strategy starts its own
        os.environ.clear()
        os.environ.update(environment)
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None
    return row


# ------------------------------------------------------------------------------- step-time ratios
def _resnet_run(callbacks: list[Any], precision: str, batches: int, seed: int = 0, norm: bool = False) -> dict[str, Any]:
    """A ResNet (width 20) on Split MNIST; with 3 batches or fewer (``--quick``) an MLP on Split Digits,
    unless the pair needs the ResNet's BatchNorm layers (``norm``: AdaB²N converts them)."""
    from lightning_forget.datamodules import SplitDigits, SplitMNIST
    from lightning_forget.modules import ContinualClassifier

    pl.seed_everything(seed, verbose=False)
    small = batches <= 3 and not norm
    data = (SplitDigits if small else SplitMNIST)(batch_size=32, epochs_per_task=1, seed=seed)
    model = ContinualClassifier(backbone="mlp" if small else "resnet", resnet_width=20, num_classes=10,
                                input_shape=(1, 8, 8) if small else (1, 28, 28), num_tasks=5, report=False,
                                optimizer=partial(torch.optim.SGD, lr=0.03))
    return _timed_fit(model, data, callbacks, precision, batches)


def _vit_run(method: str, precision: str, batches: int, seed: int = 0) -> dict[str, Any]:
    from lightning_forget.callbacks import ExperienceReplay, ILoRA
    from lightning_forget.datamodules import SplitMNIST
    from lightning_forget.lora import LoRASettings, add_lora
    from lightning_forget.modules import ContinualClassifier
    from lightning_forget.nn import ViT

    pl.seed_everything(seed, verbose=False)
    data = SplitMNIST(batch_size=32, epochs_per_task=1, seed=seed)
    model = ContinualClassifier(
        backbone=ViT((1, 28, 28), patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
        num_classes=10, input_shape=(1, 28, 28), num_tasks=5, report=False, optimizer=partial(torch.optim.AdamW, lr=3e-3),
    )
    settings = LoRASettings(r=8, alpha=32.0, dropout=0.1, kind="all")
    if method == "i_lora":
        callbacks: list[Any] = [ILoRA(lora=settings, model_attr="backbone", ema=0.99, buffer_size=500, seed=seed,
                                      save_adapters=False)]
    else:
        model.backbone = add_lora(model.backbone, settings)
        callbacks = [ExperienceReplay(buffer_size=500, seed=seed, update="reservoir", draw="step")]
    return _timed_fit(model, data, callbacks, precision, batches)


def _timed_fit(model: Any, data: Any, callbacks: list[Any], precision: str, batches: int) -> dict[str, Any]:
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=1, precision=precision,
        max_epochs=2, reload_dataloaders_every_n_epochs=1, limit_train_batches=batches, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
        num_sanity_val_steps=0, callbacks=[clock.start, *callbacks, clock.end],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, data)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    # The second task's batches (replay active), after its first two (allocator warm-up); at least one.
    skip = min(2, batches - 1)
    return {"step_ms": 1000 * clock.median(from_epoch=1, warmup=batches + skip),
            "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None}


def _ratio_runs() -> dict[str, tuple[Callable[..., dict[str, Any]], Callable[..., dict[str, Any]]]]:
    from lightning_forget.callbacks import AdaB2N, DarkExperienceReplay, ExperienceReplay, RefreshLearning

    def resnet(make: Callable[[], list[Any]], norm: bool = False) -> Callable[..., dict[str, Any]]:
        return lambda precision, batches: _resnet_run(make(), precision, batches, norm=norm)

    finetune = resnet(list)
    return {
        "ER vs fine-tuning": (resnet(lambda: [ExperienceReplay(buffer_size=200)]), finetune),
        "DER++ vs fine-tuning": (resnet(lambda: [DarkExperienceReplay(buffer_size=200)]), finetune),
        "AdaB2N vs BatchNorm (DER++)": (resnet(lambda: [DarkExperienceReplay(buffer_size=200), AdaB2N()], norm=True),
                                        resnet(lambda: [DarkExperienceReplay(buffer_size=200)], norm=True)),
        "refresh vs ER": (resnet(lambda: [ExperienceReplay(buffer_size=200), RefreshLearning(fisher_samples=64)]),
                          resnet(lambda: [ExperienceReplay(buffer_size=200)])),
        "I-LoRA vs ER-LoRA": (partial(_vit_run, "i_lora"), partial(_vit_run, "er_lora")),
    }


def ratio_run(pair: str, precision: str, batches: int) -> dict[str, Any]:
    method, base = _ratio_runs()[pair]
    row: dict[str, Any] = {"pair": pair, "precision": precision}
    try:
        m, b = method(precision, batches), base(precision, batches)
        row.update(status="ok", method_step_ms=round(m["step_ms"], 3), base_step_ms=round(b["step_ms"], 3),
                   ratio=round(m["step_ms"] / b["step_ms"], 3) if b["step_ms"] > 0 else math.nan,
                   method_peak_mb=m["peak_mb"], base_peak_mb=b["peak_mb"])
    except Exception as error:  # noqa: BLE001
        row.update(status="error", message=f"{type(error).__name__}: {error}".splitlines()[0][:300],
                   traceback=traceback.format_exc()[-2000:])
    return row


# ----------------------------------------------------------------------------------------- main
def _table(report: dict[str, Any]) -> str:
    lines = [f"Device: {report['device']}; torch {report['torch']}, lightning {report['lightning']}.", ""]
    settings = report["settings"]
    lines += ["| callback | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    by_key = {(r["callback"], r["setting"]): r for r in report["contract"]}
    for name in report["callbacks"]:
        cells = []
        for setting in settings:
            r = by_key.get((name, setting))
            cells.append("–" if r is None else r["status"] + (f" ({r['peak_mb']} MB)" if r.get("peak_mb") and r["status"] == "ok" else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| pair | precision | method ms/step | base ms/step | ratio | method peak MB | base peak MB |",
              "|---|---|---|---|---|---|---|"]
    for r in report["ratios"]:
        if r["status"] == "ok":
            lines.append(f"| {r['pair']} | {r['precision']} | {r['method_step_ms']} | {r['base_step_ms']} | {r['ratio']} "
                         f"| {r['method_peak_mb']} | {r['base_peak_mb']} |")
        else:
            lines.append(f"| {r['pair']} | {r['precision']} | {r['status']}: {r.get('message', '')} | | | | |")
    lines += [""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/device_check", help="folder for device_check.json and device_check.md")
    parser.add_argument("--quick", action="store_true", help=f"callbacks {QUICK_CALLBACKS}, one ratio, 3 batches")
    parser.add_argument("--dry-run", action="store_true", help="train nothing: write the plan")
    parser.add_argument("--batches", type=int, default=None, help="training batches per task (default 12; quick 3)")
    parser.add_argument("--callbacks", default=None, help=f"comma-separated subset of {sorted(CALLBACK_CONFIGS)}")
    parser.add_argument("--settings", default=None, help=f"comma-separated subset of {sorted(SETTINGS)} (default: the "
                        "device's: the CUDA ones on a GPU, the CPU ones otherwise)")
    args = parser.parse_args(argv)
    import lightning

    cuda = torch.cuda.is_available()
    batches = args.batches or (3 if args.quick else 12)
    names = list(QUICK_CALLBACKS) if args.quick else list(CALLBACK_CONFIGS)
    if args.callbacks:
        names = [n.strip() for n in args.callbacks.split(",") if n.strip()]
        unknown = sorted(set(names) - set(CALLBACK_CONFIGS))
        if unknown:
            parser.error(f"--callbacks: unknown {unknown}; choose from {sorted(CALLBACK_CONFIGS)}")
    pairs = ["ER vs fine-tuning"] if args.quick else list(_ratio_runs())
    notes: list[str] = []
    settings = [s for s, (needs_cuda, _) in SETTINGS.items() if needs_cuda == cuda]
    if args.quick and not cuda:
        settings = ["cpu_32"]
    if args.settings:
        settings = [n.strip() for n in args.settings.split(",") if n.strip()]
        bad = [n for n in settings if n not in SETTINGS or (SETTINGS[n][0] and not cuda)]
        if bad:
            parser.error(f"--settings: {bad} unknown or needing CUDA (none here); choose from "
                         f"{[n for n, (c, _) in SETTINGS.items() if cuda or not c]}")
    if not cuda:
        skipped = [s for s, (needs_cuda, _) in SETTINGS.items() if needs_cuda]
        notes.append(f"skipped {skipped}: no CUDA device here (they need accelerator='gpu'); ran {settings} instead. "
                     "Run this script on a GPU machine for the device figures.")
    precision = "bf16-mixed" if cuda else "32-true"
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
        "lightning": lightning.__version__, "settings": settings, "callbacks": names, "batches": batches,
        "contract": [], "ratios": [], "notes": notes, "dry_run": bool(args.dry_run),
    }
    start = time.perf_counter()
    if args.dry_run:
        report["contract"] = [{"callback": n, "config": CALLBACK_CONFIGS[n], "setting": s, "status": "planned"}
                              for n in names for s in settings]
        report["ratios"] = [{"pair": p, "precision": precision, "status": "planned"} for p in pairs]
        notes.append("dry run: nothing was trained.")
    else:
        for name in names:
            for setting in settings:
                report["contract"].append(contract_run(name, setting, batches))
        for pair in pairs:
            report["ratios"].append(ratio_run(pair, precision, batches))
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(report, indent=1))
    table = _table(report)
    (out / "device_check.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten to {out / 'device_check.json'} and {out / 'device_check.md'} ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
