"""Loggers that record the figures they receive (tensorboard, wandb and mlflow are not installed)."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger


class _Quiet:
    """The parts of the Logger interface a Trainer calls, doing nothing."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Any, step: Optional[int] = None) -> None:
        pass

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        pass

    def save(self) -> None:
        pass

    def finalize(self, status: str) -> None:
        pass


class _FigureRecorder:
    """Stands in for a ``SummaryWriter`` / ``MlflowClient``: keeps the figure calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def add_figure(self, tag: str, figure: Any, global_step: Optional[int] = None, close: bool = True) -> None:
        self.calls.append((tag, figure, global_step))

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        self.calls.append((run_id, figure, artifact_file))


class RecordingTensorBoard(_Quiet, TensorBoardLogger):
    """A ``TensorBoardLogger`` whose ``experiment`` (the SummaryWriter) records ``add_figure``."""

    def __init__(self, save_dir: str) -> None:
        Logger.__init__(self)
        self._dir = save_dir
        self.writer = _FigureRecorder()

    @property
    def experiment(self) -> _FigureRecorder:
        return self.writer

    @property
    def root_dir(self) -> str:
        return self._dir

    @property
    def log_dir(self) -> str:
        return self._dir

    @property
    def save_dir(self) -> str:
        return self._dir


class RecordingMLFlow(_Quiet, MLFlowLogger):
    """An ``MLFlowLogger`` whose ``experiment`` (the MlflowClient) records ``log_figure``."""

    def __init__(self) -> None:
        Logger.__init__(self)
        self.client = _FigureRecorder()

    @property
    def experiment(self) -> _FigureRecorder:
        return self.client

    @property
    def run_id(self) -> str:
        return "run-1"

    @property
    def save_dir(self) -> None:
        return None


class ImageLogger(_Quiet, Logger):
    """A logger with a ``log_image(key, images, step)`` method, as ``WandbLogger`` has."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, list[Any], Optional[int]]] = []

    def log_image(self, key: str, images: list[Any], step: Optional[int] = None, **kwargs: Any) -> None:
        self.images.append((key, images, step))
