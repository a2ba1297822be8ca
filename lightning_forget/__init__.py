"""lightning_forget: continual learning and machine unlearning as Lightning callbacks."""

from lightning_forget.tasks import ContinualCallback, current_task

__version__ = "0.1.0"

__all__ = ["ContinualCallback", "current_task", "__version__"]
