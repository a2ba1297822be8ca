"""The contract every callback keeps: one row per callback.

For each row: constructor errors name the argument, the callback pickles and deep-copies (fresh,
and after a fit, with the same state), LightningCLI builds it from YAML and runs a two-task
stream through a task boundary, a run resumed mid-task (from an epoch-end checkpoint and from a
mid-epoch one) trains on the same batches and ends with the same parameters and callback state
as an uninterrupted one, and a 2-process DDP run ends with identical parameters and callback
state on both ranks (and that comparison fails for a callback whose state differs by rank).
"""

from __future__ import annotations

import copy
from functools import partial
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import yaml

from lightning_forget.callbacks import ContinualEvaluation, ContinualMetrics, DarkExperienceReplay, ExperienceReplay, LiNeS, LRRewarming
from lightning_forget.callbacks import FPF, KFPF, AdaB2N, ForgetRetainEvaluation, GSLoRA, ILoRA, InfiniteLRSchedule, RefreshLearning
from lightning_forget.callbacks import SCRUB, FineTune, GradDiff, GradientAscent, L1Sparse, RandomLabels, SalUn, UnlearningEvaluation
from lightning_forget.callbacks import NPO, RMU, IdkPO, LMUnlearningEvaluation, SimNPO
from lightning_forget.callbacks import ESD, SFD, UCE, ConceptAblation, DoCo, SalUnDiffusion
from lightning_forget.callbacks.erasure_eval import ErasureEvaluation
from lightning_forget.cli import main
from tests.helpers.data import BlobStream
from lightning_forget.tasks import ContinualCallback
from tests.helpers.text import TINY_INSTRUCTIONS, TINY_LM, tiny_instruction_stream, tiny_lm
from tests.helpers.harness import BatchRecorder, flat_tensors, params_vector, run_ddp_pair, run_stream, same_state, tiny_classifier
from tests.helpers.models import conv_classifier
from tests.helpers.qa_stream import TINY_QA_LM, QAForgetStream
from tests.helpers.diffusion import TINY_UNET, DigitImageStream, tiny_diffusion


@dataclass
class Row:
    id: str
    cls: type
    kwargs: dict[str, Any]
    bad: list[tuple[dict[str, Any], type[Exception], str]]
    make_data: Callable[..., Any] = BlobStream
    make_model: Callable[[Any], Any] = tiny_classifier
    model_yaml: dict[str, Any] = field(
        default_factory=lambda: {
            "class_path": "lightning_forget.modules.ContinualClassifier",
            "init_args": {"hidden_sizes": [16], "report": False},
        }
    )
    data_yaml: dict[str, Any] = field(default_factory=lambda: {"class_path": "tests.helpers.data.BlobStream"})
    #: The mid-epoch resume's checkpoint step: inside task 1's first epoch (see MID_EPOCH_STEP).
    mid_step: int = 15

    def build(self) -> Any:
        return self.cls(**self.kwargs)


#: Three random-sample forgetting tasks over scikit-learn's digits, 6 two-stream batches per epoch
#: (the CLI row overrides ``num_tasks``, which class mode would take from ``forget_classes``).
_FORGET_DATA = {"builtin": "digits", "mode": "random", "num_tasks": 3, "forget_fraction": 0.05, "data_ratio": 0.05,
                "batch_size": 10}


def forget_stream(epochs_per_task: int = 1, **kwargs: Any) -> Any:
    """Forgetting tasks with two-stream batches ``{"forget", "retain"}``, for GSLoRA."""
    from lightning_forget.datamodules import ForgetRetainDataModule

    return ForgetRetainDataModule(epochs_per_task=epochs_per_task, **{**_FORGET_DATA, **kwargs})


def retain_stream(epochs_per_task: int = 1) -> Any:
    """The same tasks with plain batches of the retained data (fine-tuning), for ForgetRetainEvaluation."""
    return forget_stream(epochs_per_task, retain_only=True)


def qa_lm(dm: Any) -> Any:
    """A one-block GPT-2 over bytes for the LM unlearning rows."""
    from lightning_forget.modules import CausalLMModule

    return CausalLMModule(vocab_size=dm.vocab_size, block_size=dm.block_size, **TINY_QA_LM)


def forget_model(dm: Any) -> Any:
    """A small MLP whose two hidden linears carry GSLoRA's adapters."""
    return tiny_classifier(dm, hidden_sizes=[16, 16])


ROWS = [
    Row(
        "ExperienceReplay",
        ExperienceReplay,
        {"buffer_size": 16, "replay_batch_size": 4, "seed": 3},
        [
            ({"buffer_size": 0}, ValueError, "buffer_size"),
            ({"buffer_size": 10, "replay_batch_size": -1}, ValueError, "replay_batch_size"),
            ({"buffer": "fifo"}, ValueError, "buffer"),
        ],
    ),
    Row(
        "ExperienceReplay-class_balanced",
        ExperienceReplay,
        {"buffer_size": 12, "buffer": "class_balanced"},
        [({"seed": "a"}, TypeError, "seed")],
    ),
    Row(
        "DarkExperienceReplay",
        DarkExperienceReplay,
        {"buffer_size": 16, "alpha": 0.3, "beta": 0.5},
        [
            ({"alpha": -1.0}, ValueError, "alpha"),
            ({"beta": "x"}, TypeError, "beta"),
            ({"buffer_size": 2.5}, TypeError, "buffer_size"),
            ({"alpha": float("nan")}, ValueError, "alpha"),
        ],
    ),
    Row(
        "LRRewarming",
        LRRewarming,
        {"max_lr": 0.1, "min_lr": 0.01, "warmup": 0.25},
        [
            ({"max_lr": -1}, ValueError, "max_lr"),
            ({"max_lr": 0.1, "warmup": -1}, ValueError, "warmup"),
            ({"max_lr": 0.1, "decay": "step"}, ValueError, "decay"),
            ({"max_lr": 0.1, "mode": "x"}, ValueError, "mode"),
        ],
    ),
    Row(
        "InfiniteLRSchedule",
        InfiniteLRSchedule,
        {"max_lr": 0.1, "min_lr": 0.01, "warmup": 3, "cooldown_steps": 10, "anneal_steps": 4},
        [
            ({"max_lr": 0.1, "cooldown_steps": -1}, ValueError, "cooldown_steps"),
            ({"max_lr": 0.1, "anneal": "step"}, ValueError, "anneal"),
        ],
    ),
    Row(
        "ContinualMetrics",
        ContinualMetrics,
        {"key": "val/acc/task_{task}", "report": False},
        [({"key": "val/acc/{t}"}, ValueError, "key"), ({"report": 1}, TypeError, "report")],
    ),
    Row(
        "LiNeS",
        LiNeS,
        {"alpha": 0.3, "save_unscaled": False},
        [
            ({"head_policy": "x"}, ValueError, "head_policy"),
            ({"apply_at": "x"}, ValueError, "apply_at"),
            ({"alpha_grid": [0.1, 0.2]}, ValueError, "alpha_grid"),
        ],
    ),
    Row(
        "ContinualEvaluation",
        ContinualEvaluation,
        {"every_n_steps": 2, "samples_per_task": 10, "save_plot": False, "save_csv": False},
        [
            ({"every_n_steps": 0}, ValueError, "every_n_steps"),
            ({"samples_per_task": 0}, ValueError, "samples_per_task"),
            ({"max_eval_fraction": 2.0}, ValueError, "max_eval_fraction"),
            ({"window": 0}, ValueError, "window"),
        ],
    ),
    Row(
        "ILoRA",
        ILoRA,
        {"lora": {"r": 2, "alpha": 4.0, "dropout": 0.0}, "buffer_size": 12, "seed": 1, "save_adapters": False},
        [
            ({"ema": 1.0}, ValueError, "ema"),
            ({"consistency_weight": -1.0}, ValueError, "consistency_weight"),
            ({"inference_learner": "both"}, ValueError, "inference_learner"),
            ({"layers": "last"}, TypeError, "layers"),
            ({"lora": 3}, TypeError, "lora"),
        ],
        make_data=tiny_instruction_stream,
        make_model=tiny_lm,
        model_yaml={"class_path": "lightning_forget.modules.CausalLMModule", "init_args": dict(TINY_LM)},
        data_yaml={"class_path": "lightning_forget.datamodules.InstructionStreamDataModule", "init_args": dict(TINY_INSTRUCTIONS)},
    ),
    Row(
        "RefreshLearning",
        RefreshLearning,
        {"delta": 1e-3, "noise_std": 1e-3, "fisher_samples": 16},
        [
            ({"delta": -1.0}, ValueError, "delta"),
            ({"every_n_steps": 0}, ValueError, "every_n_steps"),
            ({"unlearn_steps": 1.5}, TypeError, "unlearn_steps"),
            ({"tau": float("nan")}, ValueError, "tau"),
            ({"loss_fn": 3}, TypeError, "loss_fn"),
        ],
    ),
    Row(
        "ForgetRetainEvaluation",
        ForgetRetainEvaluation,
        {"report": False, "batch_size": 64},
        [
            ({"split": "train"}, ValueError, "split"),
            ({"batch_size": 0}, ValueError, "batch_size"),
            ({"mia": 1}, TypeError, "mia"),
        ],
        make_data=retain_stream,
        make_model=forget_model,
        model_yaml={"class_path": "lightning_forget.modules.ContinualClassifier",
                    "init_args": {"hidden_sizes": [16, 16], "report": False}},
        data_yaml={"class_path": "lightning_forget.datamodules.ForgetRetainDataModule",
                   "init_args": {**_FORGET_DATA, "retain_only": True}},
    ),
    Row("LiNeS-task_end", LiNeS, {"alpha": 0.5, "apply_at": "task_end", "save_unscaled": False}, []),
    Row(
        "AdaB2N",
        AdaB2N,
        {"kappa": 0.4, "lambd": 0.5},
        [
            ({"kappa": 1.5}, ValueError, "kappa"),
            ({"lambd": -1.0}, ValueError, "lambd"),
            ({"ada_t0": -1}, ValueError, "ada_t0"),
            ({"num_tasks": 0}, ValueError, "num_tasks"),
            ({"classes_per_task": 2.0}, TypeError, "classes_per_task"),
        ],
        make_model=conv_classifier,
        model_yaml={
            "class_path": "lightning_forget.modules.ContinualClassifier",
            "init_args": {"backbone": {"class_path": "tests.helpers.models.TinyConvNet"}, "report": False},
        },
    ),
    Row(
        "KFPF",
        KFPF,
        {"k": 4, "finetune_steps": 2, "finetune_batch_size": 4, "buffer_size": 16, "kd": True},
        [
            ({"k": 0}, ValueError, "k"),
            ({"k": None, "interval": None}, ValueError, "interval"),
            ({"lr": -0.1}, ValueError, "lr"),
            ({"finetune_steps": 1.5}, TypeError, "finetune_steps"),
            ({"module_types": ["dropout"]}, ValueError, "module_types"),
        ],
    ),
    Row(
        "KFPF-auto",
        KFPF,
        {"interval": 3, "auto_top": 1, "finetune_steps": 1, "buffer_size": 16, "finetune_at_task_end": True},
        [({"auto_top": 0}, ValueError, "auto_top")],
    ),
    Row(
        "FPF",
        FPF,
        {"every_task": True, "finetune_steps": 2, "finetune_batch_size": 4, "buffer_size": 16},
        [({"every_task": 1}, TypeError, "every_task"), ({"buffer_size": 0}, ValueError, "buffer_size")],
    ),
    Row(
        "GSLoRA",
        GSLoRA,
        {"target_modules": ["layers.1", "layers.3"], "prototype": True, "bound": 5.0, "alpha": 1e-3},
        [
            ({"grouping": "layer"}, ValueError, "grouping"),
            ({"alpha": -1.0}, ValueError, "alpha"),
            ({"beta": []}, ValueError, "beta"),
            ({"r": 0}, ValueError, "r"),
            ({"forget_stream": 3}, TypeError, "forget_stream"),
        ],
        make_data=forget_stream,
        make_model=forget_model,
        model_yaml={"class_path": "lightning_forget.modules.ContinualClassifier",
                    "init_args": {"hidden_sizes": [16, 16], "report": False}},
        data_yaml={"class_path": "lightning_forget.datamodules.ForgetRetainDataModule", "init_args": dict(_FORGET_DATA)},
    ),
    # ---- unlearning baselines (one shared mechanism, callbacks/unlearning.py) and their evaluation
    *[
        Row(
            name,
            cls,
            kwargs,
            bad,
            make_data=forget_stream,
            make_model=forget_model,
            model_yaml={"class_path": "lightning_forget.modules.ContinualClassifier",
                        "init_args": {"hidden_sizes": [16, 16], "report": False}},
            data_yaml={"class_path": "lightning_forget.datamodules.ForgetRetainDataModule", "init_args": dict(_FORGET_DATA)},
        )
        for name, cls, kwargs, bad in [
            ("GradientAscent", GradientAscent, {"retain_weight": 0.5, "bound": 5.0},
             [({"bound": -1.0}, ValueError, "bound"), ({"guard_monitor": "mu/ra"}, ValueError, "guard_threshold"),
              ({"guard_mode": "under"}, ValueError, "guard_mode"), ({"forget_stream": 3}, TypeError, "forget_stream")]),
            ("GradDiff-kl", GradDiff, {"retain_loss": "kl", "gamma": 0.5},
             [({"retain_loss": "mse"}, ValueError, "retain_loss"), ({"gamma": -1.0}, ValueError, "gamma")]),
            ("RandomLabels", RandomLabels, {"seed": 3},
             [({"exclude_true": 1}, TypeError, "exclude_true"), ({"seed": "a"}, TypeError, "seed")]),
            ("L1Sparse", L1Sparse, {"alpha": 1e-3},
             [({"alpha": -1.0}, ValueError, "alpha"), ({"no_l1_epochs": -1}, ValueError, "no_l1_epochs")]),
            ("SCRUB", SCRUB, {"msteps": 1},
             [({"temperature": 0.0}, ValueError, "temperature"), ({"msteps": 1.5}, TypeError, "msteps")]),
            ("SalUn", SalUn, {"mask_fraction": 0.3},
             [({"mask_fraction": 0.0}, ValueError, "mask_fraction"), ({"restore_mode": "best"}, ValueError, "restore_mode")]),
            ("FineTune", FineTune, {"save_original": False},
             [({"retain_weight": -1.0}, ValueError, "retain_weight"), ({"save_original": 1}, TypeError, "save_original")]),
        ]
    ],
    # ---- LM unlearning (callbacks/unlearning_lm.py) on two-stream causal-LM batches
    *[
        Row(
            name,
            cls,
            kwargs,
            bad,
            make_data=QAForgetStream,
            make_model=qa_lm,
            model_yaml={"class_path": "lightning_forget.modules.CausalLMModule", "init_args": dict(TINY_QA_LM)},
            data_yaml={"class_path": "tests.helpers.qa_stream.QAForgetStream"},
        )
        for name, cls, kwargs, bad in [
            ("NPO", NPO, {"beta": 0.5, "retain_loss": "kl"},
             [({"beta": 0.0}, ValueError, "beta"), ({"retain_loss": "mse"}, ValueError, "retain_loss")]),
            ("SimNPO", SimNPO, {"delta": 0.1},
             [({"delta": "x"}, TypeError, "delta"), ({"gamma": -1.0}, ValueError, "gamma")]),
            ("IdkPO", IdkPO, {"seed": 2, "idk_answers": ["I don't know.", "No idea."]},
             [({"idk_answers": []}, ValueError, "idk_answers"), ({"tokenizer": 3}, TypeError, "tokenizer")]),
            ("RMU", RMU, {"steering_coeff": 4.0, "seed": 1},
             [({"layer": "("}, ValueError, "layer"), ({"steering_coeff": 0.0}, ValueError, "steering_coeff")]),
        ]
    ],
    # The TOFU metrics of a causal LM while it unlearns (the current task's person as the forget
    # set; no generation, no GradNorm, no reference attack, to keep the row's evaluations cheap),
    # fine-tuning on the retained people.
    Row(
        "LMUnlearningEvaluation",
        LMUnlearningEvaluation,
        {"report": False, "generate": False, "gradnorm": False, "reference": False, "progress": False, "batch_size": 8},
        [({"every_n_epochs": 0}, ValueError, "every_n_epochs"), ({"splits": ["retain"]}, ValueError, "splits"),
         ({"save_best": True}, ValueError, "save_best"), ({"k": 2.0}, ValueError, "k"),
         ({"score_weights": {"forget_quality": 1.0}}, ValueError, "score_weights")],
        make_data=partial(QAForgetStream, retain_only=True),
        make_model=qa_lm,
        model_yaml={"class_path": "lightning_forget.modules.CausalLMModule", "init_args": dict(TINY_QA_LM)},
        data_yaml={"class_path": "tests.helpers.qa_stream.QAForgetStream", "init_args": {"retain_only": True}},
    ),
    Row(
        "UnlearningEvaluation",
        UnlearningEvaluation,
        {"report": False, "mia": "threshold"},
        [({"mia": "lira"}, ValueError, "mia"), ({"every_n_epochs": 0}, ValueError, "every_n_epochs"),
         ({"retrained": {"ua": 0.1}}, ValueError, "retrained"), ({"retrained": 3}, TypeError, "retrained")],
        make_data=retain_stream,
        make_model=forget_model,
        model_yaml={"class_path": "lightning_forget.modules.ContinualClassifier",
                    "init_args": {"hidden_sizes": [16, 16], "report": False}},
        data_yaml={"class_path": "lightning_forget.datamodules.ForgetRetainDataModule",
                   "init_args": {**_FORGET_DATA, "retain_only": True}},
    ),
    # Concept erasure on a tiny diffusion model over a 3-task digits image stream: one digit erased per task.
    *[
        # 2 batches per task-epoch (12 steps a stream): the mid-epoch checkpoint after step 5 is one batch into
        # task 1's first epoch.
        Row(row_id, cls, kwargs, bad, make_data=DigitImageStream, make_model=partial(tiny_diffusion, unet=unet),
            model_yaml={"class_path": "lightning_forget.modules.DiffusionModule",
                        "init_args": {**TINY_UNET, "unet": unet}},
            data_yaml={"class_path": "tests.helpers.diffusion.DigitImageStream"}, mid_step=5)
        for row_id, cls, unet, kwargs, bad in [
            ("ESD", ESD, "conditional", {"erase": [[0], [2], [4]], "ddim_steps": 2, "seed": 1},
             [({"erase": [0], "negative_guidance": -1.0}, ValueError, "negative_guidance"),
              ({"erase": [0], "parameters": "xattn"}, ValueError, "parameters"), ({"erase": []}, ValueError, "erase")]),
            ("ESD-u-lora-class", ESD, "class", {"erase": [[0], [2], [4]], "parameters": "u", "lora_rank": 2, "ddim_steps": 2},
             [({"erase": [0], "lora_rank": 0}, ValueError, "lora_rank"), ({"erase": [0], "lora_alpha": 2.0}, ValueError, "lora_alpha")]),
            ("ConceptAblation", ConceptAblation, "conditional",
             {"erase": [[0], [2], [4]], "anchor": 1, "num_anchor_samples": 4, "sample_steps": 1, "prior_preservation": True},
             [({"erase": [0], "anchor": 1.5}, TypeError, "anchor"), ({"erase": [0], "batch_size": 0}, ValueError, "batch_size")]),
            ("UCE", UCE, "conditional", {"erase": [[0], [2], [4]], "when": "task_end"},
             [({"erase": [0], "lamb": 0.0}, ValueError, "lamb"), ({"erase": [0], "when": "fit_end"}, ValueError, "when"),
              ({"erase": [0], "lora_rank": 2}, ValueError, "lora_rank")]),
            ("DoCo", DoCo, "conditional",
             {"erase": [[0], [2], [4]], "discriminator_warmup": 1, "discriminator_width": 8, "num_anchor_samples": 4,
              "sample_steps": 1, "batch_size": 4},
             [({"erase": [0], "gradient_surgery": "pcgrad"}, ValueError, "gradient_surgery"),
              ({"erase": [0], "discriminator_lr": 0.0}, ValueError, "discriminator_lr")]),
            ("SalUnDiffusion-class", SalUnDiffusion, "class",
             {"erase": [[0], [2], [4]], "num_forget_samples": 4, "sample_steps": 1, "batch_size": 4, "mask_batch_size": 4},
             [({"erase": [0], "mask_fraction": 0.0}, ValueError, "mask_fraction"), ({"erase": [0], "pseudo": 1.5}, TypeError, "pseudo")]),
            ("SFD-lora", SFD, "conditional", {"erase": [[0], [2], [4]], "batch_size": 4, "parameters": "attn", "lora_rank": 2},
             [({"erase": [0], "t_init": 1.0}, ValueError, "t_init"), ({"erase": [0], "override": 2.5}, TypeError, "override")]),
            ("ErasureEvaluation", ErasureEvaluation, "conditional",
             {"erase": [[0], [2], [4]], "samples_per_class": 2, "judge_epochs": 1, "num_steps": 1, "grid_per_class": 1},
             [({"erase": [0], "samples_per_class": 1}, ValueError, "samples_per_class"),
              ({"erase": [0], "data": "cifar"}, ValueError, "data"), ({"erase": [0], "classifier": 3}, TypeError, "classifier")]),
        ]
    ],
]


def _ids(rows: list[Row]) -> list[str]:
    return [row.id for row in rows]


@pytest.mark.parametrize("row", ROWS, ids=_ids(ROWS))
def test_constructor_errors_name_the_argument(row: Row) -> None:
    for kwargs, error, match in row.bad:
        with pytest.raises(error, match=match):
            row.cls(**kwargs)


@pytest.mark.parametrize("row", ROWS, ids=_ids(ROWS))
def test_pickles_and_copies(row: Row) -> None:
    callback = row.build()
    for other in (pickle.loads(pickle.dumps(callback)), copy.deepcopy(callback)):
        assert type(other) is row.cls
        assert same_state(other.state_dict(), callback.state_dict())


@pytest.mark.parametrize("row", ROWS, ids=_ids(ROWS))
def test_pickles_and_copies_after_a_fit(row: Row, tmp_path_factory: Any) -> None:
    # The uninterrupted run of the resume test (three tasks): buffers filled, schedules advanced,
    # every task ended.
    callback = _full_run(row, tmp_path_factory)[3]
    assert isinstance(callback, ContinualCallback) and callback._ended == 2
    state = callback.state_dict()
    assert not same_state(state, row.build().state_dict())  # the fit changed the state
    for other in (pickle.loads(pickle.dumps(callback)), copy.deepcopy(callback)):
        assert type(other) is row.cls
        assert same_state(other.state_dict(), state)
    assert same_state(callback.state_dict(), state)  # copying left the original alone


def _two_tasks(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The row's arguments for a two-task stream: an erasure row's one concept group per task, cut to two."""
    erase = kwargs.get("erase")
    if isinstance(erase, list) and erase and all(isinstance(group, list) for group in erase):
        return {**kwargs, "erase": erase[:2]}
    return kwargs


@pytest.mark.parametrize("row", ROWS, ids=_ids(ROWS))
def test_cli_builds_it_and_runs_through_a_task_boundary(row: Row, tmp_path: Any) -> None:
    # Two tasks of one epoch, two batches each: the first task ends inside the fit.
    data_yaml = copy.deepcopy(row.data_yaml)
    data_yaml.setdefault("init_args", {}).update(num_tasks=2, epochs_per_task=1)
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 2,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "reload_dataloaders_every_n_epochs": 1,
            "logger": False,
            "enable_checkpointing": True,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": f"{row.cls.__module__}.{row.cls.__name__}", "init_args": _two_tasks(row.kwargs)}],
        },
        "model": row.model_yaml,
        "data": data_yaml,
    }
    path = tmp_path / "input.yaml"  # the CLI saves the resolved config as config.yaml
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path)])
    built = [cb for cb in cli.trainer.callbacks if type(cb) is row.cls]
    assert len(built) == 1
    assert cli.trainer.global_step == 4
    assert built[0]._ended == 1  # both tasks ended, the first one mid-fit
    assert not same_state(built[0].state_dict(), row.build().state_dict())
    # validate/test from the fit's checkpoint, through the CLI, with the same config: resume guards
    # apply to `fit` only, and the checkpoint loads into the module the config builds.
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    from lightning.pytorch.utilities.model_helpers import is_overridden

    for stage in ("validate", "test"):
        if is_overridden(f"{stage}_step" if stage == "test" else "validation_step", cli.model):
            main([stage, "--config", str(path), "--ckpt_path", checkpoint, "--trainer.default_root_dir", str(tmp_path / stage)])


#: Step 15 of the 3-task × 2-epoch BlobStream (6 batches per epoch): 3 batches into epoch 2,
#: the first epoch of task 1 (replay buffers hold task 0). A row's ``mid_step`` (default this) says
#: where its stream's mid-epoch checkpoint is.
MID_EPOCH_STEP = 15
_FULL_RUNS: dict[str, tuple[torch.Tensor, Any, list[Any], Any]] = {}


def _full_run(row: Row, tmp_path_factory: Any) -> tuple[torch.Tensor, Any, list[Any], Any]:
    """The uninterrupted run of a row (parameters, callback state, batches, the callback), run once per module."""
    if row.id not in _FULL_RUNS:
        recorder = BatchRecorder()
        model, callback = run_stream(
            tmp_path_factory.mktemp("full"), row.build, make_data=row.make_data, make_model=row.make_model,
            extra_callbacks=lambda: [recorder],
        )
        _FULL_RUNS[row.id] = (params_vector(model), callback.state_dict(), recorder.seen, callback)
    return _FULL_RUNS[row.id]


@pytest.mark.parametrize("resume", ["epoch_end", "mid_epoch"])
@pytest.mark.parametrize("row", ROWS, ids=_ids(ROWS))
def test_resume_mid_task_equals_uninterrupted(row: Row, resume: str, tmp_path: Any, tmp_path_factory: Any) -> None:
    full_params, full_state, full_batches, _ = _full_run(row, tmp_path_factory)
    recorder = BatchRecorder()
    # epochs_per_task=2: the checkpoint after epoch 2 (epoch_end) or after step 15 (mid_epoch)
    # is in the middle of task 1.
    where = {"resume_after_epoch": 2} if resume == "epoch_end" else {"resume_after_step": row.mid_step}
    resumed_model, resumed_cb = run_stream(
        tmp_path, row.build, make_data=row.make_data, make_model=row.make_model,
        extra_callbacks=lambda: [recorder], **where,
    )
    # The resumed run trained on the same batches, in the same order (loaders resume at the
    # exact batch), none twice, none skipped.
    assert recorder.seen == full_batches
    assert torch.allclose(full_params, params_vector(resumed_model), atol=1e-6)
    assert torch.allclose(flat_tensors(full_state), flat_tensors(resumed_cb.state_dict()), atol=1e-6, equal_nan=True)


@pytest.mark.ddp
@pytest.mark.parametrize("row", ROWS, ids=_ids(ROWS))
def test_ddp_ranks_stay_identical(row: Row, tmp_path: Any) -> None:
    # The global RNGs differ by rank before the callback's setup (a datamodule's prepare_data/setup
    # drawing per rank): state copied from the model before DDP's broadcast would differ by rank.
    result = run_ddp_pair(tmp_path, row.build, make_data=row.make_data, make_model=row.make_model, rng_drift=True)
    assert result["equal_length"], result
    assert result["world_size"] == 2
    assert result["global_step"] > 0
    assert result["max_param_diff"] == 0.0, result
    assert result["max_state_diff"] == 0.0, result


class RankDependentState(ContinualCallback):
    """A callback whose checkpointed state differs by rank (and leaves the weights alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.rank = torch.zeros(3)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self.rank = torch.full((3,), float(trainer.global_rank))

    def method_state(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.rank = state["rank"]


@pytest.mark.ddp
def test_ddp_comparison_fails_for_a_rank_dependent_callback_state(tmp_path: Any) -> None:
    result = run_ddp_pair(tmp_path, RankDependentState)
    assert result["equal_length"] and result["world_size"] == 2, result
    assert result["max_param_diff"] == 0.0, result
    assert result["max_state_diff"] == 1.0, result  # the check sees the callback's state, not only the weights


class GlobalRNGCopy(ContinualCallback):
    """Keeps a tensor drawn from the global RNG in ``setup`` (as a callback copying weights that a
    module initialised in ``setup`` would, before DDP broadcasts them)."""

    def __init__(self) -> None:
        super().__init__()
        self.drawn = torch.zeros(3)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.drawn = torch.rand(3)

    def method_state(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.drawn = state["drawn"]


@pytest.mark.ddp
def test_ddp_rows_make_the_global_rng_differ_by_rank(tmp_path: Any) -> None:
    # The DDP rows' RNG drift bites: a callback that copies from the global RNG in setup ends with
    # different state on the two ranks.
    result = run_ddp_pair(tmp_path, GlobalRNGCopy, rng_drift=True)
    assert result["equal_length"] and result["world_size"] == 2, result
    assert result["max_state_diff"] > 0.0, result
