"""Leaderboard: loading run dirs, tables, plots, the self-contained HTML page and the paper-figure script."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest_results import make_config, make_results_tree, write_run
from kvbench.errors import KVBenchError
from kvbench.leaderboard import build_leaderboard, format_ratio, load_results, score_grid
from kvbench.leaderboard.__main__ import main
from kvbench.leaderboard.html import has_only_local_assets
from kvbench.results import variant_from_overrides

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = "smollm2-135m"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "results"
    root.mkdir()
    return root, make_results_tree(root)


@pytest.fixture
def board(tree):
    root, info = tree
    return build_leaderboard(root), info


def _row(table: pd.DataFrame, dataset: str, label: str, ratio: float) -> pd.Series:
    rows = table[(table["dataset"] == dataset) & (table["label"] == label) & (table["compression_ratio"] == ratio)]
    assert len(rows) == 1, f"expected exactly one row for {dataset}/{label}/{ratio}, got {len(rows)}"
    return rows.iloc[0]


def test_one_row_per_complete_run_and_corrupt_dirs_are_skipped(tree):
    root, info = tree
    table, skipped = load_results(root)
    assert len(table) == info["num_runs"]
    assert table["run_name"].is_unique
    skipped_names = {s.path.name for s in skipped}
    assert skipped_names == {info["corrupt"], info["incomplete"]}
    reasons = {s.path.name: s.reason for s in skipped}
    assert "metrics.json" in reasons[info["corrupt"]]
    assert "predictions.csv" in reasons[info["incomplete"]]
    # Hidden dirs are runs in progress: neither loaded nor reported.
    assert "streaming_llm" not in set(table["press"])
    assert info["hidden"] not in skipped_names


def test_table_values_match_metrics(tree):
    root, info = tree
    table, _ = load_results(root)
    for (dataset, label, ratio, query_aware), score in info["expected"].items():
        full_label = f"{label} (query-aware)" if query_aware else label
        row = _row(table, dataset, full_label, ratio)
        assert row["score"] == pytest.approx(score)
        assert bool(row["query_aware"]) is query_aware
    qa = _row(table, "ruler", "snapkv (query-aware)", 0.5)
    assert qa["press"] == "snapkv" and qa["variant"] == ""
    variant = _row(table, "ruler", "snapkv [context_length=4096]", 0.5)
    assert variant["variant"] == "context_length=4096" and not variant["query_aware"]
    snap = _row(table, "ruler", "snapkv", 0.875)
    assert snap["task:niah_single_1"] == pytest.approx(41.25)
    assert snap["task:vt"] == pytest.approx(39.25)
    assert snap["kv_bytes_after"] == pytest.approx(8 * 1024 * 1024 * 0.125)
    # prefill_seconds already holds the compression (kvbench.generation.prefill_many): nothing adds it again
    assert snap["prefill_seconds"] == pytest.approx(0.40) and snap["compression_seconds"] == pytest.approx(0.05)
    assert "prefill_compression_seconds" not in table.columns
    assert snap["ratio_label"] == "0.875"
    assert snap["higher_is_better"]
    lb = _row(table, "longbench_e", "snapkv", 0.5)
    assert (lb["bucket:0-4k words"], lb["bucket:4-8k words"], lb["bucket:8k+ words"]) == (38.0, 36.0, 33.0)
    pg = _row(table, "pg19", "snapkv", 0.875)
    assert not pg["higher_is_better"]
    assert pg["perplexity"] == pytest.approx(19.0)
    assert pg["perplexity_ratio"] == pytest.approx(19.0 / 12.5)
    assert _row(table, "ruler", "no_press", 0.0)["ratio_label"] == "0.00"
    buckets = [c for c in table.columns if c.startswith("bucket:")]
    assert buckets == ["bucket:0-4k words", "bucket:4-8k words", "bucket:8k+ words"]


def test_run_name_fallback_when_metrics_lack_identity(tmp_path):
    run = write_run(tmp_path, "ruler", MODEL, "knorm", 0.5, 50.0)
    data = json.loads((run / "metrics.json").read_text())
    for key in ("dataset", "model", "press", "compression_ratio", "variant", "query_aware"):
        data.pop(key)
    (run / "metrics.json").write_text(json.dumps(data))
    table, skipped = load_results(tmp_path)
    assert not skipped
    row = table.iloc[0]
    assert (row["dataset"], row["model"], row["press"], row["compression_ratio"]) == ("ruler", MODEL, "knorm", 0.5)


def test_metrics_without_score_or_non_mapping_config_are_skipped(tmp_path):
    bad_score = write_run(tmp_path, "ruler", MODEL, "knorm", 0.5, 50.0)
    (bad_score / "metrics.json").write_text('{"score": "n/a"}')
    bad_yaml = write_run(tmp_path, "ruler", MODEL, "snapkv", 0.5, 50.0)
    (bad_yaml / "config.yaml").write_text("model: [unclosed\n")
    table, skipped = load_results(tmp_path)
    assert table.empty
    assert {s.path.name: s.reason.split(" ")[0] for s in skipped} == {
        bad_score.name: "metrics.json",
        bad_yaml.name: "unparsable",
    }


def test_torn_identity_non_finite_score_or_count_is_skipped_with_its_reason(tmp_path):
    """Never half-read: a torn identity.json would leave the run without device, dtype and duplicate check."""
    torn = write_run(tmp_path, "ruler", MODEL, "knorm", 0.5, 50.0)
    (torn / "identity.json").write_text('{"config": ')
    nan_score = write_run(tmp_path, "ruler", MODEL, "snapkv", 0.5, 50.0)
    (nan_score / "metrics.json").write_text(json.dumps({**json.loads((nan_score / "metrics.json").read_text()), "score": float("nan")}))
    inf_count = write_run(tmp_path, "ruler", MODEL, "tova", 0.5, 50.0, extra={"truncated_samples": float("inf")})
    half = write_run(tmp_path, "ruler", MODEL, "keydiff", 0.5, 50.0, extra={"num_samples": 2.5})  # crashed the table
    old = write_run(tmp_path, "ruler", MODEL, "random", 0.5, 40.0)
    (old / "identity.json").unlink()  # a run from before identity.json: still read
    table, skipped = load_results(tmp_path)
    assert list(table["press"]) == ["random"]
    reasons = {s.path.name: s.reason for s in skipped}
    assert reasons[torn.name].startswith("unparsable identity.json")
    assert reasons[nan_score.name] == "metrics.json has no finite numeric 'score'"
    assert reasons[inf_count.name] == "metrics.json has truncated_samples=inf, not a count"
    assert reasons[half.name] == "metrics.json has num_samples=2.5, not a count"


@pytest.mark.parametrize("content", ["[1, 2]", '"abc"', "3"])
def test_an_identity_that_is_not_an_object_skips_its_run(tmp_path, content):
    """Valid JSON of another shape reached ``identity.get`` and the whole leaderboard failed with a traceback."""
    odd = write_run(tmp_path, "ruler", MODEL, "knorm", 0.5, 50.0)
    (odd / "identity.json").write_text(content)
    write_run(tmp_path, "ruler", MODEL, "snapkv", 0.5, 60.0)
    table, skipped = load_results(tmp_path)
    assert list(table["press"]) == ["snapkv"]
    assert [s.path.name for s in skipped] == [odd.name] and skipped[0].reason.startswith("unparsable identity.json")


def test_format_ratio_matches_run_names():
    assert [format_ratio(r) for r in (0.0, 0.5, 0.25, 0.875, 0.125, 0.1)] == [
        "0.00", "0.50", "0.25", "0.875", "0.125", "0.10",
    ]


def test_score_grid_is_press_by_ratio(tree):
    root, _ = tree
    table, _ = load_results(root)
    grid = score_grid(table, "ruler", MODEL)
    assert list(grid.columns) == ["0.00", "0.25", "0.50", "0.875"]
    assert list(grid.index)[0] == "no_press"
    assert set(grid.index) == {
        "no_press", "knorm", "snapkv", "snapkv (query-aware)", "snapkv [context_length=4096]",
    }
    assert grid.loc["snapkv", "0.50"] == pytest.approx(74.5)
    assert grid.loc["no_press", "0.00"] == pytest.approx(88.0)
    assert pd.isna(grid.loc["knorm", "0.00"])


def test_cli_writes_all_outputs_and_summary(tree, capsys):
    root, info = tree
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{info['num_runs']} runs" in out
    assert info["corrupt"] in out and info["incomplete"] in out
    assert info["hidden"] not in out
    target = root / "leaderboard"
    assert str(target) in out
    csv = pd.read_csv(target / "leaderboard.csv")
    assert len(csv) == info["num_runs"]
    assert {"task:niah_single_1", "bucket:8k+ words", "kv_bytes_after", "seconds_per_token"} <= set(csv.columns)
    md = (target / "leaderboard.md").read_text()
    for heading in ("## ruler / smollm2-135m", "## longbench_e / smollm2-135m", "## pg19 / smollm2-135m"):
        assert heading in md
    # Query-aware compression sees the question: another setting, so it does not compete with snapkv's 74.50.
    assert "| snapkv (query-aware) |  |  | 78.00 | 52.00 |" in md and "| **74.50** | **40.25** |" in md
    assert "Score: lower is better." in md
    # PG-19 is perplexity: the *lowest* value wins its column.
    assert "| snapkv |  | **13.75** | 19.00 |" in md
    assert "| knorm |  | 15.00 |  |" in md
    pngs = sorted(p.name for p in target.glob("*.png"))
    for expected in (
        "score__ruler__smollm2-135m.png",
        "score__pg19__smollm2-135m.png",
        "buckets__longbench_e__smollm2-135m.png",
        "speed__ruler__smollm2-135m.png",
        "memory__ruler__smollm2-135m.png",
    ):
        assert expected in pngs
    assert "buckets__ruler__smollm2-135m.png" not in pngs
    for name in pngs:
        assert (target / name).read_bytes()[:8] == PNG_MAGIC
    # A rebuild must not mistake its own output folder for a run.
    table, skipped = load_results(root)
    assert len(table) == info["num_runs"] and len(skipped) == 2


def test_plot_kinds_and_perplexity_axis(board):
    lb, _ = board
    kinds = {(p.dataset, p.kind) for p in lb.plots}
    assert ("pg19", "perplexity") in kinds and ("pg19", "score") not in kinds
    assert ("ruler", "score") in kinds and ("longbench_e", "buckets") in kinds


def test_no_press_is_a_horizontal_reference_and_variants_are_separate_lines(tree):
    from matplotlib.figure import Figure

    from kvbench.leaderboard.plots import draw_vs_ratio, line_styles

    root, _ = tree
    table, _ = load_results(root)
    block = table[table["dataset"] == "ruler"]
    ax = Figure().add_subplot()
    assert draw_vs_ratio(ax, block, "score", line_styles(table))
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"no_press", "knorm", "snapkv", "snapkv (query-aware)", "snapkv [context_length=4096]"}
    reference = lines["no_press"]
    assert list(reference.get_xdata()) == [0, 1]  # axes-fraction x: spans the whole plot
    assert list(reference.get_ydata()) == [88.0, 88.0]
    assert list(lines["snapkv (query-aware)"].get_xdata()) == [0.5, 0.875]
    assert list(lines["snapkv (query-aware)"].get_ydata()) == [78.0, 52.0]
    assert lines["snapkv"].get_color() == lines["snapkv (query-aware)"].get_color()
    assert lines["snapkv"].get_linestyle() != lines["snapkv (query-aware)"].get_linestyle()


def test_html_is_self_contained_and_complete(board):
    lb, info = board
    page = lb.html.read_text(encoding="utf-8")
    for label in ("no_press", "knorm", "snapkv", "snapkv (query-aware)", "snapkv [context_length=4096]"):
        assert f">{label}<" in page, label
    for ratio in ("0.00", "0.25", "0.50", "0.875"):
        assert f"<th>{ratio}</th>" in page, ratio
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == len(lb.plots) >= 10
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert has_only_local_assets(page)
    assert info["corrupt"] in page
    assert page.count('<td class="num best">') >= 3


def test_out_option_and_errors(tree, tmp_path, capsys):
    root, _ = tree
    custom = tmp_path / "custom"
    assert main([str(root), "--out", str(custom)]) == 0
    assert (custom / "index.html").is_file() and not (root / "leaderboard").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert capsys.readouterr().err.startswith("error: no complete runs")
    with pytest.raises(KVBenchError, match="does not exist"):
        load_results(tmp_path / "missing")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    for out in (blocked, blocked / "sub"):  # a file where the folder, or one of its parents, should be
        assert main([str(root), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot write the leaderboard to {out} (") and err.count("\n") == 1
        assert "pass --out" in err


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(board, tmp_path):
    """The page must render offline in a real browser: the header colour and the figures must show up."""
    from matplotlib.image import imread

    lb, _ = board
    shot = tmp_path / "shot.png"
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1800",
        f"--screenshot={shot}", lb.html.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, timeout=90, capture_output=True)
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (1800, 1400)
    header = pixels[10:40, 200:1200].reshape(-1, 3)
    # #1f3a5f header: proves the inline CSS was applied, not just that a page loaded.
    assert abs(header.mean(axis=0) - [0x1F / 255, 0x3A / 255, 0x5F / 255]).max() < 0.08
    body = pixels[400:].reshape(-1, 3)
    orange = ((body[:, 0] > 0.9) & (body[:, 1] > 0.4) & (body[:, 1] < 0.6) & (body[:, 2] < 0.2)).sum()
    assert orange > 200, "no plotted press line visible in the screenshot (images not rendered?)"


def test_paper_figures_script(tree, tmp_path):
    root, _ = tree
    spec = importlib.util.spec_from_file_location("paper_figures", REPO / "analysis" / "paper_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fig" / "paper.png"
    assert module.main([str(root), "--out", str(out), "--model", MODEL]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert module.main([str(root), "--out", str(out), "--model", "no-such-model"]) == 2


def _paper_figures():
    spec = importlib.util.spec_from_file_location("paper_figures", REPO / "analysis" / "paper_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_figures_label_every_drawn_column_and_row(tmp_path):
    """A model without runs of the first dataset lost its name, and a dataset no run of the first model has lost its
    title: labels went on the first row and column only, which are turned off when empty."""
    write_run(tmp_path, "longbench_e", "llama-3.1-8b", "snapkv", 0.5, 40.0)
    write_run(tmp_path, "ruler", "qwen3-8b", "snapkv", 0.5, 60.0)
    fig = _paper_figures().score_vs_ratio_grid(tmp_path)
    drawn = [ax for ax in fig.axes if ax.axison and ax.lines]
    assert sorted(ax.get_title() for ax in drawn) == ["LongBench-E", "RULER"]
    assert sorted(ax.get_ylabel().split("\n")[0] for ax in drawn) == ["llama-3.1-8b", "qwen3-8b"]


def test_paper_figures_refuse_an_out_without_a_format_or_unwritable_and_name_skipped_runs(tree, tmp_path, capsys):
    root, _ = tree
    module = _paper_figures()
    for out in (tmp_path / "fig", tmp_path / "fig.txt"):  # "fig" was written as PNG and reported as "fig"
        assert module.main([str(root), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} names no figure format; end it in one of ") and not out.exists()
    (tmp_path / "a-file").write_text("")
    assert module.main([str(root), "--out", str(tmp_path / "a-file" / "fig.pdf")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write --out {tmp_path / 'a-file' / 'fig.pdf'} (")
    assert module.main([str(root), "--out", str(tmp_path / "fig.png")]) == 0
    assert "warning: skipped" in capsys.readouterr().err  # the tree holds corrupt run directories


def test_best_is_among_runs_of_one_setting_and_full_runs_before_smoke_runs(tmp_path):
    """A quick run at another context length, or a smoke run, never outranks the leaderboard-grade runs; a press
    parameter (press.window_size) is the same benchmark and competes."""
    root = tmp_path / "results"
    full = {"num_samples": 1300, "num_samples_per_task": 100}
    write_run(root, "ruler", MODEL, "no_press", 0.0, 88.0, extra=full)
    write_run(root, "ruler", MODEL, "snapkv", 0.5, 74.0, extra=full)
    write_run(root, "ruler", MODEL, "knorm", 0.5, 60.0, extra=full)
    write_run(root, "ruler", MODEL, "knorm", 0.25, 100.0, extra={"num_samples": 13, "num_samples_per_task": 1})
    write_run(root, "ruler", MODEL, "snapkv", 0.25, 70.0, extra=full)
    write_run(root, "ruler", MODEL, "snapkv", 0.75, 66.0, extra=full, variant="press.window_size=32")
    write_run(root, "ruler", MODEL, "knorm", 0.75, 50.0, extra=full)
    write_run(root, "ruler", MODEL, "streaming_llm", 0.5, 95.0, extra=full, variant="context_length=256")
    write_run(root, "ruler", MODEL, "knorm", 0.5, 90.0, extra=full, variant="context_length=256")
    md = build_leaderboard(root).markdown.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert rows["snapkv"] == "| snapkv |  | **70.00** | **74.00** |  |"  # 0.25: the smoke knorm's 100 does not win
    assert rows["knorm"] == "| knorm |  | 100.00 § | 60.00 | 50.00 |"
    assert rows["snapkv [press.window_size=32]"] == "| snapkv [press.window_size=32] |  |  |  | **66.00** |"
    # the 256-token runs compete with each other only
    assert rows["streaming_llm [context_length=256]"].endswith("| **95.00** |  |")
    assert rows["knorm [context_length=256]"].endswith("| 90.00 |  |")


def test_smoke_runs_and_truncated_runs_are_marked(tmp_path):
    """Fewer than 50 samples per task is a smoke run: a column in the CSV, a mark in the grid and a label."""
    root = tmp_path / "results"
    write_run(root, "ruler", MODEL, "no_press", 0.0, 88.0, extra={"num_samples": 1300, "num_samples_per_task": 100})
    write_run(root, "ruler", MODEL, "snapkv", 0.5, 74.5, extra={"num_samples": 1300, "num_samples_per_task": 100})
    write_run(root, "ruler", MODEL, "knorm", 0.5, 50.0, extra={"num_samples": 26, "num_samples_per_task": 2})
    write_run(root, "longbench_e", MODEL, "snapkv", 0.5, 36.0,
              extra={"num_samples": 2600, "num_samples_per_task": 200, "truncated_samples": 7, "max_truncated_tokens": 1234})
    write_run(root, "longbench_e", MODEL, "knorm", 0.5, 30.0, extra={"num_samples": 2600, "num_samples_per_task": 200})
    # Runs written before num_samples_per_task existed: the per-task average stands in for it.
    write_run(root, "pg19", MODEL, "no_press", 0.0, 12.5, extra={"num_samples": 12})
    write_run(root, "pg19", MODEL, "snapkv", 0.5, 13.0, extra={"num_samples": 12})
    board = build_leaderboard(root)

    csv = pd.read_csv(board.csv)
    flags = {(r.dataset, r.press): (bool(r.smoke), r.num_samples_per_task, r.truncated_samples) for r in csv.itertuples()}
    assert flags[("ruler", "knorm")] == (True, 2, 0) and flags[("ruler", "snapkv")] == (False, 100, 0)
    assert flags[("longbench_e", "snapkv")] == (False, 200, 7) and flags[("longbench_e", "knorm")] == (False, 200, 0)
    assert flags[("pg19", "snapkv")] == (True, 12, 0)

    md = board.markdown.read_text()
    ruler = md.split("## ruler")[1].split("## ")[0]
    assert "| knorm |  | 50.00 § |" in ruler and "| snapkv |  | **74.50** |" in ruler  # only the smoke cell is marked
    assert "§ smoke run (1 of 3 runs): fewer than 50 samples per task (as few as 2)" in ruler
    longbench = md.split("## longbench_e")[1].split("## ")[0]
    assert "| snapkv | **36.00** † |" in longbench and "| knorm | 30.00 |" in longbench
    assert "† truncated" in longbench and "1234 tokens" in longbench and "smoke" not in longbench
    assert "## pg19 / smollm2-135m (smoke runs)" in md  # every run smoke: said in the heading, cells unmarked
    pg19 = md.split("## pg19")[1].split("## ")[0]
    assert "smoke runs: every run here has fewer than 50 samples per task (as few as 12)" in pg19 and "§" not in pg19
    assert "## ruler / smollm2-135m\n" in md and "## longbench_e / smollm2-135m\n" in md

    page = board.html.read_text(encoding="utf-8")
    assert page.count('<sup class="mark" title="smoke run">§</sup>') == 1
    assert page.count('<sup class="mark" title="prompts truncated">†</sup>') == 1
    assert page.count('<span class="badge">smoke runs</span>') == 1
    assert "<th>samples / task</th>" in page and "<th>smoke run</th>" in page and "<th>truncated</th>" in page
    assert "fewer than 50 samples per task" in page


def test_speed_columns_are_the_ones_the_runner_writes(tmp_path):
    from kvbench.leaderboard.table import SPEED_COLUMNS
    from kvbench.results import SPEED_COLUMNS as WRITTEN

    assert tuple(WRITTEN) == SPEED_COLUMNS
    speed = {column: 0.25 + i for i, column in enumerate(WRITTEN)}
    write_run(tmp_path, "ruler", MODEL, "snapkv", 0.5, 60.0, speed=speed)
    table, _ = load_results(tmp_path)
    for column, value in speed.items():
        assert table.loc[0, column] == value  # kv_kept_fraction included


def test_times_from_different_devices_are_never_drawn_as_one_comparison(tmp_path, monkeypatch):
    from kvbench.leaderboard import plots

    for press, ratio, seconds, device in (("no_press", 0.0, 0.30, "GPU A"), ("snapkv", 0.5, 0.20, "GPU A"),
                                          ("snapkv", 0.75, 0.02, "GPU B"), ("knorm", 0.5, 0.01, "GPU B"),
                                          ("tova", 0.5, 0.5, None)):  # None: written before identities named it
        write_run(tmp_path, "ruler", MODEL, press, ratio, 50.0, device_name=device,
                  speed={"seconds_per_token": seconds, "prefill_seconds": 1.0})
    table, _ = load_results(tmp_path)
    assert dict(zip(table["run_name"].str.split("__").str[2:4].str.join(" "), table["device"])) == {
        "no_press 0.00": "GPU A", "snapkv 0.50": "GPU A", "snapkv 0.75": "GPU B", "knorm 0.50": "GPU B", "tova 0.50": "cpu"}
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    assert plots._speed_figure(table, "ruler", MODEL, plots.line_styles(table), tmp_path / "speed.png")
    (fig,) = figures
    decode = {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
              for ax in fig.axes if "decoding" in ax.get_ylabel()}
    assert decode == {"GPU A": {"no_press": ([0, 1], [0.30, 0.30]), "snapkv": ([0.5], [0.20])},
                      "GPU B": {"snapkv": ([0.75], [0.02]), "knorm": ([0.5], [0.01])},
                      "cpu": {"tova": ([0.5], [0.5])}}
    assert set(plots._legend_entries(fig)[1]) == {"no_press", "snapkv", "knorm", "tova"}  # every row's lines
    one_device = table[table["device"] == "GPU B"]
    assert [device for device, _ in plots.device_rows(one_device)] == ["GPU B"]
    monkeypatch.undo()
    assert "<td>GPU B</td>" in build_leaderboard(tmp_path).html.read_text(encoding="utf-8")


def test_a_budget_run_sits_at_its_achieved_kept_fraction(tmp_path):
    speed = {"kv_kept_fraction": 0.3, "kv_bytes_after": 100}
    write_run(tmp_path, "ruler", MODEL, "snapkv", 0.5, 60.0, variant="budget=128", speed=speed, extra={"budget": 128})
    write_run(tmp_path, "ruler", MODEL, "knorm", 0.5, 50.0, speed={"kv_kept_fraction": 0.3})  # no budget: the ratio asked for
    table, _ = load_results(tmp_path)
    budget_row = table[table["press"] == "snapkv"].iloc[0]
    assert budget_row["compression_ratio"] == pytest.approx(0.7) and budget_row["configured_ratio"] == 0.5
    assert table[table["press"] == "knorm"].iloc[0]["compression_ratio"] == 0.5
    grid = score_grid(table, "ruler", MODEL)
    assert grid.loc["snapkv [budget=128]", "0.70"] == 60.0 and grid.loc["knorm", "0.50"] == 50.0


def test_budget_runs_configured_at_two_ratios_that_kept_one_fraction_share_a_cell_as_their_mean(tmp_path):
    for configured, score in ((0.5, 40.0), (0.25, 70.0)):  # a budget ignores the ratio: both keep half
        write_run(tmp_path, "ruler", MODEL, "snapkv", configured, score, variant="budget=128",
                  speed={"kv_kept_fraction": 0.5}, extra={"budget": 128})
    grid = score_grid(load_results(tmp_path)[0], "ruler", MODEL)
    assert list(grid.columns) == ["0.50"] and grid.loc["snapkv [budget=128]", "0.50"] == 55.0


def test_two_results_with_one_identity_are_flagged_not_averaged(tmp_path):
    first = write_run(tmp_path, "ruler", MODEL, "snapkv", 0.5, 60.0)
    copy = tmp_path / (first.name + "__copy")
    shutil.copytree(first, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics.update(score=20.0, run_name=copy.name)
    (copy / "metrics.json").write_text(json.dumps(metrics))
    write_run(tmp_path, "ruler", MODEL, "snapkv", 0.5, 40.0, variant="seed=7")  # another identity: its own line
    table, _ = load_results(tmp_path)
    assert set(table["duplicate_of"]) == {"", first.name}
    assert table.loc[table["run_name"] == copy.name, "duplicate_of"].item() == first.name
    grid = score_grid(table, "ruler", MODEL)
    assert grid.loc["snapkv", "0.50"] == 60.0  # not (60 + 20) / 2
    from kvbench.leaderboard.table import DUPLICATE_MARK, to_markdown

    text = to_markdown(table)
    assert re.search(rf"60\.00\** {DUPLICATE_MARK}", text) and "20.00" not in text
    assert copy.name in text and "same identity" in text
    assert text.splitlines()[2].startswith(f"2 runs (1 stored twice, shown once: {DUPLICATE_MARK}). Rows: press")
    assert f"{copy.name} = {first.name}" in build_leaderboard(tmp_path).summary()


def _renamed_copy(run: Path, suffix: str, score: float, **identity_changes) -> Path:
    """A run gathered from elsewhere under a renamed directory: same config and run_name, another identity."""
    copy = run.parent / (run.name + suffix)
    shutil.copytree(run, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    (copy / "metrics.json").write_text(json.dumps({**metrics, "score": score}))
    identity = json.loads((copy / "identity.json").read_text())
    (copy / "identity.json").write_text(json.dumps({**identity, **identity_changes}))
    return copy


def test_runs_of_other_setups_in_one_cell_are_shown_apart_not_averaged(tmp_path):
    """A result gathered from a GPU machine (or another kvbench) under a renamed directory claims the same
    (press, ratio) cell: averaged, the cell showed a number no run produced."""
    cpu = write_run(tmp_path, "ruler", MODEL, "snapkv", 0.5, 60.0)
    _renamed_copy(cpu, "-h100", 70.0, device_type="cuda", device_name="NVIDIA H100", dtype="bfloat16")
    older = write_run(tmp_path, "ruler", MODEL, "knorm", 0.5, 50.0)
    _renamed_copy(older, "-old", 90.0, kvbench_version="0.0.1")
    write_run(tmp_path, "ruler", MODEL, "tova", 0.5, 40.0)
    grid = score_grid(load_results(tmp_path)[0], "ruler", MODEL)["0.50"]
    assert grid["snapkv @ Test CPU, float32"] == 60.0 and grid["snapkv @ NVIDIA H100, bfloat16"] == 70.0
    assert grid[f"knorm @ {older.name}"] == 50.0 and grid[f"knorm @ {older.name}-old"] == 90.0
    assert grid["tova"] == 40.0 and len(grid) == 5


def test_a_copy_of_a_relabelled_run_takes_its_label_and_is_counted_once(tmp_path):
    """When a cell's runs are labelled apart by device, a second copy of one of them kept the plain label, which no
    grid row has; the HTML header counted the copy as a run of its own (the Markdown did not)."""
    cpu = write_run(tmp_path, "ruler", MODEL, "snapkv", 0.5, 60.0)
    _renamed_copy(cpu, "-h100", 70.0, device_type="cuda", device_name="NVIDIA H100", dtype="bfloat16")
    copy = tmp_path / (cpu.name + "-copy")
    shutil.copytree(cpu, copy)
    board = build_leaderboard(tmp_path)
    labels = dict(zip(board.table["run_dir"].map(lambda p: Path(p).name), board.table["label"]))
    assert labels[copy.name] == labels[cpu.name] == "snapkv @ Test CPU, float32"
    assert set(score_grid(board.table, "ruler", MODEL).index) == {"snapkv @ Test CPU, float32", "snapkv @ NVIDIA H100, bfloat16"}
    header = re.search(r"<header>.*?</header>", board.html.read_text(), re.S).group(0)
    assert "2 runs (1 stored twice, shown once" in header
    assert board.markdown.read_text().splitlines()[2].startswith("2 runs (1 stored twice, shown once")


def test_a_copied_run_is_named_by_its_directory(tmp_path):
    """A copy keeps the recorded run_name: the warning said "X = X", which no one can act on."""
    first = write_run(tmp_path, "ruler", MODEL, "snapkv", 0.5, 60.0)
    shutil.copytree(first, tmp_path / (first.name + "-copy"))
    board = build_leaderboard(tmp_path)
    assert f"{first.name}-copy = {first.name}" in board.summary()
    assert f"`{first.name}-copy` has the same identity as `{first.name}`" in board.markdown.read_text()


def test_best_compares_runs_of_one_recorded_setting_even_when_variants_are_shortened(tmp_path):
    """The setting comes from config.yaml: a long variant is shortened with a digest of every override (press
    parameters included), so its text told neither which tasks ran nor which runs ran the same ones."""
    from kvbench.leaderboard.table import block_winners, mark_grid

    tasks = "dataset.tasks=[" + ",".join(f"niah_task_number_{i}" for i in range(8)) + "]"
    other = "dataset.tasks=[" + ",".join(f"qa_task_number_{i}" for i in range(8)) + "]"
    overrides = {"snapkv": [tasks, "press.window_size=16"], "knorm": [tasks], "tova": [other]}
    scores = {"snapkv": 50.0, "knorm": 30.0, "tova": 90.0}
    for press, extra in overrides.items():
        variant = variant_from_overrides(extra)
        assert len(variant) <= 80 and "niah_task_number_7" not in variant  # shortened into a digest
        run = write_run(tmp_path, "ruler", MODEL, press, 0.5, scores[press], variant=variant)
        config = make_config("ruler", MODEL, press, 0.5)  # what Hydra records: the overrides, not the variant text
        config["dataset"]["tasks"] = yaml.safe_load(extra[0].partition("=")[2])
        if len(extra) > 1:
            config["press"]["window_size"] = 16
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    table, _ = load_results(tmp_path)
    grid = score_grid(table, "ruler", MODEL)
    winners = block_winners(table, "ruler", MODEL, grid, mark_grid(table, "ruler", MODEL))["0.50"]
    snapkv = next(label for label in grid.index if label.startswith("snapkv"))
    assert winners == {snapkv}  # tova's 90 ran other tasks; knorm ran snapkv's and loses


def test_dataset_declarations_drive_direction_and_kind(tmp_path):
    from kvbench import datasets
    from kvbench.leaderboard.table import higher_is_better, is_perplexity

    assert datasets.dataset_kind("pg19") == "perplexity" and datasets.higher_is_better("pg19") is False
    assert {datasets.dataset_kind(n) for n in ("ruler", "longbench_e", "needle")} == {"generate"}
    # a run written without the flags: the dataset module's declaration decides
    run = write_run(tmp_path, "pg19", MODEL, "knorm", 0.5, 12.0)
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["higher_is_better"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    table, _ = load_results(tmp_path)
    assert not higher_is_better(table, "pg19") and is_perplexity(table, "pg19")
    assert table.loc[0, "kind"] == "perplexity"
