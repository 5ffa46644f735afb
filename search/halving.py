"""Successive halving of a search (``--min-images M --images N --eta η``), MO-ASHA style: pure functions
the driver (:mod:`paretoken.search.driver`) glues in.

A plan is measured first on the first M images of the study's seeded order, and promoted rung by rung
(M, M·η, M·η², …, N: :func:`rung_schedule`) while it ranks well among the plans measured at its rung
(:func:`promoted`, by one of :data:`PROMOTIONS`). The rungs are prefixes of one image order, so a
promoted plan is evaluated on its new images only (:func:`slice_config`) and its metrics at the next
rung combine both (:func:`combine`).

A trial records its finished rungs as user attr ``rungs`` (:data:`paretoken.search.record.RUNGS`): a
list of ``{"images": M_k, "metrics": {...}, "duration_s": s}``, the metrics over the first M_k images,
written while it runs, so a retry of an interrupted trial goes on after the rungs it finished.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import Budgets
from paretoken.search import record

#: Metrics whose value over images a..c is the image-weighted mean of their values over a..b and b..c
#: (exact for the per-image means top1, top1_drop, agreement and kl; gflops: see :func:`combine`).
WEIGHTED = ("top1", "top1_drop", "agreement", "kl", "gflops", "padding_pct")
#: Timed metrics: measured at the full rung only (on its new images), NaN below it.
TIMED = ("img_per_s", "latency_ms", "speedup")
#: Promotion rules (``--promotion``): ``front``, the top 1/eta of a rung by non-dominated sorting or any
#: plan no other plan there dominates; ``top``, MO-ASHA's: the top 1/eta only, a front's plans ordered
#: by crowding distance (NSGA-II's tie-break).
PROMOTIONS = ("front", "top")


def rung_schedule(min_images: int, images: int, eta: int) -> tuple[int, ...]:
    """The images of each rung: ``min_images`` times the powers of ``eta`` below ``images``, then
    ``images`` (the last rung even when it is no power of ``eta`` times ``min_images``).

    >>> rung_schedule(8, 32, 2), rung_schedule(10, 1000, 4), rung_schedule(5, 5, 3)
    ((8, 16, 32), (10, 40, 160, 640, 1000), (5,))
    """
    if not 1 <= min_images <= images or eta < 2:
        raise ValueError(f"rung_schedule: need 1 <= min_images <= images and eta >= 2, not "
                         f"{min_images}, {images}, {eta}")
    rungs = []
    size = min_images
    while size < images:
        rungs.append(size)
        size *= eta
    return (*rungs, images)


def check_halving(min_images: int | None, eta: int | None, images: int, objectives: Sequence[str],
                  promotion: str | None = None) -> tuple[int | None, str | None]:
    """The checked ``eta`` and ``promotion`` (defaults 4 and ``front`` with ``min_images``, None without);
    one-line error naming the flag otherwise. Below the full rung plans are ranked on metrics measured
    there, so no objective may be timed (speed is measured at the full rung only)."""
    if min_images is None:
        for flag, value in (("eta", eta), ("promotion", promotion)):
            if value is not None:
                raise ParetokenError(f"{flag}: {value!r} applies to successive halving only; valid: --min-images M "
                                     f"with it, or no --{flag}")
        return None, None
    if isinstance(min_images, bool) or not isinstance(min_images, int) or not 1 <= min_images <= images:
        raise ParetokenError(f"min-images: {min_images!r} is invalid; valid: an integer in 1..{images} "
                             f"(at most --images {images})")
    eta = 4 if eta is None else eta
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise ParetokenError(f"eta: {eta!r} is invalid; valid: an integer >= 2 (each rung keeps the top 1/eta)")
    promotion = PROMOTIONS[0] if promotion is None else promotion
    if promotion not in PROMOTIONS:
        raise ParetokenError(f"promotion: {promotion!r} is unknown; valid: {', '.join(PROMOTIONS)}")
    timed = [o for o in objectives if o in TIMED]
    if timed:
        raise ParetokenError(f"min-images: successive halving ranks plans below the full rung, where "
                             f"{', '.join(timed)} is not timed; valid: objectives without img_per_s, latency_ms, "
                             "speedup, or no --min-images")
    return eta, promotion


def slice_config(config: Mapping[str, Any], rungs: Sequence[int], k: int) -> dict[str, Any]:
    """The EvalConfig (as a dict) of rung ``k``'s new images: those after rung k-1's, in the same order
    (``skip`` + ``rungs[k-1]``, ``rungs[k] - rungs[k-1]`` images); timed at the last rung only."""
    before = rungs[k - 1] if k else 0
    images = rungs[k] - before
    return {**config, "skip": (config.get("skip") or 0) + before, "images": images,
            "speed": bool(config.get("speed", True)) and k == len(rungs) - 1,
            "flops_images": min(int(config.get("flops_images") or images), images)}


def combine(before: Mapping[str, float] | None, n_before: int, new: Mapping[str, float], n_new: int) -> dict[str, float]:
    """Metrics over ``n_before + n_new`` images from those over the first ``n_before`` (``before``;
    None for none) and over the next ``n_new`` (``new``).

    :data:`WEIGHTED`: image-weighted means. Exact for top1, top1_drop, agreement and kl (means over
    images); for gflops exact where it is a mean over every image, while fvcore's count of a per-image
    plan on each slice's first ``flops_images`` images makes it a mean over more images than a
    single-fidelity run counts; padding_pct weights by images rather than token slots (a slice's slots
    differ by its widest images). peak_mem_mb: the larger peak. Timed metrics: ``new``'s (only the last
    rung is timed)."""
    if before is None or n_before == 0:
        return dict(new)
    total = n_before + n_new
    out = dict(new)
    for name in WEIGHTED:
        if name in before and name in new:
            out[name] = (before[name] * n_before + new[name] * n_new) / total
    if "peak_mem_mb" in new:
        peaks = [v for v in (before.get("peak_mem_mb", math.nan), new["peak_mem_mb"]) if not math.isnan(v)]
        out["peak_mem_mb"] = max(peaks) if peaks else math.nan
    return out


def promoted(losses: np.ndarray, penalty: np.ndarray, index: int, eta: int, rule: str = "front") -> bool:
    """Whether row ``index`` of the plans measured at one rung goes on to the next.

    ``losses``: (n, k) objective values as losses (lower is better), one row per plan at the rung;
    ``penalty``: (n,) total budget excess (<= 0: within every budget). The plans are sorted into
    non-dominated fronts (Optuna's constrained fast non-dominated sort: plans outside a budget rank
    behind every plan within them); a plan outside a budget is never promoted. A plan within its budgets
    is promoted when fewer than ``n // eta`` plans rank ahead of it: with ``rule`` ``front``, the plans
    on better fronts than its own, and it is promoted on the first front in any case; with ``top``
    (MO-ASHA), also the plans of its own front with a larger crowding distance (Optuna's NSGA-II
    measure), or an equal one (ties go against the plan deciding).
    """
    from optuna.study._multi_objective import _fast_non_domination_rank

    if penalty[index] > 0:
        return False
    losses = np.asarray(losses, dtype=float)
    ranks = _fast_non_domination_rank(losses, penalty=np.asarray(penalty, dtype=float))
    ahead = int(np.count_nonzero(ranks < ranks[index]))
    if rule == "front":
        return bool(ranks[index] == 0 or ahead < len(losses) // eta)
    same = np.flatnonzero(ranks == ranks[index])
    crowding = crowding_distances(losses[same])
    mine = crowding[int(np.flatnonzero(same == index)[0])]
    return ahead + int(np.count_nonzero(crowding >= mine)) - 1 < len(losses) // eta


def crowding_distances(values: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each row of ``values`` (n, k) within its set, as Optuna's NSGA-II
    sampler computes it: per objective, the gap between a row's two neighbours over the objective's
    range (infinite at its ends; an objective equal on every row adds nothing), summed."""
    from types import SimpleNamespace

    from optuna.samplers.nsgaii._elite_population_selection_strategy import _calc_crowding_distance

    rows = [SimpleNamespace(number=i, values=list(map(float, v))) for i, v in enumerate(values)]
    distances = _calc_crowding_distance(rows)
    return np.array([distances[i] for i in range(len(values))])


def penalty(metrics: Mapping[str, float], budgets: Budgets) -> float:
    """Total excess of ``metrics`` over ``budgets`` (0 within every one)."""
    return float(sum(max(v, 0.0) for v in budgets.constraints(metrics).values()))


def rung_entry(entries: Sequence[Mapping[str, Any]], images: int) -> Mapping[str, Any] | None:
    """The entry of ``entries`` (a trial's ``rungs``) at ``images``, or None."""
    return next((e for e in entries if e.get("images") == images), None)


def rung_trials(trials: Iterable, images: int) -> list[tuple[int, dict[str, float]]]:
    """(trial number, metrics) of every trial that finished the rung of ``images``: COMPLETE, RUNNING or
    FAIL with an error of its own (an interrupted trial's rungs live on in its retry)."""
    out = []
    for t in trials:
        if t.state.name not in ("COMPLETE", "RUNNING", "FAIL") or record.is_interrupted(t.state.name, t.user_attrs):
            continue
        entry = rung_entry(t.user_attrs.get(record.RUNGS) or [], images)
        if entry is not None:
            out.append((t.number, {k: math.nan if v is None else v for k, v in entry["metrics"].items()}))
    return out


def rung_counts(trials: Iterable, rungs: Sequence[int]) -> list[int]:
    """How many trials finished each rung (as :func:`rung_trials` counts them)."""
    trials = list(trials)
    return [len(rung_trials(trials, images)) for images in rungs]
