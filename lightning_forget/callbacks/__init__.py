"""Continual-learning and unlearning methods as Lightning callbacks."""

from lightning_forget.callbacks.adab2n import AdaB2N
from lightning_forget.callbacks.continual_eval import ContinualEvaluation
from lightning_forget.callbacks.continual_metrics import ContinualMetrics
from lightning_forget.callbacks.erasure import ESD, UCE, ConceptAblation, ErasureMethod  # noqa: F401 (the base, by module path)
from lightning_forget.callbacks.erasure_eval import ErasureEvaluation
from lightning_forget.callbacks.doco import DoCo
from lightning_forget.callbacks.salun_diffusion import SalUnDiffusion
from lightning_forget.callbacks.sfd import SFD
from lightning_forget.callbacks.forget_eval import ForgetRetainEvaluation
from lightning_forget.callbacks.gs_lora import GSLoRA
from lightning_forget.callbacks.i_lora import ILoRA
from lightning_forget.callbacks.infinite_lr import InfiniteLRSchedule
from lightning_forget.callbacks.kfpf import FPF, KFPF
from lightning_forget.callbacks.lines import LiNeS
from lightning_forget.callbacks.lr_rewarming import LRRewarming
from lightning_forget.callbacks.refresh import RefreshLearning
from lightning_forget.callbacks.replay import DarkExperienceReplay, ExperienceReplay
from lightning_forget.callbacks.rng_state import RNGStateCheckpoint
from lightning_forget.callbacks.unlearning import (
    SCRUB, FineTune, GradDiff, GradientAscent, L1Sparse, RandomLabels, SalUn,
)
from lightning_forget.callbacks.unlearning_eval import UnlearningEvaluation
from lightning_forget.callbacks.unlearning_lm import NPO, RMU, IdkPO, SimNPO
from lightning_forget.callbacks.unlearning_lm_eval import LMUnlearningEvaluation

__all__ = [
    "AdaB2N",
    "ContinualEvaluation",
    "ContinualMetrics", "DarkExperienceReplay", "ExperienceReplay", "ForgetRetainEvaluation", "FPF", "GSLoRA", "ILoRA", "InfiniteLRSchedule", "KFPF",
    "LiNeS", "LRRewarming",
    "RefreshLearning", "RNGStateCheckpoint",
    # unlearning baselines (one shared mechanism: UnlearningMethod)
    "FineTune", "GradDiff", "GradientAscent", "L1Sparse", "RandomLabels", "SalUn", "SCRUB", "UnlearningEvaluation",
    # language-model unlearning (the same mechanism)
    "IdkPO", "NPO", "RMU", "SimNPO",
    "LMUnlearningEvaluation",
    # concept erasure in diffusion models (one shared mechanism: ErasureMethod)
    "ConceptAblation", "ESD", "UCE", "ErasureEvaluation",
    "DoCo", "SalUnDiffusion", "SFD",
]
