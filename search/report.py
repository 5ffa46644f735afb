"""What a search prints: a progress line per finished trial and the front whenever it changes
(:class:`Progress`), and at the end the counts, hypervolume, the Pareto front table and how many
presets a searched plan dominates (:func:`final_report`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from paretoken.evaluators.metrics import DIRECTIONS, HEADLINE, format_metric
from paretoken.search import halving, pareto, record
from paretoken.search import study as st


def fmt(value: Any) -> str:
    """A duration or hypervolume for a progress line: 4 significant digits, ``n/a`` when not finite."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"


class Progress:
    """The progress lines of one search process; remembers the reference point and the front it
    printed last."""

    def __init__(self, study, objectives: Sequence[str], n_trials: int, log: Callable[[str], None],
                 rungs: Sequence[int] | None = None) -> None:
        self.study, self.objectives, self.n_trials, self.log = study, objectives, n_trials, log
        self.rungs = rungs  # successive halving: images per rung
        self.reference: dict[str, float] | None = None
        self.front: list[int] = []  # trial numbers on the front at the last progress line

    def trial_finished(self, trial, metrics: dict[str, Any], error: str | None, result: dict[str, Any]) -> None:
        """One line for ``trial`` (its objectives or error, the study's counts, front size and
        hypervolume), and the front when it changed."""
        c = st.counts(self.study)
        if self.reference is None:
            self.reference = pareto.reference_point(pareto.baseline(self.study), self.objectives)
        front = pareto.front_trials(self.study)
        hv = pareto.hypervolume(front, self.objectives, self.reference)
        attrs = trial.user_attrs
        what = ("FAIL  " + error) if error else "COMPLETE " + "  ".join(
            f"{o} {format_metric(o, metrics.get(o))}" for o in self.objectives)
        extra = f" [{attrs[record.PRESET]}]" if attrs.get(record.PRESET) else ""
        if attrs.get(record.SAME_PLAN_AS) is not None:
            extra += f" [same plan as trial {attrs[record.SAME_PLAN_AS]}: its values, not measured again]"
        if attrs.get(record.RETRY_OF) is not None:
            extra += f" [re-run of trial {attrs[record.RETRY_OF]}]"
        rungs = ""
        if self.rungs:
            if not error and attrs.get(record.IMAGES, self.rungs[-1]) < self.rungs[-1]:
                extra += f" [stopped at {attrs[record.IMAGES]} of {self.rungs[-1]} images]"
            reached = halving.rung_counts(self.study.get_trials(deepcopy=False), self.rungs)
            rungs = ", rungs " + " ".join(f"{n}:{count}" for n, count in zip(self.rungs, reached))
        self.log(f"trial {trial.number:4d} {what}{extra} ({fmt(result.get(record.DURATION_S))} s, "
                 f"pid {result.get(record.WORKER_PID, '?')}) | done {c.finished}/{self.n_trials}, failed {c.failed}"
                 f"{rungs}, front {len(front)}, hypervolume {fmt(hv)}")
        front = sorted(front, key=lambda t: t.values[-1])
        if [t.number for t in front] != self.front:
            self.front = [t.number for t in front]
            self.log(f"  front now ({'/'.join(self.objectives)}): " + ", ".join(
                f"#{t.number}" + (f" {t.user_attrs[record.PRESET]}" if t.user_attrs.get(record.PRESET) else "")
                + " " + "/".join(format_metric(o, v) for o, v in zip(self.objectives, t.values)) for t in front))


@dataclass
class SearchResult:
    """What a search leaves: the study's counts, its Pareto front (a DataFrame) and hypervolume."""

    study_name: str
    storage: str
    counts: st.Counts
    front: Any  # pandas.DataFrame
    hypervolume: float
    reference: dict[str, float] | None
    ran: int = 0  # trials this call finished
    study: Any = field(default=None, repr=False)


def final_report(study, url: str, objectives: Sequence[str], ran: int, log: Callable[[str], None]) -> SearchResult:
    """Log the counts, hypervolume and reference, the front table and the presets line; the result."""
    c = st.counts(study)
    ref = pareto.reference_point(pareto.baseline(study), objectives)
    fr = pareto.front_trials(study)
    hv = pareto.hypervolume(fr, objectives, ref)
    table = front_table(study, objectives)
    shown_ref = f" (reference {', '.join(f'{k} {v:.4g}' for k, v in ref.items())})" if ref else ""
    full = pareto.full_fidelity_trials(study)
    low = f" ({c.complete - len(full)} of them stopped by successive halving below the full rung)" \
        if len(full) < c.complete else ""
    log(f"done: {c.complete} complete{low}, {c.failed} failed, {c.interrupted} interrupted and re-run; "
        f"front {len(fr)}, hypervolume {fmt(hv)}{shown_ref}")
    if not table.empty:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_colwidth", 70):
            log("Pareto front:\n" + table.to_string(index=False, na_rep="-", formatters={
                c: functools.partial(format_metric, c) for c in table.columns if table[c].dtype == float}))
    line = presets_line(study, objectives)
    if line:
        log(line)
    return SearchResult(study.study_name, url, c, table, hv, ref, ran, study)


def front_table(study, objectives: Sequence[str]):
    """The Pareto front (:func:`paretoken.search.pareto.front_trials`) as a DataFrame: trial, preset,
    the objectives and headline metrics, plan; best first objective first."""
    import pandas as pd

    from paretoken.search.table import plan_label

    metrics = list(dict.fromkeys([*objectives, *HEADLINE]))
    rows = []
    for t in pareto.front_trials(study):
        attrs = t.user_attrs
        row = {"trial": t.number, "preset": attrs.get(record.PRESET) or ""}
        for name in metrics:
            value = attrs.get(name)
            row[name] = float(value) if isinstance(value, (int, float)) else math.nan
        label = plan_label(attrs.get(record.PLAN))
        row["plan"] = label if len(label) <= 90 else label[:87] + "..."
        rows.append(row)
    df = pd.DataFrame(rows, columns=["trial", "preset", *metrics, "plan"])
    df = df.drop(columns=[m for m in metrics if m not in objectives and df[m].isna().all()])  # e.g. --no-speed
    first = objectives[0]
    return df.sort_values(first, ascending=DIRECTIONS[first] == "minimize", kind="stable").reset_index(drop=True)


def presets_line(study, objectives: Sequence[str]) -> str | None:
    """How many of the study's presets a searched plan dominates (None when it ran none)."""
    from paretoken.search.table import trials_frame

    table = trials_frame(study)
    presets = pareto.preset_names(table)
    if not presets:
        return None
    beaten = pareto.presets_dominated(table, objectives)
    left = [name for name in presets if name not in beaten]
    return (f"presets dominated by a searched plan: {len(beaten)} of {len(presets)}"
            + (f" (not: {', '.join(left)}; the same command with a larger --trials continues this study)"
               if left else "")
            + "; `paretoken holdout` re-measures the front on test images the search never saw")
