"""Re-measure a study's front on test images its search never saw.

A search measures every plan on the same images (the first ``images`` of the seeded test order,
after ``skip``) and keeps the plans that are best *there*: with a few hundred images, a plan one or
two lucky images ahead of its neighbours lands on the front. :func:`remeasure` evaluates trials
again on the next images of the same order, disjoint from the search's, so the front can be judged
on data that played no part in choosing it.

Re-measured: :data:`HELD_OUT_METRICS` (accuracy and agreement with the uncompressed model on the
held-out images). GFLOPs and the timed metrics stay the study's: they do not depend on which
images are classified (plans with a per-image token count were counted on the search's images).

:func:`preset_challenges` asks the question a front on a few hundred images cannot settle: is the
searched plan the search would pick against a preset (the most top-1 on the search's images at no
more GFLOPs) better or worse on new images, beyond the noise? Both plans classify the same held-out
images, so the comparison is paired.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from paretoken.errors import ParetokenError, check_int
from paretoken.results import query
from paretoken.search import record

HELD_OUT_METRICS = ("top1", "top1_drop", "agreement", "kl")
Z_95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal


def held_out_config(settings: Mapping[str, Any], images: int, device: str = "cpu", batch_size: int = 100):
    """The :class:`~paretoken.evaluators.evaluate.EvalConfig` of ``images`` test images after those a
    search measured on, in the same seeded order.

    ``settings``: the study's ``paretoken`` user attr, as the search writes it
    (:func:`paretoken.search.record.study_settings`): the same :data:`~paretoken.search.record.MODEL_KEYS`,
    the images after its ``skip`` + ``images`` in its ``seed``'s order.
    """
    from paretoken.evaluators.evaluate import EvalConfig

    measurement = record.measurement_of(settings)
    if not isinstance(measurement.get("images"), int):
        raise ParetokenError("study: it has no measurement settings (user attr 'paretoken'); only studies "
                             "written by `paretoken search` say which images their trials were measured on")
    check_int("images", images, 1, note="held-out test images")
    check_int("batch-size", batch_size, 1)
    model = {k: measurement.get(k) for k in record.MODEL_KEYS}  # the same model, weights and data set
    return EvalConfig(**{**model, "pretrained": bool(model["pretrained"])}, seed=measurement.get("seed", 0),
                      skip=(measurement.get("skip") or 0) + measurement["images"], images=images, device=device,
                      batch_size=batch_size, speed=False, flops_images=1)


def candidates(df: pd.DataFrame, objectives: Sequence[str] | str = query.DEFAULT_OBJECTIVES) -> pd.DataFrame:
    """The rows worth re-measuring: the searched plans on the searched-only front (non-dominated among the
    feasible COMPLETE trials that are not presets), every COMPLETE preset and the uncompressed model.

    They contain the study's front, and every searched plan that could dominate a preset.
    """
    done = query.budget(df, feasible_only=False)
    searched = query.front(df[df["preset"].isna()], objectives)
    return pd.concat([done[done["preset"].notna()], searched]).sort_values("number", kind="stable")


def remeasure(rows: pd.DataFrame, config, log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """``rows`` (of a study table, :func:`paretoken.results.query.load`) with :data:`HELD_OUT_METRICS`
    measured on ``config``'s images; the study's values move to ``<metric>_search`` columns, and
    column ``correct`` holds each row's (images,) bool array: which held-out images it classifies
    right. The other columns, ``feasible`` (the study's budgets, judged on its own images) among
    them, stay.

    Each distinct plan is evaluated once, so rows of several studies of one model can be passed
    together. ``log`` gets a line per plan measured.
    """
    from paretoken.compress.plan import Plan
    from paretoken.evaluators.evaluate import evaluate_per_image

    keys = rows["plan"].map(lambda plan: json.dumps(plan, sort_keys=True))
    plans: dict[str, Plan] = {}
    for key, number in zip(keys, rows["number"]):  # every stored plan read before minutes of measuring
        if key not in plans:
            try:
                plans[key] = Plan.from_dict(json.loads(key))
            except ParetokenError as exc:
                raise ParetokenError(f"trial {number}: its stored {exc}") from None
    measured: dict[str, tuple[dict[str, float], np.ndarray]] = {}
    for key, label in zip(keys, rows["plan_str"]):
        if key not in measured:
            metrics, correct = evaluate_per_image(plans[key], config)
            measured[key] = metrics, correct.numpy()
            if log:
                log(f"  {len(measured)}/{keys.nunique()}: top1 {metrics['top1']:.2f}  {label}")
    out = rows.copy()
    for metric in HELD_OUT_METRICS:
        out[f"{metric}_search"] = out[metric]
        out[metric] = [measured[key][0][metric] for key in keys]
    out["correct"] = [measured[key][1] for key in keys]
    out.attrs = dict(rows.attrs, held_out={"images": config.images, "skip": config.skip})
    return out


def summary(held: pd.DataFrame, objectives: Sequence[str] | str = query.DEFAULT_OBJECTIVES) -> dict[str, Any]:
    """Figures of a :func:`remeasure` result: presets a searched plan dominates on the search's images and
    on the held-out ones, and the trials on the front of each."""
    objectives = query._check_objectives(objectives, held)
    search = held.assign(**{m: held[f"{m}_search"] for m in HELD_OUT_METRICS})
    return {"presets": query.preset_names(held),
            "presets_dominated_search": query.presets_dominated(search, objectives),
            "presets_dominated_held_out": query.presets_dominated(held, objectives),
            "front_search": query.front(search, objectives)["number"].tolist(),
            "front_held_out": query.front(held, objectives)["number"].tolist()}



def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of top-1(a) - top-1(b) in points, for two plans' (n,) per-image
    correctness on the same images: the mean and standard error of the per-image differences
    (each -1, 0 or 1), so images both get right or both get wrong add no noise. Standard error
    NaN for one image."""
    d = correct_a.astype(float) - correct_b.astype(float)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return 100.0 * d.mean(), 100.0 * se


def preset_challenges(held: pd.DataFrame) -> pd.DataFrame:
    """Each preset of a :func:`remeasure` result against its challenger: of the re-measured searched
    plans at no more GFLOPs, the one with the most top-1 on the search's images (fewer GFLOPs on a
    tie). The challenger is chosen on the search's images and judged on the held-out ones, so its
    held-out difference is not inflated by picking the luckiest plan there.

    One row per preset: ``preset``, ``number``, ``gflops``, ``challenger`` (trial number, None when
    no searched plan is that cheap), ``challenger_gflops``, ``challenger_plan``, ``delta_search``
    and ``delta_held_out`` (challenger minus preset, top-1 points), ``ci_low``/``ci_high`` (95 %
    interval of the held-out difference, normal approximation of the paired differences) and
    ``verdict``: "searched better" (interval above 0), "preset better" (below 0), "within noise"
    (it contains 0) or "no searched plan at its GFLOPs".
    """
    presets = query.preset_rows(held).drop_duplicates("preset")
    searched = held[held["preset"].isna()]
    rows = []
    for _, preset in presets.iterrows():
        row = {"preset": preset["preset"], "number": preset["number"], "gflops": preset["gflops"],
               "challenger": None, "challenger_gflops": math.nan, "challenger_plan": None,
               "delta_search": math.nan, "delta_held_out": math.nan, "ci_low": math.nan, "ci_high": math.nan,
               "verdict": "no searched plan at its GFLOPs"}
        cheaper = searched[searched["gflops"] <= preset["gflops"]]
        if not cheaper.empty:
            best = cheaper.sort_values(["top1_search", "gflops"], ascending=[False, True], kind="stable").iloc[0]
            delta, se = paired_difference(best["correct"], preset["correct"])
            low, high = delta - Z_95 * se, delta + Z_95 * se
            row.update(challenger=int(best["number"]), challenger_gflops=best["gflops"],
                       challenger_plan=best.get("plan_str"), delta_search=best["top1_search"] - preset["top1_search"],
                       delta_held_out=delta, ci_low=low, ci_high=high,
                       verdict="searched better" if low > 0 else "preset better" if high < 0 else "within noise")
        rows.append(row)
    out = pd.DataFrame(rows, columns=["preset", "number", "gflops", "challenger", "challenger_gflops",
                                      "challenger_plan", "delta_search", "delta_held_out", "ci_low", "ci_high",
                                      "verdict"])
    out["challenger"] = pd.Series([row["challenger"] for row in rows], index=out.index, dtype=object)  # int or None
    return out
