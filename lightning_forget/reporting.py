"""End-of-run reporting: a rich table of the accuracy matrix, JSON, CSV and PNG files, figures to loggers.

- the accuracy matrix: :func:`print_report`, :func:`write_report` (``metrics.json``,
  ``accuracy_matrix.csv``, :func:`accuracy_heatmap` as ``accuracy_matrix.png``);
- continual-evaluation curves (the stability gap): :func:`write_stability_csv`,
  :func:`stability_gap_figure`, :func:`write_stability_plot`;
- figures to the loggers that take images: :func:`log_figure`;
- where it all goes: :func:`results_dir`, :func:`announce_results`.

Apart from :func:`results_dir` (call it on every rank: ``trainer.log_dir`` broadcasts), these are
plain functions with no collectives: call them on one process only (the callbacks call them on
global rank 0 with values that are identical on every rank).

Convention: ``R[i, j]`` is the accuracy on task ``j`` after training task ``i``, ``NaN`` where not
measured (see :mod:`lightning_forget.metrics.functional`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from lightning_forget.metrics.functional import (
    MatrixLike,
    as_accuracy_matrix,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    last_measured_row,
    learning_accuracy,
)
from lightning_forget.metrics.stability import EvalCurves, current_task_index

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

__all__ = [
    "UNLEARNING_COLUMNS",
    "UNLEARNING_FILES",
    "render_unlearning_table",
    "unlearning_figure",
    "write_unlearning_report",
    "summarize",
    "render_accuracy_table",
    "print_report",
    "write_report",
    "accuracy_heatmap",
    "stability_gap_figure",
    "write_stability_csv",
    "write_stability_plot",
    "log_figure",
    "STABILITY_FILES",
    "results_dir",
    "announce_results",
    "ensure_writable_dir",
    "output_paths",
    "REPORT_FILES",
]

#: File names :func:`write_report` writes (before the optional prefix).
REPORT_FILES = {"json": "metrics.json", "csv": "accuracy_matrix.csv", "png": "accuracy_matrix.png"}

#: File names ``ContinualEvaluation`` writes with :func:`write_stability_csv` / :func:`write_stability_plot`.
STABILITY_FILES = {"csv": "continual_eval.csv", "png": "stability_gap.png"}

_SUMMARY_LABELS = {
    "average_accuracy": "ACC",
    "average_incremental_accuracy": "AIA",
    "forgetting": "Forgetting",
    "bwt": "BWT",
    "learning_accuracy": "LA",
}


def results_dir(trainer: Any, override: Optional[Union[str, Path]] = None) -> str:
    """The one folder every lightning_forget output of a run goes to.

    The rule: ``override`` (a callback's own ``log_dir=`` argument) when given; else the first
    logger's directory (``trainer.log_dir``: ``lightning_logs/version_N`` for the default
    TensorBoard/CSV loggers); else ``trainer.default_root_dir`` (the working directory unless the
    Trainer was given one). Call it on every rank: ``trainer.log_dir`` broadcasts rank 0's value.
    """
    if override is not None:
        return str(override)
    directory = trainer.log_dir
    return str(directory if directory is not None else trainer.default_root_dir)


def announce_results(trainer: Any, owner: str, paths: Any) -> None:
    """Print ``"<owner>: results written to <folder>: <files>"`` once, on global rank 0.

    Every callback that writes files ends its run with this line, so a user always sees where the
    tables, plots and weights went. ``paths`` is one path or an iterable (or mapping) of paths.
    """
    if not getattr(trainer, "is_global_zero", True):
        return
    if isinstance(paths, Mapping):
        paths = list(paths.values())
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(path) for path in paths]
    if not paths:
        return
    folders = {path.parent.resolve() for path in paths}
    folder = folders.pop() if len(folders) == 1 else None
    if folder is not None:
        message = f"{owner}: results written to {folder}: {', '.join(path.name for path in paths)}"
    else:
        message = f"{owner}: results written to {', '.join(str(path.resolve()) for path in paths)}"
    print(message, flush=True)


def ensure_writable_dir(directory: Union[str, Path], owner: str, files: str, fix: str) -> None:
    """Create ``directory`` and prove a file can be written there, or raise before any training.

    Called from callbacks' ``setup()`` so that an unwritable output folder fails at once instead
    of after the whole run. ``os.access`` is not enough (it says yes to root on read-only mounts
    such as ``/proc``): the check creates the folder and writes and removes a probe file.

    Raises:
        RuntimeError: the folder cannot be created or written; the message names ``files``, the
            folder, the cause and ``fix``.
    """
    path = Path(directory)
    probe = path / ".lightning_forget_write_probe"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RuntimeError(
            f"{owner} writes {files} into {str(path)!r}, which cannot be created or written "
            f"({type(error).__name__}: {error.strerror or error}). Fix: {fix}."
        ) from error


def _versioned(name: str, version: int) -> str:
    if version == 0:
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}-v{version}{dot}{ext}"


def output_paths(owner: Any, directory: Union[str, Path], names: Mapping[str, str]) -> dict[str, Path]:
    """Where ``owner`` (a callback) writes the files ``names`` (``{kind: file name}``) in ``directory``.

    The one rule for files a callback writes: they go to :func:`results_dir` (or the folder the
    callback's own argument names), and **no run replaces a file another run wrote**. A file of
    the same name that this ``owner`` did not write (another run's, in a shared ``log_dir``, the
    working directory with ``logger=False``, or a shared adapter folder) is left alone, and the
    whole group is written beside it with Lightning's version suffix (``unlearning-v1.csv`` and
    ``unlearning-v1.png``; ``-v2``... when those exist too), the way ``ModelCheckpoint`` versions
    its files. The same ``owner`` asking again (the next fit of a one-fit-per-task run, the next
    report) gets the same paths and rewrites its own files.

    Call it on the rank that writes (global rank 0). Callbacks call it in ``setup()`` too, so that
    the choice is made and announced before training.
    """
    directory = Path(directory)
    written: set[str] = owner.__dict__.setdefault("_written_outputs", set())
    version = 0
    while True:
        paths = {kind: directory / _versioned(name, version) for kind, name in names.items()}
        if all(str(path) in written or not path.exists() for path in paths.values()):
            break
        version += 1
    if version and not all(str(path) in written for path in paths.values()):
        taken = ", ".join(sorted(names.values()))
        log.warning(
            f"{type(owner).__name__}: {taken} in {directory} belong to another run and are left as they are; "
            f"this run writes {', '.join(path.name for path in paths.values())} beside them. Fix, to keep names "
            "plain: give each run its own folder (a logger, or the callback's folder argument)."
        )
    written.update(str(path) for path in paths.values())
    return paths


def _none_if_nan(value: Any) -> Any:
    """JSON-ready copy: non-finite floats become ``None``, containers are walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _none_if_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_none_if_nan(item) for item in value]
    if isinstance(value, np.generic):
        return _none_if_nan(value.item())
    if hasattr(value, "tolist"):  # tensors and arrays
        return _none_if_nan(value.tolist())
    return value


def summarize(R: MatrixLike) -> dict[str, Any]:
    """The summary metrics of an accuracy matrix, JSON-ready (undefined values are ``None``).

    Args:
        R: accuracy matrix (tensor, array or nested lists).

    Returns:
        ``{"average_accuracy", "average_incremental_accuracy", "forgetting", "bwt",
        "learning_accuracy", "num_tasks", "tasks_trained"}``: the functional metrics of
        :mod:`lightning_forget.metrics.functional` at the last measured row, the number of
        tasks (columns) and the number of rows up to the last measured one.
    """
    matrix = as_accuracy_matrix(R)
    last = last_measured_row(matrix)
    summary = {
        "average_accuracy": average_accuracy(matrix),
        "average_incremental_accuracy": average_incremental_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "learning_accuracy": learning_accuracy(matrix),
        "num_tasks": int(matrix.shape[1]),
        "tasks_trained": 0 if last is None else last + 1,
    }
    return _none_if_nan(summary)


def _format(value: Optional[float], decimals: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{decimals}f}"


def render_accuracy_table(
    R: MatrixLike, summary: Optional[Mapping[str, Any]] = None, title: str = "Accuracy matrix"
) -> Table:
    """A rich table of ``R`` (rows "after task i", columns "task j") with the summary as caption.

    The last column is the average accuracy over the tasks seen at that row. The caption holds
    ACC (average accuracy at the last row), AIA (average incremental accuracy), forgetting, BWT
    and LA (learning accuracy); see :mod:`lightning_forget.metrics.functional`. Rows with no
    measured value before the last measured one (tasks a joint or fixed-task run never trains on
    their own) are left out of the table and named in the caption.

    Args:
        R: accuracy matrix.
        summary: output of :func:`summarize` (computed from ``R`` when ``None``).
        title: the table's title.

    Returns:
        A :class:`rich.table.Table` ready for ``Console.print``.
    """
    matrix = as_accuracy_matrix(R)
    summary = summarize(matrix) if summary is None else summary
    table = Table(title=title, title_style="bold", show_lines=False)
    table.add_column("after training", style="bold", no_wrap=True)
    for column in range(matrix.shape[1]):
        table.add_column(f"task {column}", justify="right")
    table.add_column("ACC", justify="right", style="cyan")
    last = last_measured_row(matrix)
    omitted = []
    for row in range(matrix.shape[0] if last is None else last + 1):
        if last is not None and not bool(torch.isfinite(matrix[row]).any()):
            omitted.append(row)  # a task not trained on its own (joint or fixed-task runs), or never validated
            continue
        cells = [
            _format(float(value)) if row >= column else f"[dim]{_format(float(value))}[/dim]"
            for column, value in enumerate(matrix[row])
        ]
        table.add_row(f"task {row}", *cells, _format(average_accuracy(matrix, row)))
    # "name=value" has no space, so a narrow table wraps the caption between items only.
    caption = [f"{label}={_format(summary.get(key))}" for key, label in _SUMMARY_LABELS.items() if key in summary]
    if omitted:
        caption.append(f"no row for task{'s' if len(omitted) > 1 else ''} {', '.join(map(str, omitted))} (not measured)")
    table.caption = " | ".join(caption)
    return table


def print_report(
    R: MatrixLike,
    summary: Optional[Mapping[str, Any]] = None,
    title: str = "Continual learning: accuracy after each task",
    console: Optional[Console] = None,
) -> None:
    """Print :func:`render_accuracy_table` with a rich console (stdout unless one is given).

    Args:
        R: accuracy matrix.
        summary: output of :func:`summarize` (computed when ``None``).
        title: the table's title.
        console: where to print; a new ``rich.console.Console()`` when ``None``.
    """
    (console or Console()).print(render_accuracy_table(R, summary, title))


def _write_csv(path: Path, matrix: np.ndarray) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([""] + [f"task {column}" for column in range(matrix.shape[1])])
        for row, values in enumerate(matrix):
            writer.writerow([f"after task {row}"] + ["" if not math.isfinite(v) else repr(float(v)) for v in values])


def _new_figure(figsize: tuple[float, float], dpi: Optional[float] = None) -> "Figure":
    """A matplotlib figure on an Agg canvas: the object-oriented API, no pyplot state, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def accuracy_heatmap(
    R: MatrixLike, summary: Optional[Mapping[str, Any]] = None, title: str = "Accuracy matrix"
) -> "Figure":
    """An annotated heatmap of ``R`` (x: "evaluated on task j", y: "after training task i").

    Unmeasured cells are grey; the title carries ACC, forgetting and BWT from ``summary``
    (computed from ``R`` when ``None``). :func:`write_report` saves it as ``accuracy_matrix.png``;
    :func:`log_figure` sends it to the loggers.
    """
    matrix = as_accuracy_matrix(R).numpy()
    summary = summarize(matrix) if summary is None else summary
    rows, columns = matrix.shape
    finite = matrix[np.isfinite(matrix)]
    top = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 100.0
    side = min(max(4.0, 0.75 * columns + 2.0), 20.0)
    figure = _new_figure((side + 1.2, min(max(3.5, 0.75 * rows + 1.8), 20.0)), dpi=120)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
    axes.set_facecolor("#e6e6e6")  # unmeasured cells
    figure.colorbar(image, ax=axes, label="accuracy")
    axes.set_xlabel("evaluated on task j")
    axes.set_ylabel("after training task i")
    step = max(1, columns // 20)
    axes.set_xticks(range(0, columns, step))
    axes.set_yticks(range(0, rows, max(1, rows // 20)))
    if rows * columns <= 400:
        size = 10 if columns <= 8 else 8
        for row in range(rows):
            for column in range(columns):
                value = matrix[row, column]
                if math.isfinite(value):
                    colour = "black" if value > 0.6 * top else "white"
                    text = f"{value:.2f}" if top == 1.0 else f"{value:.1f}"
                    axes.text(column, row, text, ha="center", va="center", color=colour, fontsize=size)
    subtitle = ", ".join(
        f"{name} {_format(summary.get(key), 3)}"
        for key, name in (("average_accuracy", "ACC"), ("forgetting", "F"), ("bwt", "BWT"))
        if key in summary
    )
    axes.set_title(f"{title}\n{subtitle}" if subtitle else title, fontsize=10)
    figure.tight_layout()
    return figure


def write_report(
    log_dir: Union[str, Path],
    R: MatrixLike,
    summary: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
    prefix: str = "",
    title: str = "Accuracy matrix",
    paths: Optional[Mapping[str, Path]] = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``accuracy_matrix.csv`` and ``accuracy_matrix.png`` into ``log_dir``.

    - ``metrics.json``: ``{"summary": {...}, "accuracy_matrix": [[...]], "extra": {...}}`` with
      ``null`` for unmeasured entries and undefined metrics;
    - ``accuracy_matrix.csv``: a header row ``,task 0,task 1,...`` then one row
      ``after task i,...`` per row of ``R`` (empty cells where not measured);
    - ``accuracy_matrix.png``: an annotated heatmap (x: "evaluated on task j",
      y: "after training task i").

    Args:
        log_dir: directory to write into (created if missing).
        R: accuracy matrix.
        summary: output of :func:`summarize` (computed when ``None``).
        extra: more JSON-serialisable values to store under ``"extra"`` (method name, config).
        prefix: prepended to each file name (for several reports in one directory).
        title: title of the heatmap.
        paths: ``{"json", "csv", "png"}`` paths to write instead (from :func:`output_paths`).

    Returns:
        ``{"json": path, "csv": path, "png": path}``.
    """
    matrix = as_accuracy_matrix(R).numpy()
    summary = summarize(matrix) if summary is None else summary
    directory = Path(log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = dict(paths) if paths is not None else {kind: directory / f"{prefix}{name}" for kind, name in REPORT_FILES.items()}
    payload = {"summary": dict(summary), "accuracy_matrix": matrix.tolist(), "extra": dict(extra or {})}
    paths["json"].write_text(json.dumps(_none_if_nan(payload), indent=2, default=str) + "\n")
    _write_csv(paths["csv"], matrix)
    accuracy_heatmap(matrix, summary, title).savefig(paths["png"])
    return paths


# ---------------------------------------------------------------------- continual-evaluation curves
def write_stability_csv(path: Union[str, Path], curves: EvalCurves) -> Path:
    """Write continual-evaluation curves as rows ``step, train_task, task, acc``.

    One row per evaluated (task, evaluation) pair, in evaluation then task order; ``train_task``
    is the task being trained at that step (the number of tasks ended strictly before it, as in
    :mod:`lightning_forget.metrics.stability`); tasks not evaluated (``NaN``) get no row.

    Returns:
        The path written.
    """
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "train_task", "task", "acc"])
        for n in range(curves.num_evals):
            step_curves = curves.upto(n + 1)
            train_task = current_task_index(step_curves)
            for task, value in enumerate(curves.acc[n].tolist()):
                if not math.isnan(value):
                    writer.writerow([int(curves.steps[n]), train_task, task, f"{value:.6f}"])
    return path


def stability_gap_figure(curves: EvalCurves, title: str = "Continual evaluation") -> "Figure":
    """Accuracy of every task against the training step, dashed grey lines at task switches.

    The stability gap (De Lange et al., "Continual evaluation for lifelong learning: Identifying
    the stability gap", ICLR 2023) shows as the dip of earlier tasks' curves right after a
    dashed line. Tasks are drawn from the step they are first evaluated (``NaN`` gaps are left
    blank).
    """
    figure = _new_figure((9, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    steps = curves.steps.numpy()
    for task in range(curves.num_tasks):
        axes.plot(steps, curves.acc[:, task].numpy(), marker=".", markersize=3, linewidth=1.2, label=f"task {task}")
    last = int(steps[-1]) if len(steps) else 0
    for end in curves.task_end_steps.tolist():
        if end < last:
            axes.axvline(end, color="grey", linestyle="--", linewidth=0.9)
    axes.set_xlabel("training step")
    axes.set_ylabel("accuracy (evaluation subsample)")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def write_stability_plot(
    path: Union[str, Path], curves: EvalCurves, title: str = "Continual evaluation"
) -> "Figure":
    """Save :func:`stability_gap_figure` as a PNG at ``path`` and return the figure (for :func:`log_figure`)."""
    figure = stability_gap_figure(curves, title)
    figure.savefig(Path(path), dpi=110)
    return figure


# ---------------------------------------------------------------------- figures to the loggers
def _figure_rgb(figure: "Figure") -> np.ndarray:
    """The rendered figure as an ``(H, W, 3)`` uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _image_route(logger: Any) -> Optional[str]:
    """How ``logger`` takes a figure: ``"tensorboard"``, ``"mlflow"``, ``"log_image"`` or ``None``."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    if isinstance(logger, TensorBoardLogger):
        return "tensorboard"
    if isinstance(logger, MLFlowLogger):
        return "mlflow"
    if callable(getattr(logger, "log_image", None)):
        return "log_image"
    return None


def log_figure(
    trainer: Any, figure: Union["Figure", Callable[[], "Figure"]], name: str, step: Optional[int] = None
) -> list[Any]:
    """Send a matplotlib figure to every logger of ``trainer`` that takes images (global rank 0 only).

    The PNG files are the record of a run; this puts the same figures where the user watches the
    run. Lightning has no logger-agnostic image call, so each kind of logger gets its own:

    - :class:`~lightning.pytorch.loggers.TensorBoardLogger`: ``experiment.add_figure(name, figure,
      global_step=step)`` (the Images tab);
    - :class:`~lightning.pytorch.loggers.MLFlowLogger`: ``experiment.log_figure(run_id, figure,
      "<name>_step<step>.png")`` (a run artifact);
    - any logger with a ``log_image(key, images, step)`` method (``WandbLogger`` and loggers
      written the same way): the rendered figure as one ``(H, W, 3)`` uint8 array;
    - others (``CSVLogger``) cannot hold images: skipped, with one debug line.

    Args:
        trainer: the Trainer whose ``loggers`` receive the figure.
        figure: a matplotlib ``Figure``, or a function that builds one (called only when some
            logger takes images, so a run without one does not pay for the drawing).
        name: the tag/key, e.g. ``"cl/accuracy_matrix"``.
        step: the step to log at; ``trainer.global_step`` when ``None``.

    Returns:
        The loggers that received the figure (empty on other ranks, or when none takes images).
    """
    if not getattr(trainer, "is_global_zero", True):
        return []
    step = int(trainer.global_step if step is None else step)
    received: list[Any] = []
    built: Optional["Figure"] = None
    for logger in trainer.loggers:
        route = _image_route(logger)
        if route is None:
            log.debug("log_figure: %s cannot hold images; %r is only in the files.", type(logger).__name__, name)
            continue
        if built is None:
            built = figure() if callable(figure) else figure
        if route == "tensorboard":
            logger.experiment.add_figure(name, built, global_step=step, close=False)
        elif route == "mlflow":
            logger.experiment.log_figure(logger.run_id, built, f"{name}_step{step}.png")
        else:
            logger.log_image(key=name, images=[_figure_rgb(built)], step=step)
        received.append(logger)
    return received


# ---------------------------------------------------------------------- unlearning (forget/retain) rows

#: Columns of an unlearning row, with their table headings (↓: lower is better).
UNLEARNING_COLUMNS = {
    "acc_f_before": "Acc_f before",
    "acc_f": "Acc_f ↓",
    "acc_r": "Acc_r ↑",
    "acc_o": "Acc_o ↓",
    "h_mean": "H ↑",
    "mia_auc": "MIA AUC",
}
UNLEARNING_FILES = {"csv": "unlearning.csv", "png": "unlearning.png"}


def render_unlearning_table(rows: Sequence[Mapping[str, Any]], title: str = "Unlearning: after each forgetting task") -> Table:
    """A rich table with one line per forgetting task: Acc_f before it, Acc_f, Acc_r, Acc_o, H-mean, MIA AUC.

    Args:
        rows: one mapping per task with the keys of :data:`UNLEARNING_COLUMNS` (missing or NaN
            values print as ``-``) and ``"task"``.
        title: the table's title.
    """
    table = Table(title=title, title_style="bold", show_lines=False)
    table.add_column("after task", style="bold", no_wrap=True)
    for heading in UNLEARNING_COLUMNS.values():
        table.add_column(heading, justify="right")
    for row in rows:
        table.add_row(str(row.get("task", "")), *(_format(_as_float(row.get(key))) for key in UNLEARNING_COLUMNS))
    return table


def _as_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def unlearning_figure(rows: Sequence[Mapping[str, Any]], title: str = "Continual forgetting") -> "Figure":
    """Acc_f, Acc_r and Acc_o (and the H-mean) after each forgetting task, as lines over the tasks."""
    figure = _new_figure((5.5, 3.5), dpi=120)
    axes = figure.add_subplot(1, 1, 1)
    tasks = [int(row.get("task", i)) for i, row in enumerate(rows)]
    for key, style in (("acc_f", "o-"), ("acc_r", "s-"), ("acc_o", "^-"), ("h_mean", "d--")):
        values = [_as_float(row.get(key)) for row in rows]
        ys = [math.nan if v is None else v for v in values]
        if any(math.isfinite(y) for y in ys):
            axes.plot(tasks, ys, style, label=UNLEARNING_COLUMNS[key].rstrip(" ↑↓"))
    axes.set_xlabel("after forgetting task")
    axes.set_ylabel("accuracy")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xticks(tasks)
    axes.legend(fontsize=8)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def write_unlearning_report(
    log_dir: Union[str, Path], rows: Sequence[Mapping[str, Any]], prefix: str = "", paths: Optional[Mapping[str, Path]] = None
) -> dict[str, Path]:
    """Write ``unlearning.csv`` (one line per task: ``task`` then the :data:`UNLEARNING_COLUMNS`
    keys, empty cells for NaN) and ``unlearning.png`` (:func:`unlearning_figure`) into ``log_dir``.

    Returns:
        ``{"csv": path, "png": path}``.
    """
    directory = Path(log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = dict(paths) if paths is not None else {kind: directory / f"{prefix}{name}" for kind, name in UNLEARNING_FILES.items()}
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", *UNLEARNING_COLUMNS])
        for row in rows:
            cells = [_as_float(row.get(key)) for key in UNLEARNING_COLUMNS]
            writer.writerow([row.get("task", "")] + ["" if v is None or not math.isfinite(v) else repr(v) for v in cells])
    unlearning_figure(rows).savefig(paths["png"])
    return paths
