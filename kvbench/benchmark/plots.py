"""The two speed-benchmark figures, drawn from its CSV rows (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

MIB = 2**20
# Presses often store exactly the same bytes at a ratio: shrinking markers and distinct dashes keep every line visible.
STYLES = [("o", 9, "-"), ("s", 7, "--"), ("^", 6, "-."), ("D", 4, ":"), ("v", 4, "-"), ("x", 6, "--")]


def _title(df: pd.DataFrame) -> str:
    first = df.iloc[0]
    return f"{first['model']} | {first['device_name']} | {first['dtype']} | {first['decode_tokens']} decoded tokens"


def plot_decode(df: pd.DataFrame, path: Path) -> None:
    """Decode ms/token vs context length: one panel per press, one line per ratio."""
    presses = list(dict.fromkeys(df["press"]))
    fig, axes = plt.subplots(1, len(presses), figsize=(4.2 * len(presses), 3.6), sharey=True, squeeze=False)
    for ax, press in zip(axes[0], presses):
        rows = df[df["press"] == press]
        for ratio, line in rows.groupby("ratio"):
            line = line.sort_values("context_length")
            ax.plot(line["context_length"], line["decode_ms_per_token"], marker="o", label=f"r = {ratio:g}")
        ax.set_title(press)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("decode ms / token")
    fig.suptitle(_title(df), fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_cache(df: pd.DataFrame, path: Path) -> None:
    """Cache MiB vs ratio: one panel per context length, one line per press, the uncompressed cache dashed."""
    lengths = sorted(df["context_length"].unique())
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        rows = df[df["context_length"] == length]
        for i, (press, line) in enumerate(rows.groupby("press", sort=False)):
            line = line.sort_values("ratio")
            marker, size, dash = STYLES[i % len(STYLES)]
            ax.plot(line["ratio"], line["kv_bytes"] / MIB, marker=marker, markersize=size, linestyle=dash, label=press)
        ax.axhline(rows["kv_bytes_uncompressed"].max() / MIB, color="grey", linestyle="--", label="uncompressed")
        ax.set_title(f"context {length}")
        ax.set_xlabel("compression ratio r")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("cache MiB after prefill")
    fig.suptitle(_title(df), fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    """Draw into a temporary file beside ``path`` and move it in place: a reader never sees half a PNG."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(temporary, dpi=120, format=path.suffix.lstrip(".") or "png")
        os.replace(temporary, path)
    finally:
        plt.close(fig)
        temporary.unlink(missing_ok=True)
