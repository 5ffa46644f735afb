"""`paretoken holdout` and paretoken.results.holdout: a real search's front re-measured on test images
the search never saw, checked against a hand-written evaluation of those images."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch

import paretoken
from paretoken.cli import main
from paretoken.evaluators import evaluate as ev
from paretoken.evaluators.data import load_split
from paretoken.evaluators.models import build_default_architecture, create_model
from paretoken.results import holdout, query
from paretoken.search import run_search
from test_results_query import POINTS, make_study

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
SEARCH_IMAGES, HELD_OUT = 16, 24


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """(storage URL, checkpoint): a 6-trial evit search measured on the first 16 test images."""
    root = tmp_path_factory.mktemp("holdout")
    torch.manual_seed(0)
    checkpoint = root / "weights.safetensors"
    safetensors.torch.save_file(build_default_architecture().state_dict(), str(checkpoint))
    config = ev.EvalConfig(checkpoint=str(checkpoint), images=SEARCH_IMAGES, batch_size=SEARCH_IMAGES, speed=False,
                           flops_images=2)
    storage = f"sqlite:///{root / 'studies.db'}"
    run_search("small", storage=storage, space="evit", n_trials=6, eval_config=config, seed=0, log=lambda line: None)
    return storage, checkpoint


def _correct_by_hand(plan: dict, checkpoint) -> torch.Tensor:
    """Which of test images 16..39 of the seeded order ``plan`` classifies right: a plain forward, no evaluator."""
    model = create_model("default", checkpoint=checkpoint)
    images, labels = load_split(None, model, "eval", n=SEARCH_IMAGES + HELD_OUT, seed=0)
    paretoken.apply(model, paretoken.Plan.from_dict(plan))
    model.eval()
    with torch.no_grad():
        predicted = model(images[SEARCH_IMAGES:]).argmax(1)
    return predicted == labels[SEARCH_IMAGES:]


def _mcnemar_interval(a: list[bool], b: list[bool]) -> tuple[float, float, float]:
    """(difference, low, high) of top-1(a) - top-1(b) in points with a 95 % normal interval, from the
    counts of discordant images (McNemar's b and c), written apart from the code under test."""
    n = len(a)
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    diff = (only_a - only_b) / n
    variance = ((only_a + only_b) / n - diff ** 2) * n / (n - 1)  # sample variance of the -1/0/1 differences
    half = 1.959963984540054 * (variance / n) ** 0.5
    return 100 * diff, 100 * (diff - half), 100 * (diff + half)


def test_holdout_remeasures_the_front_on_the_images_after_the_search(searched, tmp_path, capsys):
    storage, checkpoint = searched
    df = query.load("small", storage)
    assert main(["holdout", "--study", "small", "--storage", storage, "--images", str(HELD_OUT), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["held_out"] == {"images": HELD_OUT, "skip": SEARCH_IMAGES}
    rows = {r["number"]: r for r in data["trials"]}
    # the presets, the uncompressed model and the searched-only front, each with its search-time figure
    searched_front = query.front(df[df["preset"].isna()])["number"].tolist()
    presets = df.loc[df["preset"].notna(), "number"].tolist()
    assert sorted(rows) == sorted(presets + searched_front)
    correct = {number: _correct_by_hand(row["plan"], checkpoint).tolist() for number, row in rows.items()}
    for number, row in rows.items():
        trial = df.set_index("number").loc[number]
        assert row["top1_search"] == pytest.approx(trial["top1"])
        assert row["top1"] == pytest.approx(100.0 * sum(correct[number]) / HELD_OUT, abs=1e-4)
        assert row["top1_drop"] == pytest.approx(rows[0]["top1"] - row["top1"], abs=1e-4)
        assert row["gflops"] == pytest.approx(trial["gflops"])
    # other images than the search's: some plan's top-1 moved (random weights, 16 and 24 images)
    assert any(row["top1"] != pytest.approx(row["top1_search"]) for row in rows.values())
    held = pd.DataFrame(data["trials"]).assign(feasible=True, state="COMPLETE")
    assert data["front_held_out"] == query.front(held)["number"].tolist()
    assert set(data["presets"]) == set(df["preset"].dropna()) - {"uncompressed"}
    # each preset against the searched plan chosen on the search's images: the most top-1 there at no more GFLOPs
    assert [c["preset"] for c in data["challenges"]] == data["presets"]
    searched = [r for r in rows.values() if r["preset"] is None]
    for challenge in data["challenges"]:
        preset = rows[challenge["number"]]
        cheaper = [r for r in searched if r["gflops"] <= preset["gflops"]]
        if not cheaper:
            assert challenge["challenger"] is None and challenge["verdict"] == "no searched plan at its GFLOPs"
            continue
        chosen = max(cheaper, key=lambda r: (r["top1_search"], -r["gflops"]))
        assert challenge["challenger"] == chosen["number"]
        diff, low, high = _mcnemar_interval(correct[chosen["number"]], correct[preset["number"]])
        assert (challenge["delta_held_out"], challenge["ci_low"], challenge["ci_high"]) == pytest.approx(
            (diff, low, high), abs=1e-6)
        assert challenge["delta_search"] == pytest.approx(chosen["top1_search"] - preset["top1_search"])
    assert any(c["challenger"] is not None for c in data["challenges"])

    png = tmp_path / "held.png"
    assert main(["holdout", "--study", "small", "--storage", storage, "--images", str(HELD_OUT), "--plot",
                 str(png)]) == 0
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert f"on {HELD_OUT} test images after the search's {SEARCH_IMAGES}" in out
    assert "held_out_top1" in out and "presets dominated by a searched plan:" in out
    assert "each preset against the searched plan" in out and "ci_95" in out


def _table(rows) -> pd.DataFrame:
    """A re-measured table: (number, preset, top1 held out, top1 on the search's images, gflops) rows."""
    return pd.DataFrame([{"number": n, "preset": p, "top1": t, "top1_search": s, "gflops": g, "state": "COMPLETE",
                          "feasible": True, "top1_drop_search": 0.0, "top1_drop": 0.0, "agreement": 0.0,
                          "agreement_search": 0.0, "kl": 0.0, "kl_search": 0.0}
                         for n, p, t, s, g in rows])


def test_summary_counts_dominance_on_each_set_of_images():
    held = _table([(0, "uncompressed", 90.0, 88.0, 4.0),
                   (1, "tome-r8", 89.0, 87.0, 3.0),    # beaten by 10 on the search's images only
                   (2, "tome-r16", 88.0, 87.0, 2.0),   # beaten by 11 on the held-out images only
                   (10, None, 88.5, 87.5, 2.9),
                   (11, None, 88.2, 86.8, 1.9)])
    figures = holdout.summary(held)
    assert figures["presets"] == ["tome-r8", "tome-r16"]
    assert figures["presets_dominated_search"] == ["tome-r8"]
    assert figures["presets_dominated_held_out"] == ["tome-r16"]
    assert figures["front_search"] == [0, 10, 2, 11]
    assert figures["front_held_out"] == [0, 1, 10, 11]
    # an infeasible searched plan dominates nothing, as it is not on the search's front
    assert query.presets_dominated(held.assign(feasible=held["number"] != 11)) == []


def test_preset_challenges_choose_on_the_search_images_and_judge_on_the_held_out_ones():
    n = 200
    hits = lambda k: np.arange(n) < k  # noqa: E731 - the first k of n images right
    held = _table([(0, "uncompressed", 90.0, 90.0, 4.0),
                   (1, "tome-r8", 50.0, 50.0, 3.0),
                   (2, "tome-r16", 80.0, 80.0, 2.0),
                   (3, "evit-0.7", 60.0, 60.0, 1.0),     # nothing searched is this cheap
                   (10, None, 60.0, 70.0, 2.9),          # the search images favour it...
                   (11, None, 99.0, 60.0, 1.9)])         # ...over this one, best on the held-out images
    held["correct"] = [hits(180), hits(100), hits(160), hits(120), hits(120), hits(198)]
    challenges = holdout.preset_challenges(held).set_index("preset")
    assert list(challenges.index) == ["tome-r8", "tome-r16", "evit-0.7"]
    r8, r16, evit = challenges.loc["tome-r8"], challenges.loc["tome-r16"], challenges.loc["evit-0.7"]
    assert r8["challenger"] == 10 and r8["delta_search"] == pytest.approx(20.0)
    assert r8["delta_held_out"] == pytest.approx(10.0) and r8["ci_low"] > 0 and r8["verdict"] == "searched better"
    assert r16["challenger"] == 11 and r16["delta_search"] == pytest.approx(-20.0)
    diff, low, high = _mcnemar_interval(list(hits(198)), list(hits(160)))
    assert (r16["delta_held_out"], r16["ci_low"], r16["ci_high"]) == pytest.approx((diff, low, high))
    assert r16["verdict"] == "searched better"
    assert evit["challenger"] is None and evit["verdict"] == "no searched plan at its GFLOPs"
    # the same images right: no difference, no noise; a worse challenger is "preset better"
    held["correct"] = [hits(180), hits(100), hits(160), hits(120), hits(100), hits(100)]
    challenges = holdout.preset_challenges(held).set_index("preset")
    assert challenges.loc["tome-r8", ["delta_held_out", "ci_low", "ci_high"]].tolist() == [0.0, 0.0, 0.0]
    assert challenges.loc["tome-r8", "verdict"] == "within noise"
    assert challenges.loc["tome-r16", "verdict"] == "preset better"


@pytest.mark.parametrize(("args", "needle"), [
    (["--images", "0"], "argument --images: '0' is out of range; valid: an integer >= 1"),
    (["--images", "20000"], "images: 20000 is invalid; valid: an integer in 1..9984"),
    (["--objectives", "top1,speed"], "objectives:"),
    (["--objectives", "top1,latency_ms"], "objectives: no COMPLETE trial has 'latency_ms' (not measured in this "
                                          "study); valid here: "),
    (["--objectives", "top1,speedup"], "objectives: no COMPLETE trial has 'speedup'"),  # its reference is fixed
    (["--batch-size", "0"], "argument --batch-size: '0' is out of range; valid: an integer >= 1"),
    (["--plot", "held.jpg"], "plot: 'held.jpg' has suffix '.jpg'"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device: "),
])
def test_bad_input_is_one_line_exit_2(searched, capsys, args, needle):
    storage, _ = searched
    try:
        code = main(["holdout", "--study", "small", "--storage", storage, *args])
    except SystemExit as stop:  # argparse
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def test_a_study_without_measurement_settings_is_one_line(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'made.db'}"
    make_study(storage, "made", POINTS)
    assert main(["holdout", "--study", "made", "--storage", storage]) == 2
    assert "study: it has no measurement settings" in capsys.readouterr().err


def test_a_corrupt_stored_plan_is_named_by_its_trial():
    rows = pd.DataFrame({"number": [0, 3], "plan": [{"version": 1, "stages": []}, "junk"],
                         "plan_str": ["uncompressed", "?"]})
    with pytest.raises(paretoken.ParetokenError, match="trial 3: its stored plan: expected a mapping"):
        holdout.remeasure(rows, ev.EvalConfig(images=8, batch_size=8, speed=False, flops_images=1))
