"""Continual-learning and unlearning methods as Lightning callbacks."""

from lightning_forget.callbacks.replay import DarkExperienceReplay, ExperienceReplay

__all__ = ["ExperienceReplay", "DarkExperienceReplay"]
