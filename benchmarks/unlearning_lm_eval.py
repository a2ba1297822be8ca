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

On a shared machine one run's wall time says little (other processes take the cores), so the
three ways are measured ``--repeats`` times **interleaved** (repeat ``i`` runs them in a rotated
order, so a burst of load falls on different ways), and the summary reports the median and the
range of each rate and of each ratio taken within one repeat (the 2-process run beside the
1-process run of the same repeat). Beside the wall time it reports the **CPU time per sample**
(``time.process_time`` of the evaluation; the sum over both ranks for 2 processes): the work
done, which the load does not change much, so it shows whether 2 processes add work (the
gather, the padding repeats, two interpreters' overheads) apart from the cores they can get.

    PYTHONPATH=$PWD python benchmarks/unlearning_lm_eval.py            # the figures of docs/results.md
    PYTHONPATH=$PWD python benchmarks/unlearning_lm_eval.py --quick    # seconds, 1 process (the test)
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


def _evaluate(args: argparse.Namespace, batch_size: int, rank: int = 0,
              world_size: int = 1) -> tuple[float, float, dict[str, Any]]:
    """Wall seconds, CPU seconds (this process) and the result of one evaluation."""
    from lightning_forget.unlearning.lm_eval import evaluate_lm_unlearning

    dm, model, reference, splits = _setup(args)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    result = evaluate_lm_unlearning(model, splits, dm.tokenizer, reference_model=reference, batch_size=batch_size,
                                    max_new_tokens=args.max_new_tokens, progress=False, rank=rank, world_size=world_size)
    return time.perf_counter() - start, time.process_time() - cpu, result


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank, world_size=2)
    seconds, cpu, result = _evaluate(args, args.batch_size, args.rank, 2)
    out = {"seconds": seconds, "cpu_seconds": cpu}
    if args.rank == 0:
        out["metrics"] = result["metrics"]
    Path(f"{args.result_file}.{args.rank}").write_text(json.dumps(out))
    dist.destroy_process_group()


def _two_processes(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Wall seconds (rank 0's), CPU seconds (both ranks' sum) and rank 0's metrics of a 2-process evaluation."""
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "pg"), os.path.join(tmp, "result.json")
        path = os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # this checkout's library
        procs = [subprocess.Popen([sys.executable, str(HERE), *argv, "--_rank", str(r), "--_init-file", init,
                                   "--_result-file", out], env=env) for r in range(2)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"a 2-process worker failed (exit codes {codes})")
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
        return {"seconds": ranks[0]["seconds"], "cpu_seconds": sum(r["cpu_seconds"] for r in ranks),
                "metrics": ranks[0]["metrics"]}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


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
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved repeats of every way (median and range reported; --quick: 1)")
    parser.add_argument("--out", default=None, help="write the summary JSON here")
    parser.add_argument("--_rank", type=int, default=None, dest="rank", help=argparse.SUPPRESS)
    parser.add_argument("--_init-file", default=None, dest="init_file", help=argparse.SUPPRESS)
    parser.add_argument("--_result-file", default=None, dest="result_file", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_people, args.questions, args.countries, args.perturbed = 4, 2, 1, 2
        args.forget_percent, args.layers, args.width, args.max_new_tokens, args.batch_size = 25.0, 1, 16, 4, 4
        args.repeats = 1
    processes = args.processes or (1 if args.quick else 2)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
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
    ways = ["batched", "per_sample"] + (["batched_2proc"] if processes == 2 else [])
    runs: list[dict[str, Any]] = []
    first: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        run: dict[str, Any] = {"load_average": os.getloadavg()[0]}
        for way in ways[repeat % len(ways):] + ways[: repeat % len(ways)]:  # rotated: interleaved repeats
            if way == "batched_2proc":
                two = _two_processes(args, worker_argv)
                seconds, cpu, metrics = two["seconds"], two["cpu_seconds"], two["metrics"]
            else:
                seconds, cpu, result = _evaluate(args, args.batch_size if way == "batched" else 1)
                metrics = result["metrics"]
            run[way] = {"seconds": seconds, "cpu_seconds": cpu, "samples_per_second": samples / seconds,
                        "cpu_ms_per_sample": 1000 * cpu / samples}
            first.setdefault(way, metrics)
        run["ratios"] = {"batched / per_sample": run["batched"]["samples_per_second"] / run["per_sample"]["samples_per_second"]}
        if processes == 2:
            run["ratios"]["batched_2proc / batched"] = (run["batched_2proc"]["samples_per_second"]
                                                        / run["batched"]["samples_per_second"])
        runs.append(run)
    summary: dict[str, Any] = {
        "samples": samples, "splits": {k: len(v) for k, v in splits.items()}, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "model": f"gpt2 {args.layers}x{args.width}", "repeats": args.repeats,
        "runs": runs,
        "samples_per_second": {w: statistics.median(r[w]["samples_per_second"] for r in runs) for w in ways},
        "rates": {w: _spread([r[w]["samples_per_second"] for r in runs]) for w in ways},
        "cpu_ms_per_sample": {w: _spread([r[w]["cpu_ms_per_sample"] for r in runs]) for w in ways},
        "ratios": {k: _spread([r["ratios"][k] for r in runs]) for k in runs[0]["ratios"]},
        "load_average": _spread([r["load_average"] for r in runs]),
        "max_metric_difference": {"per_sample_vs_batched": _max_difference(first["per_sample"], first["batched"])},
    }
    if processes == 2:
        summary["max_metric_difference"]["2proc_vs_1proc"] = _max_difference(first["batched_2proc"], first["batched"])
    print(f"{samples} samples ({summary['splits']}), {summary['model']}, batch {args.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, 1 torch thread per process, {args.repeats} interleaved repeat(s), "
          f"load average {summary['load_average']['min']:.1f}-{summary['load_average']['max']:.1f}")
    for way in ways:
        rate, cpu = summary["rates"][way], summary["cpu_ms_per_sample"][way]
        print(f"  {way:14s} {rate['median']:8.2f} samples/s (range {rate['min']:.2f}-{rate['max']:.2f}), "
              f"CPU {cpu['median']:7.1f} ms/sample (range {cpu['min']:.1f}-{cpu['max']:.1f})")
    for name, value in summary["ratios"].items():
        print(f"  {name:28s} median {value['median']:5.2f}x (range {value['min']:.2f}-{value['max']:.2f})")
    print("  largest metric difference: " + ", ".join(f"{k} {v:.2e}" for k, v in summary["max_metric_difference"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
