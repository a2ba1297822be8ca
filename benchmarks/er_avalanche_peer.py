"""The real peer for ``benchmarks/er_policy.py --stream online``: Avalanche's ``ReplayPlugin``.

Run by ``er_policy.py`` with the Python of an environment where Avalanche is installed
(``--peer-python /path/to/python``), never imported by the library. It reads the stream that
``er_policy.py`` wrote (each task's training and validation tensors, the initial weights of every
seed, the hyper-parameters), trains Avalanche's ``Naive`` strategy with
``ReplayPlugin(mem_size=buffer)`` (its defaults: an ``ExperienceBalancedBuffer`` filled at each
experience's end, a memory minibatch of the training minibatch size joined to every stream
minibatch) one experience per task, one epoch each, and writes the accuracy of every task after
the last one, per seed, as JSON. A small plugin counts the optimizer steps and the rows of each
minibatch, so the two sides can be compared mechanism by mechanism.

Only ``torch`` is imported at module level: ``er_policy.py`` imports :func:`conv_bn_net` from here,
so both sides build the identical network.

    /path/to/avalanche-env/bin/python benchmarks/er_avalanche_peer.py STREAM.pt RESULT.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch import nn


def conv_bn_net(num_classes: int = 10) -> nn.Module:
    """Three conv blocks (16, 32, 64 channels; 3x3 conv, BatchNorm, ReLU, 2x2 max-pool) and a linear head."""
    blocks: list[nn.Module] = []
    channels = [1, 16, 32, 64]
    for c_in, c_out in zip(channels, channels[1:]):
        blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(64 * 3 * 3, num_classes))


@torch.no_grad()
def task_accuracies(net: nn.Module, val: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Accuracy on every task's validation set, in eval mode (BatchNorm running statistics)."""
    net.eval()
    out = []
    for x, y in val:
        out.append(float((net(x).argmax(1) == y).float().mean()))
    net.train()
    return out


def main(argv: list[str]) -> None:
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin, SupervisedPlugin
    from avalanche.training.supervised import Naive

    class Count(SupervisedPlugin):
        """Optimizer steps and rows per minibatch of every experience."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[list[int]] = []

        def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            self.rows.append([])

        def before_forward(self, strategy: Any, **kwargs: Any) -> None:
            self.rows[-1].append(int(strategy.mb_x.shape[0]))

    stream_path, result_path = argv
    stream = torch.load(stream_path)
    hp = stream["hparams"]
    torch.set_num_threads(int(hp["threads"]))
    train = [_make_taskaware_tensor_classification_dataset(x, y, targets=y.tolist(), task_labels=0) for x, y in stream["train"]]
    bench = benchmark_from_datasets(train=train)
    results = {}
    for seed, init in zip(stream["seeds"], stream["init"]):
        torch.manual_seed(seed)
        net = conv_bn_net()
        net.load_state_dict(init)
        count = Count()
        replay = ReplayPlugin(mem_size=int(hp["buffer"]))
        strategy = Naive(
            model=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=float(hp["lr"])),
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=int(hp["batch"]),
            train_epochs=int(hp["epochs"]),
            device="cpu",
            plugins=[replay, count],
            evaluator=EvaluationPlugin(),
        )
        for experience in bench.train_stream:
            strategy.train(experience, num_workers=0)
        stored = [int(t) for t in replay.storage_policy.buffer.targets]
        results[str(seed)] = {
            "accuracy": task_accuracies(net, stream["val"]),
            "steps": [len(r) for r in count.rows],
            "rows": count.rows,
            "buffer_labels": stored,
        }
    with open(result_path, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1:])
