"""LightningModules for classifiers, causal LMs and diffusion models."""

from lightning_forget.modules.causal_lm import CausalLMModule
from lightning_forget.modules.classifier import ContinualClassifier

__all__ = ["CausalLMModule", "ContinualClassifier"]
