"""Tables, files and figures of unlearning results (UA, RA, TA, MIA-efficacy, MIA AUC, Avg. Gap).

Used by :class:`~lightning_forget.callbacks.UnlearningEvaluation` (one run), the sweep helper
and the benchmark (several methods). No Lightning.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from rich.table import Table

__all__ = ["METRIC_COLUMNS", "gap_bar_chart", "render_table", "write_rows"]

#: Metric key → column heading (values are fractions; tables print them × 100).
METRIC_COLUMNS = {
    "ua": "UA",
    "ra": "RA",
    "ta": "TA",
    "mia_efficacy": "MIA-eff.",
    "mia_auc": "MIA AUC",
    "avg_gap": "Avg. Gap ↓",
}


def _cell(value: Any, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, str):
        return value
    return f"{100 * float(value):.2f}" if percent else f"{float(value):.4g}"


def render_table(rows: Sequence[Mapping[str, Any]], title: str = "Unlearning", label_keys: Sequence[str] = ("task", "epoch"),
                 extra: Sequence[str] = ()) -> Table:
    """A rich table: the label columns, then the metrics of :data:`METRIC_COLUMNS` in percent, then ``extra``."""
    table = Table(title=title, title_style="bold")
    for key in label_keys:
        table.add_column(key, style="bold", no_wrap=True)
    metrics = [k for k in METRIC_COLUMNS if any(k in row for row in rows)]
    for key in metrics:
        table.add_column(METRIC_COLUMNS[key] + " %", justify="right")
    for key in extra:
        table.add_column(key, justify="right")
    for row in rows:
        labels = [str(row.get(k, "")) for k in label_keys]
        table.add_row(*labels, *(_cell(row.get(k)) for k in metrics), *(_cell(row.get(k), percent=False) for k in extra))
    return table


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_rows(
    directory: Union[str, Path], rows: Sequence[Mapping[str, Any]], stem: str = "unlearning_metrics",
    paths: Optional[Mapping[str, Path]] = None,
) -> dict[str, Path]:
    """Write ``<stem>.csv`` and ``<stem>.json`` (one record per row; NaN as empty / ``null``), or
    the files ``paths`` names (``{"csv": ..., "json": ...}``, e.g. from
    :func:`lightning_forget.reporting.output_paths`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    paths = dict(paths) if paths is not None else {"csv": directory / f"{stem}.csv", "json": directory / f"{stem}.json"}
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(keys)
        for row in rows:
            writer.writerow(["" if _plain(row.get(k)) is None else row.get(k) for k in keys])
    paths["json"].write_text(json.dumps([{k: _plain(v) for k, v in row.items()} for row in rows], indent=2))
    return paths


def gap_bar_chart(gaps: Mapping[str, Union[float, Sequence[float]]], path: Union[str, Path],
                  title: str = "Avg. Gap to retraining (points, lower is better)", ylabel: Optional[str] = None) -> Path:
    """A bar chart PNG of each method's gap (a number, or several seeds: mean with a min–max bar)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = list(gaps)
    values = [[float(v)] if isinstance(v, (int, float)) else [float(x) for x in v] for v in gaps.values()]
    means = [sum(v) / len(v) for v in values]
    low = [m - min(v) for m, v in zip(means, values)]
    high = [max(v) - m for m, v in zip(means, values)]
    figure = Figure(figsize=(max(4.0, 0.8 * len(names) + 1.5), 3.2), dpi=120)
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(range(len(names)), means, yerr=[low, high], capsize=3, color="#4c72b0")
    axes.set_xticks(range(len(names)))
    axes.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel(ylabel or "Avg. Gap")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
