"""paretoken.results.query on real Optuna studies (SQLite files in tmp_path): load, front, budgets,
hypervolume, compare. Trials are made with optuna.trial.create_trial carrying the attributes the
search stores; no Optuna mock."""
from __future__ import annotations

import itertools
import math
import subprocess
import sys
import random

import numpy as np
import optuna
import pandas as pd
import pytest

import paretoken
from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import Budgets
from paretoken.results import query

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def trial_attrs(plan: paretoken.Plan, top1: float, gflops: float, base_top1: float = 80.0, **extra) -> dict:
    """User attrs as the search stores them: plan dict, every metric by name, device, timings;
    ``base_top1`` is the uncompressed model's top-1 (for top1_drop)."""
    metrics = {"top1": top1, "top1_drop": base_top1 - top1, "agreement": min(100.0, top1 + 5), "kl": 0.01,
               "gflops": gflops,
               "img_per_s": 1000.0 / gflops, "latency_ms": gflops * 10, "peak_mem_mb": math.nan, "padding_pct": 0.0}
    attrs = {"plan": plan.to_dict(), **metrics, "device": "cpu (x86_64)", "duration_s": 1.5, "worker_pid": 1234,
             "torch": "2.x", "optuna": optuna.__version__}
    attrs.update(extra)
    return {k: v for k, v in attrs.items() if not (isinstance(v, float) and math.isnan(v))}


def make_study(storage: str, name: str, points, failed: int = 1, max_gflops: float | None = None) -> optuna.Study:
    """A (top1 max, gflops min) study; ``points`` are (plan, top1, gflops[, preset]) tuples."""
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    study.set_metric_names(["top1", "gflops"])
    for point in points:
        plan, top1, gflops, *preset = point
        extra = {"preset": preset[0]} if preset else {}
        constraints = {"max_gflops": gflops - max_gflops} if max_gflops is not None else None
        study.add_trial(optuna.trial.create_trial(values=[top1, gflops], user_attrs=trial_attrs(plan, top1, gflops,
                                                                                               **extra),
                                                  constraints=constraints))
    for _ in range(failed):
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL,
            user_attrs={"plan": paretoken.preset("tome-r16").to_dict(), "error": "RuntimeError: out of memory",
                        "device": "cpu (x86_64)", "duration_s": 0.2}))
    return study


def keep_plan(keep: float) -> paretoken.Plan:
    return paretoken.Plan(tuple(paretoken.Stage(layer, "prune_fuse", keep=keep) for layer in (3, 6, 9)))


POINTS = [
    (paretoken.Plan(), 80.0, 4.0, "uncompressed"),
    (paretoken.preset("evit-0.7"), 79.5, 3.0, "evit-0.7"),
    (keep_plan(0.6), 78.0, 2.5),
    (keep_plan(0.55), 75.0, 2.6),  # dominated by keep 0.6
    (paretoken.preset("tome-r13"), 77.0, 2.0, "tome-r13"),
    (keep_plan(0.3), 60.0, 1.0),
]


@pytest.fixture()
def storage(tmp_path):
    return f"sqlite:///{tmp_path / 'studies.db'}"


def test_reading_studies_never_imports_torch():
    code = "import sys; from paretoken.results import query; print('torch' in sys.modules, query.METRICS[0])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["False", "top1"]


def test_load_one_row_per_trial_with_every_column(storage):
    make_study(storage, "s", POINTS, failed=1, max_gflops=3.0)
    df = query.load("s", storage)
    assert list(df["number"]) == list(range(len(POINTS) + 1))
    assert list(df["state"]) == ["COMPLETE"] * len(POINTS) + ["FAIL"]
    for metric in query.METRICS:
        assert metric in df.columns and df[metric].dtype == float
    first = df.iloc[0]
    assert first["plan"] == {"version": 1, "stages": []} and first["plan_str"] == "none"
    assert first["top1"] == 80.0 and first["gflops"] == 4.0 and math.isnan(first["peak_mem_mb"])
    assert first["device"] == "cpu (x86_64)" and first["duration_s"] == 1.5 and first["worker_pid"] == 1234
    assert df.loc[1, "plan_str"] == "prune_fuse(keep=0.7)@3,6,9"
    assert paretoken.Plan.from_dict(df.loc[1, "plan"]) == paretoken.preset("evit-0.7")
    assert list(df["preset"]) == ["uncompressed", "evit-0.7", None, None, "tome-r13", None, None]
    assert df["constraint:max_gflops"].tolist()[:2] == [1.0, 0.0]
    assert df["feasible"].tolist()[:3] == [False, True, True]
    failed = df.iloc[-1]
    assert failed["error"] == "RuntimeError: out of memory" and math.isnan(failed["top1"])
    assert df.attrs["study"] == "s" and df.attrs["storage"] == storage


def test_presets_found_by_plan_where_no_trial_names_one(storage):
    make_study(storage, "bare", [p[:3] for p in POINTS], failed=0)
    df = query.load("bare", storage)
    assert list(df["preset"]) == ["uncompressed", "evit-0.7", None, None, "tome-r13", None]


def test_infeasible_trials_leave_the_front_but_stay_in_the_table(storage):
    make_study(storage, "budget", POINTS, failed=0, max_gflops=2.5)
    df = query.load("budget", storage)
    assert len(df) == len(POINTS) and df["feasible"].tolist() == [False, False, True, False, True, True]
    assert query.front(df)["number"].tolist() == [2, 4, 5]
    assert query.front(df, feasible_only=False)["number"].tolist() == [0, 1, 2, 4, 5]
    assert query.best(df)["number"] == 2


def test_metrics_missing_from_user_attrs_come_from_the_values(storage):
    study = optuna.create_study(study_name="v", storage=storage, directions=["maximize", "minimize"])
    study.set_metric_names(["top1", "gflops"])
    study.add_trial(optuna.trial.create_trial(values=[70.0, 2.0], user_attrs={"plan": {"version": 1, "stages": []}}))
    df = query.load("v", storage)
    assert df.loc[0, "top1"] == 70.0 and df.loc[0, "gflops"] == 2.0 and math.isnan(df.loc[0, "kl"])


def test_unknown_study_lists_the_existing_ones(storage):
    make_study(storage, "alpha", POINTS[:2], failed=0)
    make_study(storage, "beta", POINTS[:2], failed=0)
    with pytest.raises(ParetokenError) as err:
        query.load("gamma", storage)
    message = str(err.value)
    assert "'gamma'" in message and "alpha, beta" in message and "\n" not in message


def test_missing_or_unreachable_storage_is_one_line_and_creates_nothing(tmp_path):
    missing = tmp_path / "nope.db"
    with pytest.raises(ParetokenError, match="does not exist"):
        query.load("s", f"sqlite:///{missing}")
    assert not missing.exists()
    with pytest.raises(ParetokenError) as err:
        query.load("s", "postgresql://user:secret@127.0.0.1:1/db")
    assert "cannot open" in str(err.value) and "secret" not in str(err.value) and "\n" not in str(err.value)


def test_default_storage_is_the_studies_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").mkdir()
    make_study(query.default_storage("mine"), "mine", POINTS[:3], failed=0)
    assert query.default_storage("mine") == "sqlite:///studies/mine.db"
    assert len(query.load("mine")) == 3
    with pytest.raises(ParetokenError, match="beside it: mine"):
        query.load("other")


def test_sqlite_files_read_where_they_are_and_no_other(tmp_path):
    """A '#' in the path (a URI fragment to SQLite) reads the real file; another program's database
    and an empty file are refused, and reading adds no Optuna tables to them."""
    import sqlite3

    odd = tmp_path / "we#ird" / "s.db"
    odd.parent.mkdir()
    make_study(f"sqlite:///{odd}", "s", POINTS[:3], failed=0)
    assert len(query.load("s", f"sqlite:///{odd}")) == 3
    assert sorted(p.name for p in odd.parent.iterdir()) == ["s.db"]
    foreign, empty = tmp_path / "notes.db", tmp_path / "empty.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    empty.touch()
    with pytest.raises(ParetokenError, match="is another program's SQLite database"):
        query.load("s", f"sqlite:///{foreign}")
    with pytest.raises(ParetokenError, match="holds no Optuna studies; valid: an Optuna study database$"):
        query.load("s", f"sqlite:///{empty}")
    assert empty.stat().st_size == 0


def test_a_database_left_mid_write_by_a_killed_process_reads(tmp_path):
    """SIGKILL during a write leaves a hot journal; the next reader rolls it back instead of refusing the file."""
    path = tmp_path / "s.db"
    make_study(f"sqlite:///{path}", "s", POINTS[:3], failed=0)
    killed_mid_write = f"""
import os, sqlite3
db = sqlite3.connect({str(path)!r}, isolation_level=None)
db.execute("PRAGMA cache_size=1")  # spill to the file before the commit that never comes
db.execute("BEGIN")
for i in range(2000):
    db.execute("INSERT INTO study_user_attributes (study_id, key, value_json) VALUES (1, ?, ?)", (f"k{{i}}", "x" * 200))
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", killed_mid_write], check=True)
    assert (tmp_path / "s.db-journal").stat().st_size > 0
    df = query.load("s", f"sqlite:///{path}")
    assert len(df) == 3 and not any(key.startswith("k") for key in df.attrs["user_attrs"])


def test_journal_file_storage(tmp_path):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = tmp_path / "journal.log"
    make_study(JournalStorage(JournalFileBackend(str(path))), "j", POINTS[:3], failed=0)
    assert len(query.load("j", f"journal:{path}")) == 3
    assert len(query.load("j", f"journal://{path}")) == 3  # journal:///ABS


# --------------------------------------------------------------------------- front
def brute_force_front(df: pd.DataFrame, objectives) -> set[int]:
    """Independent O(n^2) dominance check in plain Python."""
    sign = {o: (-1 if query.MAXIMIZE[o] else 1) for o in objectives}
    rows = [(r["number"], [sign[o] * r[o] for o in objectives]) for _, r in df.iterrows()
            if r["state"] == "COMPLETE" and all(not math.isnan(r[o]) for o in objectives)]
    keep = set()
    for n, p in rows:
        dominated = any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p)) for _, q in rows)
        if not dominated:
            keep.add(n)
    return keep


def random_frame(seed: int, n: int = 120) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        state = rng.choice(["COMPLETE"] * 8 + ["FAIL", "RUNNING"])
        # coarse grid values force ties and exact duplicates
        row = {"number": i, "state": state, "plan_str": f"p{i}",
               "top1": rng.randint(0, 20) / 2, "gflops": rng.randint(1, 20) / 4,
               "img_per_s": float(rng.randint(1, 10)), "kl": rng.random()}
        if state != "COMPLETE" or rng.random() < 0.05:
            row["top1"] = math.nan
        row["top1_drop"] = 10.0 - row["top1"]
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("objectives", [("top1", "gflops"), ("top1", "gflops", "img_per_s"), ("gflops", "kl")])
def test_front_matches_brute_force(seed, objectives):
    df = random_frame(seed)
    got = query.front(df, objectives)
    assert set(got["number"]) == brute_force_front(df, objectives)
    first = objectives[0]
    values = got[first].to_numpy()
    assert np.all(np.diff(values) <= 0) if query.MAXIMIZE[first] else np.all(np.diff(values) >= 0)


@pytest.mark.parametrize("seed", range(4))
def test_front_budgets(seed):
    df = random_frame(seed)
    got = query.front(df, ("top1", "gflops"), budgets=Budgets(max_gflops=2.5, min_top1=3.0))
    within = df[(df["gflops"] <= 2.5) & (df["top1"] >= 3.0)]
    assert set(got["number"]) == brute_force_front(within, ("top1", "gflops"))
    assert (got["gflops"] <= 2.5).all() and (got["top1"] >= 3.0).all()
    got = query.front(df, ("top1", "gflops"), budgets=Budgets(max_top1_drop=4.0))
    assert set(got["number"]) == brute_force_front(df[df["top1_drop"] <= 4.0], ("top1", "gflops"))
    assert len(got) and (got["top1"] >= 6.0).all()


def test_front_on_a_study(storage):
    make_study(storage, "s", POINTS)
    df = query.load("s", storage)
    assert query.front(df)["number"].tolist() == [0, 1, 2, 4, 5]
    assert query.front(df, "top1,gflops", budgets=Budgets(max_gflops=2.6))["number"].tolist() == [2, 4, 5]
    assert query.front(df, budgets=Budgets(max_gflops=2.6, min_top1=77.5))["number"].tolist() == [2]
    assert query.front(df, budgets=Budgets(max_gflops=0.5)).empty
    assert query.best(df, budgets=Budgets(max_gflops=2.6))["number"] == 2
    assert query.front(df, budgets=Budgets(max_top1_drop=2.0))["number"].tolist() == [0, 1, 2]  # top1 >= 78 of 80
    assert query.best(df, budgets=Budgets(max_gflops=2.6, max_top1_drop=2.0))["number"] == 2
    assert query.best(df, budgets=Budgets(max_gflops=2.6, max_top1_drop=1.0)) is None
    assert query.front(df.drop(columns="top1_drop"), budgets=Budgets(max_top1_drop=50.0)).empty  # older studies
    assert query.best(df, budgets=Budgets(max_gflops=0.5)) is None


def test_a_trial_that_took_the_values_of_a_front_trial_is_not_shown_twice(storage):
    """A search gives a repeated plan the values of the trial that measured it (``same_plan_as``)."""
    from paretoken.search.pareto import front_trials
    from paretoken.search.report import front_table

    study = make_study(storage, "s", POINTS, failed=0)
    repeat = trial_attrs(keep_plan(0.6), 78.0, 2.5, same_plan_as=2)
    study.add_trial(optuna.trial.create_trial(values=[78.0, 2.5], user_attrs=repeat))
    df = query.load("s", storage)
    assert df["same_plan_as"].tolist() == [None] * 6 + [2]
    assert query.front(df)["number"].tolist() == [0, 1, 2, 4, 5]
    assert query.front(df.drop(index=2))["number"].tolist() == [0, 1, 6, 4, 5]  # alone, the repeat stands
    assert sorted(t.number for t in front_trials(study)) == [0, 1, 2, 4, 5]
    assert sorted(front_table(study, ("top1", "gflops"))["trial"]) == [0, 1, 2, 4, 5]


def test_bad_objectives_are_one_line():
    df = random_frame(0)
    with pytest.raises(ParetokenError, match="'accuracy' is unknown; valid: top1"):
        query.front(df, ("accuracy", "gflops"))
    with pytest.raises(ParetokenError, match="not a column"):
        query.front(df, ("top1", "latency_ms"))


# --------------------------------------------------------------------------- hypervolume
def test_hypervolume_hand_computed():
    # top1 max, gflops min, reference (top1 50, gflops 4): in (gflops, -top1) the points
    # (1, -60), (2, -70), (3, -80) give the staircase 3*10 + 2*10 + 1*10 = 60 -> in units
    # (gflops, top1): [1,4]x[50,60] + [2,4]x[60,70] + [3,4]x[70,80] = 30 + 20 + 10 = 60.
    df = pd.DataFrame({"number": range(6), "state": ["COMPLETE"] * 5 + ["FAIL"],
                       "top1": [60.0, 70.0, 80.0, 55.0, 90.0, 99.0], "gflops": [1.0, 2.0, 3.0, 2.5, 5.0, 0.1]})
    # (2.5, 55) is dominated; (5.0, 90) lies beyond the reference; the FAIL row is ignored.
    assert query.hypervolume(df, ("top1", "gflops"), {"top1": 50.0, "gflops": 4.0}) == pytest.approx(60.0)
    assert query.hypervolume(df, ("gflops", "top1"), (4.0, 50.0)) == pytest.approx(60.0)
    assert query.hypervolume(df.iloc[:1], ("top1", "gflops"), (50.0, 4.0)) == pytest.approx(30.0)
    assert query.hypervolume(df.iloc[:0], ("top1", "gflops"), (50.0, 4.0)) == 0.0
    history = query.hypervolume_history(df, ("top1", "gflops"), (50.0, 4.0))
    assert history["hypervolume"].tolist() == pytest.approx([30.0, 50.0, 60.0, 60.0, 60.0, 60.0])


def test_hypervolume_against_monte_carlo_in_3d():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"number": range(15), "state": "COMPLETE", "top1": rng.uniform(0, 1, 15),
                       "gflops": rng.uniform(0, 1, 15), "kl": rng.uniform(0, 1, 15)})
    ref = {"top1": 0.0, "gflops": 1.0, "kl": 1.0}
    samples = rng.uniform(0, 1, (200_000, 3))  # (top1, gflops, kl) in the unit cube
    pts = df[["top1", "gflops", "kl"]].to_numpy()
    covered = np.zeros(len(samples), dtype=bool)
    for t, g, k in pts:
        covered |= (samples[:, 0] <= t) & (samples[:, 1] >= g) & (samples[:, 2] >= k)
    assert query.hypervolume(df, ("top1", "gflops", "kl"), ref) == pytest.approx(covered.mean(), abs=5e-3)


def test_reference_point_from_the_uncompressed_trial(storage):
    make_study(storage, "s", POINTS)
    df = query.load("s", storage)
    assert query.reference_point(df) == {"top1": 70.0, "gflops": 4.0}
    assert query.reference_point(df[df["number"] > 0]) == {"top1": 60.0, "gflops": 3.0}  # worst values
    # staircase over (gflops, top1) against (4, 70): evit (3, 79.5), keep0.6 (2.5, 78), tome (2, 77)
    expected = (4 - 3) * (79.5 - 70) + (3 - 2.5) * (78 - 70) + (2.5 - 2) * (77 - 70)
    assert query.hypervolume(df) == pytest.approx(expected)


def test_only_a_plan_that_changes_nothing_is_the_uncompressed_model():
    """A plan with no stages but prefix_only_last is cheaper than the uncompressed model: it is not the
    reference, even when it ran first."""
    from paretoken.compress.plan import Plan
    from paretoken.search import pareto

    study = optuna.create_study(directions=["maximize", "minimize"])
    for plan, (top1, gflops) in ((Plan(prefix_only_last=True), (80.0, 4.289)), (Plan(), (80.0, 4.608))):
        trial = study.ask()
        for key, value in (("plan", plan.to_dict()), ("top1", top1), ("gflops", gflops)):
            trial.set_user_attr(key, value)
        study.tell(trial, [top1, gflops])
    df = query.trials_frame(study)
    assert query.uncompressed_rows(df)["number"].tolist() == [1]
    assert query.reference_point(df) == {"top1": 70.0, "gflops": 4.608} and pareto.baseline(study)["gflops"] == 4.608


def test_compare_studies(tmp_path):
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    make_study(a, "tpe", POINTS)
    make_study(b, "random", POINTS[:3], failed=2)
    optuna.load_study(study_name="random", storage=b).add_trial(  # killed: no error, its plan re-run
        optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"plan": keep_plan(0.7).to_dict()}))
    table = query.compare([("tpe", a), ("random", b)], budgets=Budgets(max_gflops=3.0))
    assert table["study"].tolist() == ["tpe", "random"]
    assert table["trials"].tolist() == [7, 6] and table["failed"].tolist() == [1, 2]
    assert table["interrupted"].tolist() == [0, 1]
    assert table["front_size"].tolist() == [4, 2]
    assert table["best_top1"].tolist() == [79.5, 79.5] and table["best_trial"].tolist() == [1, 1]
    assert table.attrs["reference"] == {"top1": 70.0, "gflops": 4.0}
    assert table.loc[0, "hypervolume"] > table.loc[1, "hypervolume"] > 0


def test_non_dominated_keeps_duplicates():
    points = np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [0.5, 3.0]])
    assert query.non_dominated(points).tolist() == [True, True, False, True]
    for perm in itertools.permutations(range(4)):
        assert query.non_dominated(points[list(perm)]).tolist() == [
            [True, True, False, True][i] for i in perm]


def test_dominating_matches_the_pairwise_definition():
    """Strict dominance, and the slack form (within slack in every column, strictness not needed)."""
    rng = np.random.default_rng(0)
    points = rng.integers(0, 4, size=(200, 2)).astype(float)
    target = np.array([2.0, 1.0])
    strict = [all(a <= b for a, b in zip(p, target)) and any(a < b for a, b in zip(p, target)) for p in points]
    assert query.dominating(points, target).tolist() == strict
    assert not query.dominating(target[None], target)[0]  # a point does not dominate itself
    slack = np.array([1.0, 0.0])
    within = [p[0] - 1.0 <= target[0] and p[1] <= target[1] for p in points]
    assert query.dominating(points, target, slack).tolist() == within
    assert sum(within) > sum(strict)


def test_front_and_hypervolume_agree_with_the_search(storage):
    """The search's front is Optuna's best_trials, and its hypervolume is the one `paretoken front` reports."""
    from paretoken.search import pareto

    study = make_study(storage, "agree", POINTS, failed=1, max_gflops=3.0)
    df = query.load("agree", storage)
    assert {t.number for t in pareto.front_trials(study)} == {t.number for t in study.best_trials}
    assert set(query.front(df)["number"]) == {t.number for t in study.best_trials}
    objectives = ("top1", "gflops")
    reference = pareto.reference_point(pareto.baseline(study), objectives)
    assert query.reference_point(df, objectives) == reference
    assert query.hypervolume(df, objectives) == pytest.approx(pareto.hypervolume(study.trials, objectives, reference))


@pytest.mark.parametrize("seed", range(4))
def test_presets_dominated_matches_the_pairwise_definition(seed):
    """A preset counts when some COMPLETE, feasible, searched row is no worse in every objective and better
    in one (or, with slack, within the slack in every objective); the uncompressed model is no preset."""
    rng = random.Random(seed)
    df = random_frame(seed).assign(feasible=lambda d: [rng.random() < 0.8 for _ in range(len(d))], preset=None)
    names = ["uncompressed", "tome-r8", "tome-r13", "evit-0.7", "asvit"]
    picks = rng.sample(range(len(df)), len(names))
    df.loc[picks, "preset"] = names
    df.loc[picks, "state"] = "COMPLETE"
    in_order = [name for _, name in sorted(zip(picks, names))]  # the table's order
    searched = df[df["preset"].isna() & (df["state"] == "COMPLETE") & df["feasible"]]
    for slack in (None, {"top1": 0.5}):
        give = (slack or {}).get("top1", 0.0)
        expected = []
        for row in df.loc[sorted(picks)].itertuples():
            name = row.preset
            if name == "uncompressed":
                continue
            for s in searched.itertuples():
                no_worse = s.top1 + give >= row.top1 and s.gflops <= row.gflops
                better = s.top1 > row.top1 or s.gflops < row.gflops
                if no_worse and (better or slack is not None):
                    expected.append(name)
                    break
        assert query.presets_dominated(df, ("top1", "gflops"), slack) == expected
    assert query.preset_names(df) == [name for name in in_order if name != "uncompressed"]
