"""Throughput of the LM unlearning evaluation: samples per second of the full metric suite.

Compares, on the same model and data (``FictitiousQADataModule``, a tiny GPT-2 built from a config):

- ``batched``: :func:`~lightning_forget.unlearning.lm_eval.evaluate_lm_unlearning` with
  ``--batch-size`` rows per forward and per generation batch, one process;
- ``per_sample``: the same function with batch size 1 (a per-sample loop, as open-unlearning runs
  its GradNorm attack and as a naive evaluation does everything), one process;
- ``batched_2proc``: the batched evaluation on 2 processes (``torch.distributed`` gloo, each rank
  its ``DistributedSampler`` share, one gather, de-duplication), launched as two subprocesses.

The full suite is every metric: answer/paraphrase/perturbed probabilities (Truth Ratio,
normalised probability), exact memorisation, extraction strength, Min-K, Min-K++, ZLib, LOSS,
GradNorm, the reference attack (the retain model as reference) and ROUGE-L of greedy generations.
A "sample" is one QA record of any split. Every process uses one torch thread, so 2 processes
use the machine's 2 cores. The model is untrained, so each generation runs the full
``--max-new-tokens`` (the worst case). The 2-process metrics are checked against the
1-process ones (the largest difference is printed).

    PYTHONPATH=$PWD python benchmarks/unlearning_lm_eval.py            # the figures of docs/results.md
    PYTHONPATH=$PWD python benchmarks/unlearning_lm_eval.py --quick    # seconds, 1 process (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

HERE = Path(__file__).resolve()


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    from lightning_forget.datamodules import FictitiousQADataModule
    from lightning_forget.modules.causal_lm import build_tiny_causal_lm

    dm = FictitiousQADataModule(num_people=args.num_people, questions_per_person=args.questions, num_countries=args.countries,
                                num_perturbed=args.perturbed, forget_percent=args.forget_percent, seed=args.seed)
    context = dm.block_size + args.max_new_tokens
    torch.manual_seed(args.seed)
    model = build_tiny_causal_lm("gpt2", 257, context, args.layers, args.width, 4).eval()
    torch.manual_seed(args.seed + 1)
    reference = build_tiny_causal_lm("gpt2", 257, context, args.layers, args.width, 4).eval()
    splits = {s: dm.dataset(s) for s in ("forget", "retain", "holdout", "world_facts") if dm.records(s)}
    return dm, model, reference, splits


def _evaluate(args: argparse.Namespace, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[float, dict[str, Any]]:
    from lightning_forget.unlearning.lm_eval import evaluate_lm_unlearning

    dm, model, reference, splits = _setup(args)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    start = time.perf_counter()
    result = evaluate_lm_unlearning(model, splits, dm.tokenizer, reference_model=reference, batch_size=batch_size,
                                    max_new_tokens=args.max_new_tokens, progress=False, rank=rank, world_size=world_size)
    return time.perf_counter() - start, result


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank, world_size=2)
    seconds, result = _evaluate(args, args.batch_size, args.rank, 2)
    if args.rank == 0:
        Path(args.result_file).write_text(json.dumps({"seconds": seconds, "metrics": result["metrics"]}))
    dist.destroy_process_group()


def _two_processes(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "pg"), os.path.join(tmp, "result.json")
        path = os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # this checkout's library
        procs = [subprocess.Popen([sys.executable, str(HERE), *argv, "--_rank", str(r), "--_init-file", init,
                                   "--_result-file", out], env=env) for r in range(2)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"a 2-process worker failed (exit codes {codes})")
        return json.loads(Path(out).read_text())


def _max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    diffs = [abs(float(a[k]) - float(b[k])) for k in a if isinstance(a[k], float) and isinstance(b.get(k), float)]
    return max(diffs) if diffs else 0.0


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data and model, short generations (the test)")
    parser.add_argument("--num-people", type=int, default=20)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--countries", type=int, default=5)
    parser.add_argument("--perturbed", type=int, default=5)
    parser.add_argument("--forget-percent", type=float, default=10.0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, choices=(1, 2), default=None,
                        help="also measure 2 processes (default: 2; 1 with --quick, where starting two interpreters "
                             "would take most of the test's time)")
    parser.add_argument("--out", default=None, help="write the summary JSON here")
    parser.add_argument("--_rank", type=int, default=None, dest="rank", help=argparse.SUPPRESS)
    parser.add_argument("--_init-file", default=None, dest="init_file", help=argparse.SUPPRESS)
    parser.add_argument("--_result-file", default=None, dest="result_file", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_people, args.questions, args.countries, args.perturbed = 4, 2, 1, 2
        args.forget_percent, args.layers, args.width, args.max_new_tokens, args.batch_size = 25.0, 1, 16, 4, 4
    processes = args.processes or (1 if args.quick else 2)
    torch.set_num_threads(1)
    if args.rank is not None:
        _worker(args)
        return {}
    worker_argv = [a for a in argv if a not in ("--quick",)] + (["--num-people", "4", "--questions", "2", "--countries", "1",
                                                          "--perturbed", "2", "--forget-percent", "25", "--layers", "1",
                                                          "--width", "16", "--max-new-tokens", "4", "--batch-size", "4"]
                                                         if args.quick else [])
    dm, _, _, splits = _setup(args)
    samples = sum(len(s) for s in splits.values())
    batched_s, batched = _evaluate(args, args.batch_size)
    single_s, single = _evaluate(args, 1)
    two = _two_processes(args, worker_argv) if processes == 2 else None
    summary = {
        "samples": samples, "splits": {k: len(v) for k, v in splits.items()}, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "model": f"gpt2 {args.layers}x{args.width}",
        "seconds": {"batched": batched_s, "per_sample": single_s},
        "max_metric_difference": {"per_sample_vs_batched": _max_difference(single["metrics"], batched["metrics"])},
    }
    if two is not None:
        summary["seconds"]["batched_2proc"] = two["seconds"]
        summary["max_metric_difference"]["2proc_vs_1proc"] = _max_difference(two["metrics"], batched["metrics"])
    rates = summary["samples_per_second"] = {k: samples / v for k, v in summary["seconds"].items()}
    summary["ratios"] = {"batched / per_sample": rates["batched"] / rates["per_sample"]}
    if two is not None:
        summary["ratios"]["batched_2proc / batched"] = rates["batched_2proc"] / rates["batched"]
        summary["ratios"]["batched_2proc / per_sample"] = rates["batched_2proc"] / rates["per_sample"]
    print(f"{samples} samples ({summary['splits']}), {summary['model']}, batch {args.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, 1 torch thread per process")
    for name in rates:
        print(f"  {name:14s} {summary['seconds'][name]:8.2f} s  {rates[name]:8.2f} samples/s")
    for name, value in summary["ratios"].items():
        print(f"  {name:28s} {value:6.2f}x")
    print("  largest metric difference: " + ", ".join(f"{k} {v:.2e}" for k, v in summary["max_metric_difference"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
