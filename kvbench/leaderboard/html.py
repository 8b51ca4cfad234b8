"""A single self-contained HTML leaderboard page.

The page has to survive being e-mailed, attached to an issue or opened from a cluster scratch
directory over ``file://``: so images are inlined as base64 data URIs, the CSS is inline, and nothing
is fetched from a network or needs JavaScript.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from pathlib import Path

import pandas as pd

from kvbench.leaderboard.plots import PlotInfo
from kvbench.leaderboard.table import (
    DUPLICATE_MARK,
    NO_PRESS,
    SMOKE_MARK,
    TRUNCATED_MARK,
    SkippedRun,
    all_smoke,
    block_winners,
    blocks,
    counted_runs,
    format_ratio,
    format_score,
    higher_is_better,
    mark_grid,
    mark_legend,
    score_grid,
)
from kvbench.results import slug

_CSS = """
body { font-family: -apple-system, 'Segoe UI', 'DejaVu Sans', Arial, sans-serif; margin: 0; color: #1d2330;
       background: #f5f6f8; }
header { background: #1f3a5f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 24px; }
header p { margin: 0; opacity: .85; font-size: 14px; }
main { padding: 12px 32px 40px 32px; max-width: 1400px; }
nav { font-size: 14px; margin: 12px 0; }
nav a { margin-right: 14px; color: #1f3a5f; }
section.block { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 12px 20px 20px;
                margin: 18px 0; }
h2 { font-size: 19px; margin: 6px 0 4px; }
p.note { color: #5a6270; font-size: 13px; margin: 2px 0 10px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 14px; }
th, td { border: 1px solid #d5d9e0; padding: 4px 10px; }
th { background: #eef1f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.run code { font-size: 11px; color: #5a6270; }
table.runs td, table.runs th { padding: 3px 7px; }
td.best { background: #dff3e3; font-weight: bold; }
tr.reference td { background: #f7f7f7; font-style: italic; }
.figures { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
figure { margin: 0; border: 1px solid #e3e6eb; border-radius: 4px; padding: 6px; background: #fff;
         box-sizing: border-box; flex: 0 1 calc(50% - 7px); min-width: 360px; }
figure.wide { flex-basis: 100%; }
figure img { width: 100%; max-width: 100%; height: auto; display: block; }
figure.wide img { width: auto; }
figcaption { font-size: 12px; color: #5a6270; margin-top: 4px; }
.warning { background: #fff4e0; border: 1px solid #f0c36d; border-radius: 6px; padding: 8px 16px; }
details summary { cursor: pointer; font-weight: bold; margin: 8px 0; }
.scroll { overflow-x: auto; }
td.smoke { color: #8a8f98; }
sup.mark { color: #b5540b; font-weight: bold; margin-left: 2px; }
span.badge { font-size: 12px; font-weight: bold; border-radius: 4px; padding: 1px 7px; margin-left: 8px;
             background: #fff4e0; border: 1px solid #f0c36d; color: #7a4b00; vertical-align: middle; }
"""

_RUN_COLUMNS = (
    ("dataset", "dataset"),
    ("model", "model"),
    ("label", "press"),
    ("ratio_label", "ratio"),
    ("score", "score"),
    ("num_samples", "samples"),
    ("num_samples_per_task", "samples / task"),
    ("smoke", "smoke run"),
    ("truncated_samples", "truncated"),
    ("prefill_seconds", "prefill s"),
    ("compression_seconds", "compression s"),
    ("ttft_seconds", "TTFT s"),
    ("seconds_per_token", "s / token"),
    ("kv_bytes_after", "KV after (MiB)"),
    ("kv_kept_fraction", "KV kept"),
    ("peak_memory_bytes", "peak mem (MiB)"),
    ("device", "device"),
    ("dtype", "dtype"),
    ("duplicate_of", "same identity as"),
    ("run_name", "run directory"),
)


WIDE_KINDS = ("buckets", "speed")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def image_data_uri(path: str | Path) -> str:
    """PNG bytes as a data URI so the page carries its figures with it."""
    payload = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"data:image/png;base64,{payload}"


def _anchor(dataset: str, model: str) -> str:
    return f"{slug(dataset)}--{slug(model)}"


def _grid_html(table: pd.DataFrame, dataset: str, model: str) -> str:
    grid = score_grid(table, dataset, model)
    marks = mark_grid(table, dataset, model)
    winners = block_winners(table, dataset, model, grid, marks)
    head = "".join(f"<th>{_e(c)}</th>" for c in grid.columns)
    rows = []
    for label, values in grid.iterrows():
        cells = []
        for column in grid.columns:
            text = format_score(values[column])
            mark = marks.at[label, column] if text else ""
            css = "num best" if text and label in winners.get(column, ()) else "num"
            css += " smoke" if SMOKE_MARK in mark else ""
            tip = "; ".join(t for m, t in ((SMOKE_MARK, "smoke run"), (TRUNCATED_MARK, "prompts truncated"),
                                               (DUPLICATE_MARK, "also stored as another run directory")) if m in mark)
            sup = f'<sup class="mark" title="{_e(tip)}">{_e(mark)}</sup>' if mark else ""
            cells.append(f'<td class="{css}">{_e(text)}{sup}</td>')
        css = ' class="reference"' if str(label).startswith(NO_PRESS) else ""
        rows.append(f"<tr{css}><th scope=\"row\">{_e(label)}</th>{''.join(cells)}</tr>")
    return (
        '<div class="scroll"><table class="grid"><thead><tr><th>press \\ ratio</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _runs_html(table: pd.DataFrame) -> str:
    columns = [(c, title) for c, title in _RUN_COLUMNS if c in table.columns]
    head = "".join(f"<th>{_e(title)}</th>" for _, title in columns)
    rows = []
    for _, row in table.iterrows():
        cells = []
        for column, _title in columns:
            value = row[column]
            if column in ("kv_bytes_after", "peak_memory_bytes"):
                text = "" if pd.isna(value) else f"{value / (1024 * 1024):.2f}"
            elif column == "score" or column.endswith("seconds") or column == "seconds_per_token":
                text = "" if pd.isna(value) else (format_score(value) if column == "score" else f"{value:.4g}")
            elif column == "smoke":
                text = "smoke" if bool(value) else ""
            elif column == "kv_kept_fraction":
                text = "" if pd.isna(value) else f"{value:.3f}"
            elif column == "num_samples_per_task":
                text = "" if pd.isna(value) else f"{value:g}"
            else:
                text = "" if pd.isna(value) else str(value)
            if column == "run_name":
                cells.append(f'<td class="run"><code>{_e(text)}</code></td>')
                continue
            css = ' class="num"' if column not in ("dataset", "model", "label", "device", "dtype") else ""
            cells.append(f"<td{css}>{_e(text)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        '<div class="scroll"><table class="runs"><thead><tr>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _figure_html(info: PlotInfo) -> str:
    # Multi-panel figures get a full row so their panels stay legible.
    css = ' class="wide"' if info.kind in WIDE_KINDS else ""
    return (
        f'<figure{css}><img src="{image_data_uri(info.path)}" alt="{_e(info.title)}">'
        f"<figcaption>{_e(info.title)}</figcaption></figure>"
    )


def render_html(
    table: pd.DataFrame,
    plots: list[PlotInfo],
    skipped: list[SkippedRun] | None = None,
    title: str = "KV-cache compression leaderboard",
) -> str:
    """The whole leaderboard page as one string (callers decide where it lives)."""
    skipped = skipped or []
    pairs = blocks(table)
    generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1><p>{_e(counted_runs(table))} · "
        f"{_plural(table['dataset'].nunique() if len(table) else 0, 'dataset')} · "
        f"{_plural(table['model'].nunique() if len(table) else 0, 'model')} · generated {generated}</p></header>",
        "<main>",
    ]
    if pairs:
        links = "".join(f'<a href="#{_anchor(d, m)}">{_e(d)} / {_e(m)}</a>' for d, m in pairs)
        parts.append(f"<nav>Jump to: {links}<a href=\"#all-runs\">all runs</a></nav>")
    if skipped:
        items = "".join(f"<li><code>{_e(s.path.name)}</code>: {_e(s.reason)}</li>" for s in skipped)
        parts.append(
            f'<div class="warning"><strong>{len(skipped)} run director{"y" if len(skipped) == 1 else "ies"} '
            f"skipped (incomplete or corrupt):</strong><ul>{items}</ul></div>"
        )
    for dataset, model in pairs:
        higher = higher_is_better(table, dataset)
        ratios = sorted(table.loc[(table["dataset"] == dataset) & (table["model"] == model), "compression_ratio"])
        parts.append(f'<section class="block" id="{_anchor(dataset, model)}">')
        badge = '<span class="badge">smoke runs</span>' if all_smoke(table, dataset, model) else ""
        parts.append(f"<h2>{_e(dataset)} / {_e(model)}{badge}</h2>")
        parts.append(
            f'<p class="note">Score: {"higher" if higher else "lower"} is better. Columns are compression '
            f"ratios ({_e(', '.join(dict.fromkeys(format_ratio(r) for r in ratios)))}); "
            f"{_e(NO_PRESS)} is the uncompressed reference at 0.00. Best compressed score per ratio is "
            "highlighted.</p>"
        )
        parts.append(_grid_html(table, dataset, model))
        for line in mark_legend(table, dataset, model):
            parts.append(f'<p class="note warning">{_e(line)}</p>')
        figures = [p for p in plots if p.dataset == dataset and p.model == model]
        if figures:
            parts.append('<div class="figures">' + "".join(_figure_html(f) for f in figures) + "</div>")
        parts.append("</section>")
    if len(table):
        parts.append(
            '<section class="block" id="all-runs"><details open><summary>All runs '
            f"({len(table)})</summary>{_runs_html(table)}</details></section>"
        )
    else:
        parts.append('<p class="note">No complete runs found.</p>')
    parts.append("</main></body></html>")
    return "\n".join(parts)


def write_html(
    path: str | Path,
    table: pd.DataFrame,
    plots: list[PlotInfo],
    skipped: list[SkippedRun] | None = None,
    title: str = "KV-cache compression leaderboard",
) -> Path:
    """Write ``render_html`` to ``path`` (UTF-8) and return the path."""
    target = Path(path)
    target.write_text(render_html(table, plots, skipped, title), encoding="utf-8")
    return target


def has_only_local_assets(page: str) -> bool:
    """True when no src/href in ``page`` points at a network resource; the self-containment promise."""
    lowered = page.lower()
    return not any(marker in lowered for marker in ('src="http', "src='http", 'href="http', "href='http", "@import"))


__all__ = ["image_data_uri", "render_html", "write_html", "has_only_local_assets"]
