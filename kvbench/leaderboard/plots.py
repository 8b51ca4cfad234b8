"""Leaderboard figures: every metric is drawn against compression ratio, one line per press label.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas) instead of pyplot so that building a
leaderboard never opens a window, never depends on the process-wide backend and leaks no global figures
when called from a long-lived process (the harness, a notebook, a sweep callback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from kvbench.leaderboard.table import NO_PRESS, block_rows, blocks, bucket_columns, format_ratio, higher_is_better, is_perplexity
from kvbench.results import slug

RATIO_AXIS = "compression ratio (fraction of KV cache removed)"
MIB = 1024 * 1024
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


class PlotInfo(NamedTuple):
    """Where a figure went and what it shows, so the HTML page and W&B can caption it."""

    kind: str
    dataset: str
    model: str
    title: str
    path: Path


class LineStyle(NamedTuple):
    color: str
    linestyle: str
    marker: str


def line_styles(table: pd.DataFrame) -> dict[str, LineStyle]:
    """Colour by press and dash by query-aware/variant, fixed across all figures.

    Keeping one press one colour everywhere lets a reader compare figures at a glance, and making the
    query-aware twin the same colour but dashed shows it is the same method under a different setting.
    """
    import matplotlib

    palette = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["Dark2"].colors)
    presses = [p for p in dict.fromkeys(table["press"]) if p != NO_PRESS]
    colors = {p: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, p in enumerate(sorted(presses))}
    colors[NO_PRESS] = "#222222"
    styles: dict[str, LineStyle] = {}
    settings: dict[str, list[tuple[bool, str]]] = {}
    for press, query_aware, variant, label in (
        table[["press", "query_aware", "variant", "label"]].drop_duplicates("label").itertuples(index=False)
    ):
        slots = settings.setdefault(press, [])
        key = (bool(query_aware), str(variant))
        if key not in slots:
            slots.append(key)
        index = slots.index(key)
        styles[label] = LineStyle(
            colors[press],
            _LINESTYLES[index % len(_LINESTYLES)],
            _MARKERS[(sorted(colors).index(press) + index) % len(_MARKERS)],
        )
    return styles


def draw_vs_ratio(ax: Axes, block: pd.DataFrame, value: str, styles: dict[str, LineStyle], scale: float = 1.0) -> bool:
    """Draw ``value`` vs ratio, one line per label; no_press becomes a horizontal reference line.

    Public so analysis scripts draw exactly the same lines as the leaderboard. Returns whether anything
    was drawn (a block may have no data for a metric).
    """
    drawn = False
    ratios: set[float] = set()
    for label, rows in block.groupby("label", sort=False):
        series = rows.groupby("compression_ratio")[value].mean().dropna().sort_index() / scale
        if series.empty:
            continue
        style = styles[label]
        if rows["press"].iloc[0] == NO_PRESS:
            ax.axhline(series.mean(), color=style.color, linestyle=style.linestyle, linewidth=1.4, label=label)
        else:
            ratios.update(series.index)
            ax.plot(
                series.index,
                series.values,
                color=style.color,
                linestyle=style.linestyle,
                marker=style.marker,
                markersize=5,
                linewidth=1.6,
                label=label,
            )
        drawn = True
    ticks = sorted(ratios)
    if ticks:
        ax.set_xticks(ticks, [format_ratio(t) for t in ticks])
        pad = max(0.03, (ticks[-1] - ticks[0]) * 0.05)
        ax.set_xlim(ticks[0] - pad, ticks[-1] + pad)
    else:
        ax.set_xlim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    return drawn


def _from_zero(ax: Axes) -> None:
    # Costs read honestly only against zero; the 5% headroom keeps the top markers from being clipped.
    ax.set_ylim(0, ax.get_ylim()[1] * 1.05)


def _maybe_log(ax: Axes, block: pd.DataFrame, value: str) -> None:
    # Aggressive compression can blow perplexity up by orders of magnitude; a log axis keeps the mild
    # ratios readable instead of flattening them against the x axis.
    values = block[value].dropna()
    values = values[values > 0]
    if len(values) and values.max() / values.min() > 10:
        ax.set_yscale("log")


def _legend_entries(fig: Figure) -> tuple[list, list[str]]:
    """Every line of every panel once: a label may have no data in the first panel (a length bucket it did not
    reach, a device it did not run on)."""
    entries: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return list(entries.values()), list(entries)


def _save(fig: Figure, path: Path) -> Path:
    handles, labels = _legend_entries(fig)
    if handles:
        if max(len(label) for label in labels) <= 32:
            fig.legend(handles, labels, loc="outside right center", frameon=False, fontsize=9)
        else:
            # Long variant labels beside the axes would squeeze them to nothing: list them underneath and
            # grow the figure by one text line per entry instead.
            width, height = fig.get_size_inches()
            fig.set_size_inches(max(width, 7.5), height + 0.19 * len(labels))
            fig.legend(handles, labels, loc="outside lower center", frameon=False, fontsize=8, ncols=1)
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    return path


def _score_figure(block: pd.DataFrame, dataset: str, model: str, perplexity: bool, higher: bool, styles, path: Path) -> PlotInfo | None:
    value = "perplexity" if "perplexity" in block and block["perplexity"].notna().any() else "score"
    fig = Figure(layout="constrained", figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    if not draw_vs_ratio(ax, block, value, styles):
        return None
    ax.set_xlabel(RATIO_AXIS)
    if perplexity:
        ax.set_ylabel("perplexity (lower is better)" if value == "perplexity" else f"score ({'higher' if higher else 'lower'} is better)")
        _maybe_log(ax, block, value)
        title = f"{dataset} perplexity vs compression ratio — {model}"
    else:
        ax.set_ylabel(f"score ({'higher' if higher else 'lower'} is better)")
        title = f"{dataset} score vs compression ratio — {model}"
    ax.set_title(title, fontsize=11)
    return PlotInfo("perplexity" if perplexity else "score", dataset, model, title, _save(fig, path))


def _bucket_figure(block: pd.DataFrame, dataset: str, model: str, styles, path: Path) -> PlotInfo | None:
    buckets = [c for c in bucket_columns(block) if block[c].notna().any()]
    if not buckets:
        return None
    fig = Figure(layout="constrained", figsize=(3.6 * len(buckets) + 1.0, 3.8))
    axes = fig.subplots(1, len(buckets), sharey=True, squeeze=False)[0]
    for ax, column in zip(axes, buckets):
        draw_vs_ratio(ax, block, column, styles)
        ax.set_title(f"context {column.split(':', 1)[1]}", fontsize=10)  # the label carries its unit
        ax.set_xlabel("compression ratio")
    axes[0].set_ylabel("score (higher is better)")
    title = f"{dataset} per length bucket — {model}"
    fig.suptitle(title, fontsize=11)
    return PlotInfo("buckets", dataset, model, title, _save(fig, path))


def _speed_figure(block: pd.DataFrame, dataset: str, model: str, styles, path: Path) -> PlotInfo | None:
    """Times against ratio, one row of panels per device: times of two GPUs (or a GPU and a CPU) are never
    averaged into one point or drawn as one comparison."""
    panels = [
        ("prefill_seconds", "prefill, compression included (s)", "lower is better"),  # the runner's prefill_seconds holds both
        ("seconds_per_token", "decoding seconds / token", "lower is better"),
    ]
    panels = [p for p in panels if p[0] in block and block[p[0]].notna().any()]
    if not panels:
        return None
    devices = device_rows(block)
    fig = Figure(layout="constrained", figsize=(4.2 * len(panels) + 1.0, 3.4 * len(devices) + 0.4))
    grid = fig.subplots(len(devices), len(panels), squeeze=False)
    for axes, (device, rows) in zip(grid, devices):
        for ax, (column, ylabel, direction) in zip(axes, panels):
            draw_vs_ratio(ax, rows, column, styles)
            ax.set_ylabel(f"{ylabel} ({direction})")
            ax.set_xlabel("compression ratio")
            _from_zero(ax)
            if len(devices) > 1:
                ax.set_title(device or "device not recorded", fontsize=9)
    title = f"Speed — {dataset} / {model}"
    fig.suptitle(title, fontsize=11)
    return PlotInfo("speed", dataset, model, title, _save(fig, path))


def device_rows(block: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``(device, its runs)`` in name order ("" for runs that do not say)."""
    devices = block["device"].fillna("") if "device" in block else pd.Series("", index=block.index)
    return [(str(device), rows) for device, rows in block.groupby(devices, sort=True)]


def _memory_figure(block: pd.DataFrame, dataset: str, model: str, styles, path: Path) -> PlotInfo | None:
    if "kv_bytes_after" not in block or not block["kv_bytes_after"].notna().any():
        return None
    fig = Figure(layout="constrained", figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    draw_vs_ratio(ax, block, "kv_bytes_after", styles, scale=MIB)
    ax.set_xlabel(RATIO_AXIS)
    ax.set_ylabel("KV cache after compression (MiB, lower is better)")
    _from_zero(ax)
    title = f"KV-cache memory — {dataset} / {model}"
    ax.set_title(title, fontsize=11)
    return PlotInfo("memory", dataset, model, title, _save(fig, path))


def make_plots(table: pd.DataFrame, out_dir: str | Path) -> list[PlotInfo]:
    """Write every leaderboard PNG into ``out_dir``; figures with no data to show are not written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if table.empty:
        return []
    styles = line_styles(table)
    made: list[PlotInfo] = []
    for dataset, model in blocks(table):
        block = block_rows(table, dataset, model)  # a second copy of one identity is not a second measurement
        stem = f"{slug(dataset)}__{slug(model)}"
        candidates = [
            _score_figure(block, dataset, model, is_perplexity(table, dataset), higher_is_better(table, dataset), styles, out / f"score__{stem}.png"),
            # Single-panel figures first so the HTML page can pair them side by side.
            _memory_figure(block, dataset, model, styles, out / f"memory__{stem}.png"),
            _bucket_figure(block, dataset, model, styles, out / f"buckets__{stem}.png"),
            _speed_figure(block, dataset, model, styles, out / f"speed__{stem}.png"),
        ]
        made.extend(info for info in candidates if info is not None)
    return made

