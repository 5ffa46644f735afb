"""`paretoken holdout` and paretoken.results.holdout: a real search's front re-measured on test images
the search never saw, checked against a hand-written evaluation of those images."""
from __future__ import annotations

import json

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


def _top1_by_hand(plan: dict, checkpoint) -> float:
    """Top-1 (%) of ``plan`` on test images 16..39 of the seeded order: a plain forward, no evaluator."""
    model = create_model("default", checkpoint=checkpoint)
    images, labels = load_split(None, model, "eval", n=SEARCH_IMAGES + HELD_OUT, seed=0)
    paretoken.apply(model, paretoken.Plan.from_dict(plan))
    model.eval()
    with torch.no_grad():
        predicted = model(images[SEARCH_IMAGES:]).argmax(1)
    return 100.0 * (predicted == labels[SEARCH_IMAGES:]).float().mean().item()


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
    for number, row in rows.items():
        trial = df.set_index("number").loc[number]
        assert row["top1_search"] == pytest.approx(trial["top1"])
        assert row["top1"] == pytest.approx(_top1_by_hand(row["plan"], checkpoint), abs=1e-4)
        assert row["top1_drop"] == pytest.approx(rows[0]["top1"] - row["top1"], abs=1e-4)
        assert row["gflops"] == pytest.approx(trial["gflops"])
    # other images than the search's: some plan's top-1 moved (random weights, 16 and 24 images)
    assert any(row["top1"] != pytest.approx(row["top1_search"]) for row in rows.values())
    held = pd.DataFrame(data["trials"]).assign(feasible=True, state="COMPLETE")
    assert data["front_held_out"] == query.front(held)["number"].tolist()
    assert set(data["presets"]) == set(df["preset"].dropna()) - {"uncompressed"}

    png = tmp_path / "held.png"
    assert main(["holdout", "--study", "small", "--storage", storage, "--images", str(HELD_OUT), "--plot",
                 str(png)]) == 0
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert f"on {HELD_OUT} test images after the search's {SEARCH_IMAGES}" in out
    assert "held_out_top1" in out and "presets dominated by a searched plan:" in out


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


@pytest.mark.parametrize(("args", "needle"), [
    (["--images", "0"], "images: 0 is not a positive number of held-out test images"),
    (["--images", "20000"], "images: 20000 is not in 1..9984"),
    (["--objectives", "top1,speed"], "objectives:"),
    (["--batch-size", "0"], "batch-size: 0 is invalid; valid: an integer >= 1"),
    (["--plot", "held.jpg"], "plot: 'held.jpg' has suffix '.jpg'"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device: "),
])
def test_bad_input_is_one_line_exit_2(searched, capsys, args, needle):
    storage, _ = searched
    assert main(["holdout", "--study", "small", "--storage", storage, *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_a_study_without_measurement_settings_is_one_line(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'made.db'}"
    make_study(storage, "made", POINTS)
    assert main(["holdout", "--study", "made", "--storage", storage]) == 2
    assert "study: it has no measurement settings" in capsys.readouterr().err
