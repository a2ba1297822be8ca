"""Callbacks under ``ModelParallelStrategy`` (FSDP2, 2 CPU processes, gloo) with a user's module
that shards its layers in ``configure_model``, one fit per task.

One 2-process launch (``tests/helpers/sharded_run.py``) runs each group of callbacks together
and serves every check:

- the sharded run ends with the parameters (full tensors) and callback state of the same run
  under DDP, and, for the callbacks whose work does not depend on the rank, of one process at the
  same global batch;
- each callback's state survives ``load_state_dict(state_dict())``, and a crash in the middle of
  task 1 resumed from Lightning's sharded checkpoint (a folder of ``.distcp`` shards) ends where
  the uninterrupted sharded run ends;
- the sharded checkpoint loads into a single-process module
  (:func:`lightning_forget.export.load_sharded_checkpoint`) with the sharded run's weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch

from tests.helpers.sharded_run import (ERASURE_B_GROUP, ERASURE_GROUP, ERASURE_LORA_GROUP, FIRST_GROUP, PER_RANK, SFD_GROUP,
                                       UNLEARNING_GROUP, _is_erasure)

GROUPS = {
    "replay": FIRST_GROUP,
    "logits": ["DarkExperienceReplay", "InfiniteLRSchedule", "LiNeS"],
    "gradients": ["RefreshLearning", "KFPF", "FPF"],
    "buffers": ["AdaB2N"],
    # SCRUB with a saliency mask and gradient surgery: the reference model, the mask and the surgery
    # every unlearning method shares; the two evaluations with unequal batch counts per rank.
    "unlearning": UNLEARNING_GROUP,
    # LoRA: ILoRA on a user's GPT-2 (token batches), GSLoRA on the user's linears (two-stream batches):
    # two launches of one module each, as the two methods take different batches.
    "lora_ilora": ["ILoRA"],
    "lora_gslora": ["GSLoRA"],
    # GS-LoRA++ on a user's GPT-2 classifier: LoRA on its c_attn/c_fc (transformers' Conv1D, weight (in, out))
    "lora_gslora_conv1d": ["GSLoRAConv1D"],
    # ESD and UCE on a user's diffusion module sharding its UNet blocks (its concept table frozen, not sharded)
    "erasure": ERASURE_GROUP,
    # LiNeS' α sweep scored by validation forwards (every rank runs them) and its task-end edit, in one run
    "lines": ["LiNeSSweep", "LiNeSTaskEnd"],
    # ESD with LoRA (rank 2) on the cross-attention of the same sharded diffusion module
    "erasure_lora": ERASURE_LORA_GROUP,
    # DoCo (discriminator replicated, gradient surgery over all shards) and SalUnDiffusion (saliency mask: a global
    # top-k over all shards, held as local shards) together on that module
    "erasure_b": ERASURE_B_GROUP,
    # SFD on the same module, alone (its parameter set and loss term would clash with ESD's in one trainer)
    "sfd": SFD_GROUP,
}
ROWS = [(group, name) for group, names in GROUPS.items() for name in names]
TOL = 1e-5
#: SFD's fake Adam (β₁ = 0) state is its last raw gradient, whose nearly cancelling terms (the fake starts as the
#: teacher) round differently through FSDP2's reduce-scatter and the sharded step's separate input VJPs than through
#: DDP's one backward, and Adam's normalised steps carry that rounding on: a few entries differ by ~1e-5.
STATE_TOL = {"SFD": 1e-4}


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("sharded")
    spec = ";".join(",".join(names) for names in GROUPS.values())
    subprocess.run([sys.executable, "-m", "tests.helpers.sharded_run", str(root), spec],
                   check=True, timeout=600, capture_output=True)
    return {group: json.loads((root / str(i) / "result.json").read_text()) for i, group in enumerate(GROUPS)}


def _params(run: dict[str, Any]) -> torch.Tensor:
    return torch.tensor([x for name in sorted(run["params"]) for x in run["params"][name]], dtype=torch.float64)


def _numbers(value: Any) -> torch.Tensor:
    out: list[float] = []

    def visit(item: Any) -> None:
        if isinstance(item, dict):
            for key in sorted(item):
                visit(item[key])
        elif isinstance(item, list):
            for x in item:
                visit(x)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            out.append(float(item))

    visit(value)
    return torch.tensor(out, dtype=torch.float64)


def _close(a: Any, b: Any, tol: float = TOL) -> bool:
    x, y = _numbers(a), _numbers(b)
    return x.shape == y.shape and bool(torch.allclose(x, y, atol=tol, rtol=tol, equal_nan=True))


@pytest.mark.parametrize(("group", "name"), ROWS, ids=[name for _, name in ROWS])
def test_sharded_run_equals_ddp_and_one_process(launches, group, name) -> None:
    result = launches[group]
    sharded = result["sharded"]
    unsharded = ["Parameter"] if _is_erasure(GROUPS[group]) else []  # the diffusion module's frozen concept table
    assert sharded["param_types"] == ["DTensor", *unsharded], "the module's parameters were not sharded"
    assert torch.allclose(_params(sharded), _params(result["ddp"]), atol=TOL, rtol=TOL)
    assert _close(sharded["states"][name], result["ddp"]["states"][name], STATE_TOL.get(name, TOL))
    # Per-rank draws (replay, k-FPF's gathered buffer, BatchNorm statistics, the diffusion module's own
    # loss), as under DDP: no one-process comparison.
    if name not in PER_RANK and not _is_erasure(GROUPS[group]):
        alone = result["sharded_alone"]
        assert torch.allclose(_params(alone), _params(result["single"]), atol=TOL, rtol=TOL)
        assert _close(alone["states"][name], result["single"]["states"][name])


@pytest.mark.parametrize(("group", "name"), ROWS, ids=[name for _, name in ROWS])
def test_sharded_checkpoint_round_trips_and_resumes_mid_epoch(launches, group, name) -> None:
    result = launches[group]
    sharded, resumed = result["sharded"], result["resumed"]
    assert sharded["roundtrip"][name] == sharded["states"][name]
    assert resumed["crashed_first"]
    assert torch.allclose(_params(resumed), _params(sharded), atol=TOL, rtol=TOL)
    assert _close(resumed["states"][name], sharded["states"][name])


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_sharded_checkpoint_loads_into_one_process(launches, group) -> None:
    export = launches[group]["export"]
    assert export["is_dir"]  # Lightning wrote a distributed checkpoint folder, not a file
    assert torch.allclose(_params(export), _params(launches[group]["sharded"]), atol=0, rtol=0)
    # export_plain_checkpoint(checkpoint_path=<the folder>) writes a file a plain module loads strictly
    plain = {"params": export["plain_checkpoint_params"]}
    # (the plain model: a method's own parameters, such as AdaB2N's task weights, are not in it; LoRA is merged away)
    if set(plain["params"]) <= set(export["params"]):
        assert torch.allclose(_params(plain), _params({"params": {n: export["params"][n] for n in plain["params"]}}), atol=0, rtol=0)
    assert export["plain_outputs"] < 1e-5  # the plain module computes what the exported one does
    classes = launches[group]["sharded"]["classes"]  # a group's name -> the callback's class
    for name in GROUPS[group]:
        assert any(key.startswith(classes[name]) for key in export["callbacks"]), (name, export["callbacks"])


def test_library_classifier_shards_itself_and_equals_ddp(launches) -> None:
    runs = launches["replay"]["classifier"]
    assert runs["sharded"]["sharded"] and not runs["ddp"]["sharded"]
    assert torch.allclose(_params(runs["sharded"]), _params(runs["ddp"]), atol=TOL, rtol=TOL)


def test_lines_keeps_theta0_as_shards_and_writes_full_files(launches) -> None:
    result = launches["logits"]
    sharded, ddp = result["sharded"], result["ddp"]
    local, total = sharded["lines_theta0_numel"]
    assert local < total and ddp["lines_theta0_numel"] == [total, total]  # rank 0's shards, not a full copy
    files = sharded["lines_files"]
    # The files hold full tensors: the scaled one the final (full) parameters, both equal DDP's.
    assert torch.allclose(_params({"params": files["scaled"]}), _params(sharded), atol=0, rtol=0)
    for kind in ("scaled", "unscaled"):
        assert _close(files[kind], ddp["lines_files"][kind])


def test_lines_sweep_scores_equal_ddp_and_one_process(launches) -> None:
    """Each α of the sweep is written shard-wise, scored by validation forwards every rank runs, and
    restored: the scores (task 0's accuracy at the last fit's end) are DDP's and one process's."""
    result = launches["lines"]
    sweeps = [result[run]["lines_sweeps"]["LiNeSSweep"] for run in ("sharded", "ddp", "single", "resumed")]
    assert all(sweep == sweeps[0] for sweep in sweeps[1:])
    scores = dict(sweeps[0])
    assert len(set(scores.values())) > 1  # the α's score apart: the choice is not the grid's first by a tie
    assert result["sharded"]["states"]["LiNeSSweep"]["method"]["applied_alpha"] == max(scores, key=scores.get) != 1.0


def test_refresh_keeps_its_fisher_as_shards(launches) -> None:
    sharded, ddp = launches["gradients"]["sharded"], launches["gradients"]["ddp"]
    local, total = sharded["refresh_fisher_numel"]
    assert 0 < local < total and ddp["refresh_fisher_numel"] == [total, total]  # rank 0's shards, not a full copy


def test_unlearning_reference_and_mask_are_held_as_shards(launches) -> None:
    result = launches["unlearning"]
    sharded, ddp = result["sharded"], result["ddp"]
    for kind in ("reference", "mask"):
        local, total = sharded["unlearning_numel"][kind]
        assert local < total and ddp["unlearning_numel"][kind] == [total, total]  # rank 0's shards, not a full copy
    # The surgery's per-tensor cosines are over the whole tensors (all shards), as under DDP. (Not compared
    # with one process: at a task's first step the teacher is the student, SCRUB's forget gradient is
    # rounding noise, and its cosines are too; the final weights equal one process's all the same.)
    cosines = torch.tensor(sharded["unlearning_numel"]["surgery_cosines"])  # step × parameter tensor
    assert cosines.shape == (4, 4) and bool((cosines < 0).any())  # some tensors conflicted: the surgery acted
    assert torch.allclose(cosines, torch.tensor(ddp["unlearning_numel"]["surgery_cosines"]), atol=TOL)


def test_unlearning_lm_method_and_evaluation_on_a_sharded_causal_lm_equal_ddp(launches) -> None:
    """NPO and LMUnlearningEvaluation (GradNorm included) on a tiny GPT-2 sharded per block: the reference's
    forwards through the LM path, equal forwards, backwards and decoding steps on every rank."""
    runs = launches["unlearning"]["lm"]
    sharded, ddp = runs["sharded"], runs["ddp"]
    assert sharded["param_types"] == ["DTensor"] and sharded["steps"] == ddp["steps"] > 1
    assert torch.allclose(_params(sharded), _params(ddp), atol=TOL, rtol=TOL)
    assert _close(sharded["state"], ddp["state"])
    # LMUnlearningEvaluation (before and after, greedy generation included) gives DDP's rows.
    rows = sharded["evaluation"]["method"]["rows"]
    assert len(rows) == 2 and _close(rows, ddp["evaluation"]["method"]["rows"])
    # GradNorm, its per-sample backwards taken in turns by the ranks (3 forget and 3 holdout rows: shares of
    # 2 and 1), gives DDP's per-sample scores before and after the fit.
    assert [[len(g[s]) for s in ("forget", "holdout")] for g in sharded["gradnorms"]] == [[3, 3], [3, 3]]
    assert _close(sharded["gradnorms"], ddp["gradnorms"]) and sharded["gradnorms"][0] != sharded["gradnorms"][1]
    local, total = sharded["reference_numel"]
    assert local < total and ddp["reference_numel"] == [total, total]


def test_lora_state_is_kept_as_shards_and_adapter_files_are_whole(launches) -> None:
    """ILoRA's slow learner and GSLoRA's kept ΔW are rank 0's shards (a full copy under DDP); ILoRA's
    adapter files hold full tensors equal to DDP's, the slow one the state's slow learner."""
    for group, key in (("lora_ilora", "ilora_slow_numel"), ("lora_gslora", "gslora_delta_numel")):
        sharded, ddp = launches[group]["sharded"], launches[group]["ddp"]
        local, total = sharded[key]
        assert 0 < local < total and ddp[key] == [total, total], (group, sharded[key], ddp[key])
    sharded, ddp = launches["lora_ilora"]["sharded"], launches["lora_ilora"]["ddp"]
    # PEFT's names survive fully_shard: the same adapter-neutral keys as under DDP.
    slow = sharded["states"]["ILoRA"]["method"]["slow"]
    assert sorted(slow) == sorted(ddp["states"]["ILoRA"]["method"]["slow"]) and any(".lora_B." in k for k in slow)
    for kind in ("fast", "slow"):
        assert _close(sharded["ilora_files"][kind], ddp["ilora_files"][kind])
    assert _close(sharded["ilora_files"]["slow"], sharded["states"]["ILoRA"]["method"]["slow"])


def test_sharded_ilora_config_runs_on_two_processes(launches) -> None:
    """configs/i_lora/vit_split_mnist_sharded.yaml through the CLI (tests/test_configs.py parses it)."""
    run = launches["lora_ilora"]["config_run"]
    assert run["world_size"] == 2 and run["sharded"] and run["finite"]
    assert run["global_step"] == 4 and run["ended"] and all(e == 1 for e in run["ended"])  # both tasks ended


def test_esd_keeps_its_teacher_as_local_shards(launches) -> None:
    result = launches["erasure"]
    local, total = result["sharded"]["esd_teacher_numel"]
    table = result["sharded"]["esd_table_numel"]  # the frozen concept table is not sharded: each rank holds it
    assert local - table <= (total - table) // 2 + 64 and result["ddp"]["esd_teacher_numel"] == [total, total]
    # the teacher differs from the final weights (ESD trained after taking it) and equals DDP's, gathered
    assert not _close(result["sharded"]["states"]["ESD"]["method"]["teacher"], result["sharded"]["params"])


def test_salun_mask_is_held_as_shards_and_doco_surgery_takes_cosines_over_all_shards(launches) -> None:
    """SalUnDiffusion's mask is rank 0's shards (a full copy under DDP), the gathered one equal to DDP's (through the
    state compared above); DoCo's last surgery's per-tensor cosines are over the whole tensors, as under DDP, and its
    replicated discriminator is the same on every rank (its gradient averaged over the ranks: each sees its own
    batch, so the state comparison of rank 0 alone would not see a missing average)."""
    sharded, ddp = launches["erasure_b"]["sharded"], launches["erasure_b"]["ddp"]
    local, total = sharded["salun_mask_numel"]
    assert 0 < local < total and ddp["salun_mask_numel"] == [total, total]
    masks = sharded["states"]["SalUnDiffusion"]["method"]["mask"]["masks"]
    assert sum(sum(m) for m in masks.values()) == round(0.5 * total)  # the global top half, gathered whole
    cosines = torch.tensor(sharded["doco_cosines"])
    assert bool((cosines < 0).any())  # some tensors conflicted: the surgery acted
    assert torch.allclose(cosines, torch.tensor(ddp["doco_cosines"]), atol=TOL)
    for run in (sharded, launches["erasure_b"]["resumed"], ddp):
        assert run["doco_discriminator_spread"] == 0.0


def test_gslora_merges_conv1d_lora_shard_wise(launches) -> None:
    """GS-LoRA on GPT-2's Conv1D layers (PEFT's fan_in_fan_out; FSDP2 shards the weight's input dim): each
    task's merged ΔW is nonzero, kept as rank 0's block (a full copy under DDP), and equals DDP's; the rest
    (final weights, whole kept ΔW, resume, export) is the group's rows of the contract tests above."""
    sharded, ddp = launches["lora_gslora_conv1d"]["sharded"], launches["lora_gslora_conv1d"]["ddp"]
    layers = sharded["conv1d_layers"]
    assert len(layers) == 4 and all(kind == ["Conv1D", True] for kind in layers.values())
    local, total = sharded["gslora_delta_numel"]
    assert 0 < local < total and ddp["gslora_delta_numel"] == [total, total]
    norms = sharded["conv1d_delta_norms"]
    assert len(norms) == 2 and min(norms) > 1e-3 and _close(norms, ddp["conv1d_delta_norms"])


def test_ilora_full_state_dict_checkpoint_equals_ddp_resumes_and_exports(launches) -> None:
    """ILoRA under ModelParallelStrategy(save_distributed_checkpoint=False): the checkpoint is one file whose
    weights (the slow learner in the adapter, gathered on every rank for rank 0's full state dict) and ILoRA
    state equal DDP's file of the same step; a crash resumed from that file ends where DDP ends; the file
    exports to a plain GPT-2 computing what the PEFT module loaded from it computes."""
    run = launches["lora_ilora"]["full_state"]
    assert run["is_file"] and run["crashed_first"]
    sharded, ddp = run["files"]["sharded"], run["files"]["ddp"]
    assert sorted(sharded["state_dict"]) == sorted(ddp["state_dict"])
    assert _close(sharded["state_dict"], ddp["state_dict"]) and _close(sharded["ilora"], ddp["ilora"])
    slow = sharded["ilora"]["method"]["slow"]
    fast = sharded["ilora"]["method"]["fast"]
    assert not _close(slow, fast)  # the learners differ: the weights below hold the slow one
    for key, value in slow.items():
        weight = "model." + key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        assert _close(sharded["state_dict"][weight], value), key
    assert run["resumed"]["param_types"] == ["DTensor"]
    assert torch.allclose(_params(run["resumed"]), _params(run["ddp"]), atol=TOL, rtol=TOL)
    assert _close(run["resumed"]["states"]["ILoRA"], run["ddp"]["states"]["ILoRA"])
    assert run["export_outputs"] < 1e-5


def test_merge_command_reads_sharded_checkpoint_folders(launches) -> None:
    """``lightning-forget merge`` on two checkpoint folders of the sharded GPT-2 run merges what the plain
    modules they load into merge to (TIES), and writes a checkpoint without training state."""
    run = launches["lora_gslora_conv1d"]["merge_folders"]
    assert run["same_names"] and run["moved"] > 1e-4 and run["difference"] < 1e-6
    assert "state_dict" in run["keys"] and not any(k.startswith("optimizer") or k in ("loops", "callbacks") for k in run["keys"])
def test_sfd_keeps_its_fake_score_network_as_local_shards(launches) -> None:
    """SFD's fake score network and its Adam moments are rank 0's shards (a full copy under DDP); gathered for
    the state they equal DDP's (test_sharded_run_equals_ddp_and_one_process) and moved away from the teacher."""
    result = launches["sfd"]
    local, total, moments = result["sharded"]["sfd_fake_numel"]
    table = result["sharded"]["sfd_table_numel"]  # the frozen concept table is not sharded: each rank holds it
    assert local - table <= (total - table) // 2 + 64 and moments == 2 * local
    assert result["ddp"]["sfd_fake_numel"] == [total, total, 2 * total]
    state = result["sharded"]["states"]["SFD"]["method"]
    fake = state["fake"]["weights"]
    assert set(fake) <= set(state["teacher"]) and len(fake) == len(result["sharded"]["params"])
    assert not _close(fake, {n: state["teacher"][n] for n in fake})  # the fake trained (its own Adam)
