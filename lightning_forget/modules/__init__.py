"""LightningModules for classifiers, causal LMs and diffusion models."""

from lightning_forget.modules.classifier import ContinualClassifier

__all__ = ["ContinualClassifier"]
