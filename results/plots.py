"""Draw a study's front (PNG with matplotlib, interactive HTML with plotly) and its hypervolume history.

Both functions take the table of :func:`paretoken.results.load` (or any DataFrame with its columns)
and pick the format from the file suffix: ``.png`` (also ``.svg``/``.pdf``) or ``.html``.

In the front plot the x axis is the second objective and the y axis the first (so the default
``top1,gflops`` gives accuracy against GFLOPs); every COMPLETE trial is a faded dot, the
non-dominated trials within the budgets are joined in order, published presets are stars with
their names, the uncompressed model is a black cross, and budget lines are dashed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import CATALOG, Budgets
from paretoken.outputs import PLOT_SUFFIXES, check_suffix
from paretoken.results import query

LABELS = {name: metric.label for name, metric in CATALOG.items()} | {"duration_s": "trial duration (s)"}
FRONT_COLOR = "#d62728"
PRESET_COLOR = "#1f77b4"


def _budget_lines(objectives: Sequence[str], budgets: Budgets | None, base_top1: float | None = None):
    """(axis 'x'|'y', value, label) for each budget on a plotted objective; ``max_top1_drop`` is
    drawn as a top-1 floor that many points below ``base_top1`` (the uncompressed model's)."""
    axes = {objectives[1]: "x", objectives[0]: "y"}
    lines = []
    budgets = budgets or Budgets()
    labels = budgets.labels()
    for name, metric, _, value in budgets.bounds():
        if metric == "top1_drop":
            if base_top1 is None:
                continue
            metric, value = "top1", base_top1 - value
        if metric in axes:
            lines.append((axes[metric], value, labels[name]))
    return lines


def _parts(df: pd.DataFrame, objectives, budgets: Budgets | None):
    objectives = query._check_objectives(objectives, df)
    if len(objectives) < 2:
        raise ParetokenError("plot: needs at least two objectives (the first is drawn on y, the second on x)")
    x, y = objectives[1], objectives[0]
    done = df[(df["state"] == "COMPLETE") & df[x].notna() & df[y].notna()]
    if "full_fidelity" in done.columns:  # successive halving: plans stopped below the full rung are not drawn
        done = done[done["full_fidelity"]]
    fr = query.front(df, objectives, budgets).sort_values(x)
    rest = done.drop(index=fr.index)
    presets = query.preset_rows(done) if "preset" in done.columns else done.iloc[:0]
    base = query.uncompressed_rows(done)
    return objectives, x, y, done, fr, rest, presets, base


def _title(df: pd.DataFrame, fr: pd.DataFrame, done: pd.DataFrame, title: str | None) -> str:
    if title:
        return title
    name = df.attrs.get("study")
    failed = int((df["state"] == "FAIL").sum()) if "state" in df else 0
    return (f"{'study ' + name + ': ' if name else ''}{len(done)} trials, {len(fr)} on the front"
            + (f", {failed} failed" if failed else ""))


def plot_front(df: pd.DataFrame, objectives: Sequence[str] | str = query.DEFAULT_OBJECTIVES,
               path: str | Path = "front.png", budgets: Budgets | None = None, title: str | None = None) -> Path:
    """Draw the front of ``df`` on ``objectives`` to ``path`` (.png/.svg/.pdf or .html); returns the path.

    With more than two objectives the front is non-dominated on all of them and drawn on the first two.
    The front is taken within ``budgets``, which are drawn as lines where they bound a plotted objective.
    """
    suffix = check_suffix("plot", path, PLOT_SUFFIXES)
    objectives, x, y, done, fr, rest, presets, base = _parts(df, objectives, budgets)
    if done.empty:
        raise ParetokenError("plot: the study has no COMPLETE trial with " + " and ".join((y, x)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heading = _title(df, fr, done, title)
    base_top1 = float(base["top1"].iloc[0]) if len(base) and "top1" in base else None
    lines = _budget_lines(objectives, budgets, base_top1)
    if suffix == ".html":
        _front_html(df, x, y, fr, rest, presets, base, lines, heading, path)
    else:
        _front_static(x, y, fr, rest, presets, base, lines, heading, path)
    return path


def _front_static(x, y, fr, rest, presets, base, budgets, heading, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    ax.scatter(rest[x], rest[y], s=18, color="0.55", alpha=0.35, linewidths=0, label="dominated / over budget")
    ax.plot(fr[x], fr[y], "-o", color=FRONT_COLOR, ms=5, lw=1.5, label=f"front ({len(fr)})", zorder=3)
    if len(presets):
        ax.scatter(presets[x], presets[y], marker="*", s=130, color=PRESET_COLOR, edgecolors="white",
                   linewidths=0.5, label="published presets", zorder=4)
        _label_points(ax, fig, presets[x].to_numpy(float), presets[y].to_numpy(float), list(presets["preset"]),
                      np.vstack([rest[[x, y]].to_numpy(float), base[[x, y]].to_numpy(float),
                                 _along(fr[x].to_numpy(float), fr[y].to_numpy(float))]))
    if len(base):
        ax.scatter(base[x], base[y], marker="X", s=70, color="black", label="uncompressed", zorder=5)
    for axis, value, label in budgets:
        line = ax.axvline if axis == "x" else ax.axhline
        line(value, ls="--", lw=1, color="0.3")
        if axis == "x":
            ax.annotate(label, (value, 0.02), xycoords=("data", "axes fraction"), xytext=(3, 0),
                        textcoords="offset points", fontsize=8, color="0.3", rotation=90, va="bottom")
        else:
            ax.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), xytext=(0, 3),
                        textcoords="offset points", fontsize=8, color="0.3")
    ax.set_xlabel(LABELS.get(x, x) + (" (lower is better)" if not query.MAXIMIZE[x] else " (higher is better)"))
    ax.set_ylabel(LABELS.get(y, y) + (" (higher is better)" if query.MAXIMIZE[y] else " (lower is better)"))
    _finish(fig, ax, heading, path)


def _finish(fig, ax, heading: str, path: Path) -> None:
    """Title, grid and legend on ``ax``; ``fig`` written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    ax.set_title(heading, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _along(xs: np.ndarray, ys: np.ndarray, per_segment: int = 12) -> np.ndarray:
    """Points along the polyline through (xs, ys), so labels keep off the front line too."""
    if len(xs) < 2:
        return np.column_stack([xs, ys])
    t = np.linspace(0.0, 1.0, per_segment)[:, None]
    return np.vstack([np.column_stack([x0 + t[:, 0] * (x1 - x0), y0 + t[:, 0] * (y1 - y0)])
                      for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:])])


def _label_points(ax, fig, xs, ys, names, others) -> None:
    """Name each (x, y) point with a label placed where it overlaps no other label nor marker.

    Greedy in display space, points left to right: offsets around the point, nearest first, where
    the label also sits nearer its own point than any other named point; failing that, the nearest
    free place farther out, tied to its point by a thin leader line.
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    own = to_px(np.column_stack([xs, ys]))
    markers = np.vstack([to_px(others), own]) if len(others) else own
    frame = ax.get_window_extent()
    boxes: list[tuple[float, float, float, float]] = []
    scale = fig.dpi / 72.0

    def box_distance(points: np.ndarray, x0, y0, x1, y1) -> np.ndarray:
        dx = np.maximum(np.maximum(x0 - points[:, 0], 0), points[:, 0] - x1)
        dy = np.maximum(np.maximum(y0 - points[:, 1], 0), points[:, 1] - y1)
        return np.hypot(dx, dy)

    def free(x0, y0, x1, y1, i, strict: bool) -> bool:
        if x0 < frame.x0 or x1 > frame.x1 or y0 < frame.y0 or y1 > frame.y1:
            return False
        if strict:  # nearer its own point than any other named point, so it cannot be misread
            dist = box_distance(own, x0, y0, x1, y1)
            if len(dist) > 1 and np.min(np.delete(dist, i)) <= dist[i] + 8 * scale:
                return False
        if any(x0 < bx1 and bx0 < x1 and y0 < by1 and by0 < y1 for bx0, by0, bx1, by1 in boxes):
            return False
        return not ((markers[:, 0] > x0 - 4) & (markers[:, 0] < x1 + 4)
                    & (markers[:, 1] > y0 - 4) & (markers[:, 1] < y1 + 4)).any()

    def candidates(w: float, h: float, distances):
        for dist in distances:
            d = dist * scale
            for dx, dy in ((d, d * 0.3), (d, -d * 0.3 - h), (-d - w, d * 0.3), (-d - w, -d * 0.3 - h),
                           (-w / 2, d), (-w / 2, -d - h), (d, -h / 2), (-d - w, -h / 2)):
                yield dx, dy, dist

    for i in np.argsort(xs):
        text = ax.text(0, 0, names[i], fontsize=8)
        bbox = text.get_window_extent(renderer)
        text.remove()
        w, h = bbox.width, bbox.height
        px, py = own[i]
        choice, leader = None, False
        for strict, distances in ((True, (7, 16, 28)), (False, (28, 42, 58, 80, 110, 150))):
            choice = next(((dx, dy) for dx, dy, dist in candidates(w, h, distances)
                           if free(px + dx, py + dy, px + dx + w, py + dy + h, i, strict)), None)
            if choice:
                leader = not strict
                break
        dx, dy = choice or (7 * scale, 2 * scale)
        boxes.append((px + dx, py + dy, px + dx + w, py + dy + h))
        ax.annotate(names[i], (xs[i], ys[i]), xytext=(dx / scale, dy / scale), textcoords="offset points",
                    fontsize=8, color=PRESET_COLOR, zorder=5,
                    arrowprops=dict(arrowstyle="-", color=PRESET_COLOR, lw=0.6, alpha=0.7, shrinkA=0, shrinkB=4)
                    if leader else None)


def _hover(rows: pd.DataFrame, x: str, y: str) -> list[str]:
    out = []
    for _, r in rows.iterrows():
        name = f" [{r['preset']}]" if "preset" in r and isinstance(r["preset"], str) else ""
        out.append(f"trial {r['number']}{name}<br>{y} {r[y]:.4g}, {x} {r[x]:.4g}<br>{r.get('plan_str', '')}")
    return out


def _front_html(df, x, y, fr, rest, presets, base, budgets, heading, path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=rest[x], y=rest[y], mode="markers", name="dominated / over budget",
                             marker=dict(color="rgba(120,120,120,0.35)", size=7), hovertext=_hover(rest, x, y),
                             hoverinfo="text"))
    fig.add_trace(go.Scatter(x=fr[x], y=fr[y], mode="lines+markers", name=f"front ({len(fr)})",
                             line=dict(color=FRONT_COLOR), marker=dict(size=8), hovertext=_hover(fr, x, y),
                             hoverinfo="text"))
    if len(presets):
        fig.add_trace(go.Scatter(x=presets[x], y=presets[y], mode="markers+text", name="published presets",
                                 text=presets["preset"], textposition="top right",
                                 marker=dict(symbol="star", size=14, color=PRESET_COLOR),
                                 hovertext=_hover(presets, x, y), hoverinfo="text"))
    if len(base):
        fig.add_trace(go.Scatter(x=base[x], y=base[y], mode="markers", name="uncompressed",
                                 marker=dict(symbol="x", size=11, color="black"), hovertext=_hover(base, x, y),
                                 hoverinfo="text"))
    for axis, value, label in budgets:
        if axis == "x":
            fig.add_vline(x=value, line_dash="dash", line_color="gray", annotation_text=label)
        else:
            fig.add_hline(y=value, line_dash="dash", line_color="gray", annotation_text=label)
    fig.update_layout(title=heading, xaxis_title=LABELS.get(x, x), yaxis_title=LABELS.get(y, y),
                      template="plotly_white", hovermode="closest")
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def plot_hypervolume_history(df: pd.DataFrame, objectives: Sequence[str] | str = query.DEFAULT_OBJECTIVES,
                             path: str | Path = "hypervolume.png",
                             reference: Mapping[str, float] | Sequence[float] | None = None,
                             title: str | None = None) -> Path:
    """Hypervolume after each trial (trial-number order) to ``path`` (.png/.svg/.pdf or .html).

    The enqueued presets come first in a study, so the curve starts at the presets' hypervolume
    and any rise after them is what the search found. Failed trials are marked on the x axis.
    """
    suffix = check_suffix("plot", path, PLOT_SUFFIXES)
    objectives = query._check_objectives(objectives, df)
    if reference is None:
        reference = query.reference_point(df, objectives)
    history = query.hypervolume_history(df, objectives, reference)
    if history.empty:
        raise ParetokenError("plot: the study has no trials")
    ref = reference if isinstance(reference, Mapping) else dict(zip(objectives, reference))
    ref_text = ", ".join(f"{k} {v:.4g}" for k, v in ref.items())
    heading = title or (f"{'study ' + df.attrs['study'] + ': ' if df.attrs.get('study') else ''}hypervolume "
                        f"of {' x '.join(objectives)} (reference {ref_text})")
    failed = history[history["state"] == "FAIL"]
    is_preset = (df.set_index("number")["preset"].reindex(history["number"]).notna().to_numpy()
                 if "preset" in df.columns else np.zeros(len(history), dtype=bool))
    presets = history[is_preset & (history["state"] == "COMPLETE").to_numpy()]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".html":
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(x=history["number"], y=history["hypervolume"], mode="lines", line_shape="hv",
                                   name="hypervolume", line=dict(color=FRONT_COLOR)))
        if len(presets):
            fig.add_trace(go.Scatter(x=presets["number"], y=presets["hypervolume"], mode="markers",
                                     name="preset trial", marker=dict(symbol="star", size=11, color=PRESET_COLOR)))
        if len(failed):
            fig.add_trace(go.Scatter(x=failed["number"], y=failed["hypervolume"], mode="markers",
                                     name="failed trial", marker=dict(symbol="x", color="black")))
        fig.update_layout(title=heading, xaxis_title="trial", yaxis_title="hypervolume", template="plotly_white")
        fig.write_html(str(path), include_plotlyjs=True, full_html=True)
        return path
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.step(history["number"], history["hypervolume"], where="post", color=FRONT_COLOR, lw=1.8, label="hypervolume")
    if len(presets):
        ax.plot(presets["number"], presets["hypervolume"], "*", color=PRESET_COLOR, ms=10, label="preset trial")
    if len(failed):
        ax.plot(failed["number"], failed["hypervolume"], "x", color="black", ms=6, label="failed trial")
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume (" + " x ".join(objectives) + ")")
    _finish(fig, ax, heading, path)
    return path


__all__ = ["plot_front", "plot_hypervolume_history"]
