"""Successive halving (``--min-images``/``--eta``): the rung schedule, the promotion rule against a
brute-force formulation, and a real search on the default model whose rungs, metrics, front, export and
holdout are checked against single-fidelity evaluations of the same plans."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import optuna
import pytest

import paretoken
from paretoken.errors import ParetokenError
from paretoken.evaluators import evaluate as ev
from paretoken.results import export, holdout, query
from paretoken.search import halving, run_search
from paretoken.search.storage import open_storage

RUNGS = (8, 16, 32)


@pytest.mark.parametrize("m, n, eta, rungs", [
    (8, 32, 2, (8, 16, 32)), (8, 30, 2, (8, 16, 30)), (10, 1000, 4, (10, 40, 160, 640, 1000)),
    (5, 5, 3, (5,)), (1, 10, 3, (1, 3, 9, 10)), (6, 7, 4, (6, 7))])
def test_rung_schedule(m, n, eta, rungs):
    assert halving.rung_schedule(m, n, eta) == rungs


def test_a_slice_config_holds_only_a_rungs_new_images_and_times_only_the_last():
    config = {"images": 32, "skip": 5, "speed": True, "flops_images": 16, "batch_size": 100}
    slices = [halving.slice_config(config, RUNGS, k) for k in range(3)]
    assert [(s["skip"], s["images"], s["speed"], s["flops_images"]) for s in slices] == [
        (5, 8, False, 8), (13, 8, False, 8), (21, 16, True, 16)]


def test_combine_weights_by_images_keeps_the_larger_peak_and_the_new_timings():
    before = {"top1": 50.0, "kl": 0.2, "gflops": 1.0, "peak_mem_mb": 30.0, "speedup": math.nan}
    new = {"top1": 80.0, "kl": 0.5, "gflops": 2.0, "peak_mem_mb": 10.0, "speedup": 1.7}
    out = halving.combine(before, 8, new, 24)
    assert out == pytest.approx({"top1": 72.5, "kl": 0.425, "gflops": 1.75, "peak_mem_mb": 30.0, "speedup": 1.7})
    assert halving.combine(None, 0, new, 8) == new


def brute_crowding(points):
    """NSGA-II's crowding distance as Deb et al. define it, for points without ties in any objective: per
    objective, the span between a point's two neighbours over the objective's range, infinite at the ends
    (nothing from an objective of one value, as for a single point)."""
    out = [0.0] * len(points)
    for k in range(len(points[0]) if points else 0):
        order = sorted(range(len(points)), key=lambda j: points[j][k])
        span = points[order[-1]][k] - points[order[0]][k]
        for at, j in enumerate(order if span else ()):
            if at in (0, len(order) - 1):
                out[j] = math.inf
            else:
                out[j] += (points[order[at + 1]][k] - points[order[at - 1]][k]) / span
    return out


def brute_promoted(points, feasible, i, eta, rule="front"):
    """The rule as words say it: peel the feasible plans into fronts by pairwise dominance; plan i goes on
    when it is feasible and fewer than n // eta plans rank ahead: on earlier fronts (``front``: or when
    it is on the first front), and for ``top`` also its own front's plans crowded no more than it."""
    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    if not feasible[i]:
        return False
    left, fronts = [j for j in range(len(points)) if feasible[j]], []
    while left:
        front = [j for j in left if not any(dominates(points[o], points[j]) for o in left)]
        fronts.append(front)
        left = [j for j in left if j not in front]
    level = next(n for n, front in enumerate(fronts) if i in front)
    ahead = sum(len(f) for f in fronts[:level])
    if rule == "front":
        return level == 0 or ahead < len(points) // eta
    crowding = dict(zip(fronts[level], brute_crowding([points[j] for j in fronts[level]])))
    return ahead + sum(crowding[j] >= crowding[i] for j in fronts[level] if j != i) < len(points) // eta


def test_promotion_rule_matches_a_brute_force_formulation():
    rng = random.Random(0)
    checked = promoted = 0
    for _ in range(400):
        n, k, eta = rng.randint(1, 12), rng.randint(2, 3), rng.choice((2, 3, 4))
        points = [tuple(rng.randint(0, 4) for _ in range(k)) for _ in range(n)]  # a small grid: ties happen
        excess = [0.0 if rng.random() < 0.8 else rng.uniform(0.1, 2.0) for _ in range(n)]
        for i in range(n):
            want = brute_promoted(points, [e <= 0 for e in excess], i, eta)
            assert halving.promoted(np.array(points, dtype=float), np.array(excess), i, eta) == want
            checked, promoted = checked + 1, promoted + want
    assert 0.2 < promoted / checked < 0.9  # both outcomes exercised


def test_mo_asha_promotion_matches_a_brute_force_formulation():
    """``top``: the top 1/eta only, a front ordered by crowding distance (points without ties, where the
    crowding distance is one number whatever the order the plans come in)."""
    rng = random.Random(1)
    checked = promoted = first_front_stopped = 0
    for _ in range(300):
        n, k, eta = rng.randint(1, 16), rng.randint(2, 3), rng.choice((2, 3, 4))
        points = [tuple(rng.random() for _ in range(k)) for _ in range(n)]
        excess = [0.0 if rng.random() < 0.8 else rng.uniform(0.1, 2.0) for _ in range(n)]
        for i in range(n):
            want = brute_promoted(points, [e <= 0 for e in excess], i, eta, "top")
            got = halving.promoted(np.array(points), np.array(excess), i, eta, "top")
            assert got == want, (points, excess, i, eta)
            front = halving.promoted(np.array(points), np.array(excess), i, eta, "front")
            assert front or not got  # top promotes a subset of what front does
            checked, promoted = checked + 1, promoted + want
            first_front_stopped += front and not got
    assert 0.1 < promoted / checked < 0.6 and first_front_stopped > 50


def test_crowding_distances_are_nsga2s():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7):
        points = rng.random((n, 2))
        assert halving.crowding_distances(points).tolist() == pytest.approx(brute_crowding(points.tolist()))


def test_the_first_plans_at_a_rung_go_on_unless_dominated():
    """Fewer than eta plans at a rung: n // eta is 0, so only the non-dominated go on."""
    assert halving.promoted(np.array([[1.0, 1.0]]), np.zeros(1), 0, 4)
    assert not halving.promoted(np.array([[2.0, 2.0], [1.0, 1.0]]), np.zeros(2), 0, 4)
    assert halving.promoted(np.array([[0.0, 2.0], [1.0, 1.0]]), np.zeros(2), 0, 4)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A real halving search on the default model and its packaged weights: 32 images, rungs 8, 16, 32."""
    path = tmp_path_factory.mktemp("halving")
    lines: list[str] = []
    saved, ev._BENCHES = ev._BENCHES, {}  # to see which images the workers (this process) evaluated
    try:
        config = ev.EvalConfig(model="default", images=32, batch_size=32, speed=False, flops_images=2)
        result = run_search("h", storage=f"sqlite:///{path}/h.db", space="evit", n_trials=8, eval_config=config,
                            seed=1, min_images=8, eta=2, log=lines.append)
        evaluated = {(key[4], key[6]) for key in ev._BENCHES}  # (images, skip) of each bench prepared
    finally:
        ev._BENCHES = saved | ev._BENCHES
    return result, config, lines, evaluated


def test_a_halving_search_measures_each_rung_on_its_new_images_only(searched):
    result, config, lines, evaluated = searched
    study = result.study
    assert study.user_attrs["paretoken"]["min_images"] == 8 and study.user_attrs["paretoken"]["eta"] == 2
    assert study.user_attrs["paretoken"]["measurement"]["images"] == 32
    assert evaluated == {(8, 0), (8, 8), (16, 16)}  # never the first 16 or all 32 at once
    trials = study.get_trials()
    assert len(trials) == 8 and all(t.state.name == "COMPLETE" for t in trials)
    reached = [t.user_attrs["images"] for t in trials]
    assert 32 in reached and min(reached) < 32  # some went to the full rung, some were stopped
    for t in trials:
        entries = t.user_attrs["rungs"]
        assert [e["images"] for e in entries] == list(RUNGS[:len(entries)]) and entries[-1]["images"] == t.user_attrs["images"]
        assert t.values == [entries[-1]["metrics"]["top1"], entries[-1]["metrics"]["gflops"]]  # the samplers see it
        if t.user_attrs.get("preset"):
            assert len(entries) == 3  # the reference and the presets go to the full rung
    # every decision the search took is the rule's, replayed on the plans measured at that rung before it
    for t in trials:
        if t.user_attrs.get("preset"):
            continue
        for k, images in enumerate(RUNGS[:-1]):
            at_rung = [u for u in trials if u.number <= t.number and any(e["images"] == images
                                                                          for e in u.user_attrs["rungs"])]
            if t not in at_rung:
                break
            points = [(-m["top1"], m["gflops"]) for m in (halving.rung_entry(u.user_attrs["rungs"], images)["metrics"]
                                                          for u in at_rung)]
            went_on = len(t.user_attrs["rungs"]) > k + 1
            assert went_on == brute_promoted(points, [True] * len(points), at_rung.index(t), 2), (t.number, images)
    # full-fidelity metrics of a promoted plan equal one evaluation of it on all 32 images
    full = [t for t in trials if t.user_attrs["images"] == 32 and not t.user_attrs.get("preset")]
    assert full
    for t in full[:2]:
        single = ev.evaluate(paretoken.Plan.from_dict(t.user_attrs["plan"]), config)
        for metric in ("top1", "agreement", "top1_drop", "gflops"):
            assert t.user_attrs[metric] == pytest.approx(single[metric], abs=1e-9), metric
        assert t.user_attrs["kl"] == pytest.approx(single["kl"], rel=1e-4, abs=1e-7)
    assert any(" promoted to 16 of 32 images (ranked among " in line for line in lines)
    assert any("[stopped at 8 of 32 images]" in line or "[stopped at 16 of 32 images]" in line for line in lines)
    assert "rungs 8:8 16:" in [line for line in lines if line.startswith("trial    7 ")][-1]


def test_front_export_holdout_and_hypervolume_count_only_full_fidelity(searched, tmp_path, capsys):
    from paretoken.cli import main

    result = searched[0]
    df = query.trials_frame(result.study)
    stopped = set(df.loc[~df["full_fidelity"], "number"])
    assert stopped and (df.loc[~df["full_fidelity"], "images"] < 32).all()
    full = df[df["full_fidelity"]]
    assert query.front(df)["number"].tolist() == query.front(full)["number"].tolist()
    assert not stopped & set(query.front(df)["number"]) and not stopped & set(result.front["trial"])
    assert not stopped & set(holdout.candidates(df)["number"])
    assert result.hypervolume == pytest.approx(query.hypervolume(df)) == pytest.approx(query.hypervolume(full))
    assert query.best(df, "gflops")["number"] not in stopped
    with pytest.raises(ParetokenError, match=r"export: trial \d+ was measured on (8|16) images only"):
        export.choose_trial(df, trial=min(stopped))
    # the command line says so too
    assert main(["front", "--study", "h", "--storage", result.storage, "--json"]) == 0
    front = json.loads(capsys.readouterr().out)["front"]
    assert {row["number"] for row in front} == set(query.front(full)["number"])
    assert main(["front", "--study", "h", "--storage", result.storage]) == 0
    assert f"{len(stopped)} stopped by successive halving below the full rung" in capsys.readouterr().out
    out = str(tmp_path / "p.yaml")
    assert main(["export", "--study", "h", "--storage", result.storage, "--trial", str(min(stopped)), "--out", out]) == 2
    assert "successive halving stopped it" in capsys.readouterr().err
    assert main(["export", "--study", "h", "--storage", result.storage, "--best", "--out", out]) == 0
    assert paretoken.load_plan(out).meta["eval"]["images"] == 32


def test_a_halving_study_is_resumed_with_its_min_images_and_eta(searched):
    result, config, _, _ = searched
    url = result.storage
    made = "with --min-images 8 --eta 2 --promotion front"
    for kwargs in ({"min_images": 8, "eta": 4}, {}, {"min_images": 8, "eta": 2, "promotion": "top"}):
        with pytest.raises(ParetokenError, match=f"study: 'h' was created {made} .successive halving.; pass the same"):
            run_search("h", storage=url, space="evit", n_trials=9, eval_config=config, seed=1, **kwargs)
    assert len(optuna.load_study(study_name="h", storage=open_storage(url)).get_trials()) == 8


def test_a_study_without_halving_refuses_min_images(tmp_path):
    from paretoken.search.opening import check_settings

    with pytest.raises(ParetokenError, match="created without --min-images"):
        check_settings("old", {"space": "evit"}, {"space": "evit", "min_images": 8, "eta": 4})
    check_settings("old", {"space": "evit"}, {"space": "evit"})
    # a halving study made before --promotion was promoted by the front rule
    before = {"space": "evit", "min_images": 8, "eta": 4}
    check_settings("old", before, {**before, "promotion": "front"})
    with pytest.raises(ParetokenError, match="created with --min-images 8 --eta 4 --promotion front"):
        check_settings("old", before, {**before, "promotion": "top"})


@pytest.mark.parametrize("min_images, eta, promotion, objectives, message", [
    (33, None, None, "top1,gflops", "min-images: 33 is invalid; valid: an integer in 1..32"),
    (0, None, None, "top1,gflops", "min-images: 0 is invalid"),
    (8, 1, None, "top1,gflops", "eta: 1 is invalid; valid: an integer >= 2"),
    (None, 3, None, "top1,gflops", "eta: 3 applies to successive halving only"),
    (None, None, "top", "top1,gflops", "promotion: 'top' applies to successive halving only"),
    (8, None, "best", "top1,gflops", "promotion: 'best' is unknown; valid: front, top"),
    (8, None, None, "top1,speedup", "min-images: successive halving ranks plans below the full rung, where speedup"),
])
def test_bad_halving_values_are_one_line(min_images, eta, promotion, objectives, message):
    with pytest.raises(ParetokenError, match=message):
        halving.check_halving(min_images, eta, 32, objectives.split(","), promotion)
    assert halving.check_halving(8, None, 32, ["top1"]) == (4, "front")
    assert halving.check_halving(8, 2, 32, ["top1"], "top") == (2, "top")
    assert halving.check_halving(None, None, 32, []) == (None, None)


def test_a_halving_search_promotes_by_the_rule_it_records(tmp_path):
    """``promotion="top"`` reaches the driver: each decision is the rule's on the rung's plans as they stood,
    and the study records it (a resumed search must pass it again)."""
    config = ev.EvalConfig(model="default", images=32, batch_size=32, speed=False, flops_images=2)
    result = run_search("t", storage=f"sqlite:///{tmp_path}/t.db", space="evit", n_trials=10, eval_config=config,
                        seed=2, min_images=8, eta=2, promotion="top", log=lambda _: None)
    assert result.study.user_attrs["paretoken"]["promotion"] == "top"
    trials = result.study.get_trials()
    decided = 0
    for t in (t for t in trials if not t.user_attrs.get("preset")):
        for k, images in enumerate(RUNGS[:-1]):
            entry = halving.rung_entry(t.user_attrs["rungs"], images)
            if entry is None:
                break
            others = [halving.rung_entry(u.user_attrs["rungs"], images) for u in trials if u.number < t.number]
            rows = [entry["metrics"], *(e["metrics"] for e in others if e is not None)]
            losses = np.array([(-m["top1"], m["gflops"]) for m in rows])
            went_on = len(t.user_attrs["rungs"]) > k + 1
            assert went_on == halving.promoted(losses, np.zeros(len(rows)), 0, 2, "top"), (t.number, images)
            decided += 1
    assert decided >= 6
