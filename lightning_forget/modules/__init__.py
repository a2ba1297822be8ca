"""LightningModules for classifiers, causal LMs and diffusion models."""

from lightning_forget.modules.causal_lm import CausalLMModule
from lightning_forget.modules.classifier import ContinualClassifier
from lightning_forget.modules.diffusion import DiffusionModule

__all__ = ["CausalLMModule", "ContinualClassifier", "DiffusionModule"]
