"""paretoken.results.plots: the front and hypervolume history as PNG and HTML from a real Optuna study."""
from __future__ import annotations

import base64
import json
import re

import matplotlib.image
import numpy as np
import pytest

from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import Budgets
from paretoken.results import plots, query
from test_results_query import POINTS, make_study

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture()
def df(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    make_study(storage, "s", POINTS, failed=1)
    return query.load("s", storage)


def _figure(html: str) -> list[dict]:
    """The traces plotly wrote into the HTML file."""
    match = re.search(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\]),\s*\{", html, re.S)
    traces = json.loads(match.group(1))
    for trace in traces:  # plotly writes numeric arrays as {"dtype", "bdata"} (base64)
        for key, value in trace.items():
            if isinstance(value, dict) and "bdata" in value:
                trace[key] = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    return traces


def test_front_png(df, tmp_path):
    path = plots.plot_front(df, ("top1", "gflops"), tmp_path / "out" / "front.png",
                            budgets=Budgets(max_gflops=3.0, min_top1=70))
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # something is drawn


def test_front_html_has_front_presets_and_budgets(df, tmp_path):
    path = plots.plot_front(df, "top1,gflops", tmp_path / "front.html", budgets=Budgets(max_gflops=2.6))
    html = path.read_text()
    traces = {t["name"]: t for t in _figure(html)}
    front = query.front(df, budgets=Budgets(max_gflops=2.6)).sort_values("gflops")
    assert traces[f"front ({len(front)})"]["x"] == front["gflops"].tolist()
    assert sorted(traces["published presets"]["text"]) == ["evit-0.7", "tome-r13"]
    assert "uncompressed" in traces and plots._budget_lines(("top1", "gflops"), Budgets(max_gflops=2.6)) == [
        ("x", 2.6, "gflops <= 2.6")]
    assert "gflops <= 2.6" in html.replace("\\u003c", "<")  # the line's label (plotly escapes "<" in HTML)
    dominated = traces["dominated / over budget"]
    assert len(dominated["x"]) == (df["state"] == "COMPLETE").sum() - len(front)

    html = plots.plot_front(df, "top1,gflops", tmp_path / "drop.html", budgets=Budgets(max_top1_drop=2.0))\
        .read_text()
    traces = {t["name"]: t for t in _figure(html)}
    assert traces["front (3)"]["y"] == sorted(query.front(df, budgets=Budgets(max_top1_drop=2.0))["top1"].tolist())
    # the drop is drawn as a top-1 floor below the uncompressed model's top-1
    assert plots._budget_lines(("top1", "gflops"), Budgets(max_top1_drop=2.0), base_top1=80.0) == [
        ("y", 78.0, "top1_drop <= 2")]
    assert plots._budget_lines(("top1", "gflops"), Budgets(max_top1_drop=2.0)) == []  # no uncompressed trial


def test_hypervolume_history_png_and_html(df, tmp_path):
    png = plots.plot_hypervolume_history(df, ("top1", "gflops"), tmp_path / "hv.png")
    assert matplotlib.image.imread(png).shape[0] > 300
    html = plots.plot_hypervolume_history(df, ("top1", "gflops"), tmp_path / "hv.html").read_text()
    traces = {t["name"]: t for t in _figure(html)}
    expected = query.hypervolume_history(df, ("top1", "gflops"))["hypervolume"].tolist()
    assert traces["hypervolume"]["y"] == pytest.approx(expected)
    assert traces["failed trial"]["x"] == [len(POINTS)]


def test_bad_plot_requests_are_one_line(df, tmp_path):
    with pytest.raises(ParetokenError, match="valid: a file ending in .png"):
        plots.plot_front(df, path=tmp_path / "front.jpg")
    with pytest.raises(ParetokenError, match="two objectives"):
        plots.plot_front(df, ("top1",), tmp_path / "front.png")
    with pytest.raises(ParetokenError, match="no COMPLETE trial"):
        plots.plot_front(df[df["state"] == "FAIL"], path=tmp_path / "front.png")
