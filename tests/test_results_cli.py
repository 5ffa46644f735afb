"""`paretoken front` and `paretoken export` on real Optuna studies: tables, JSON, CSV, plots, errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest

import paretoken
from paretoken.cli import main
from paretoken.evaluators.metrics import CATALOG, METRICS, format_metric
from paretoken.results import query
from test_results_query import POINTS, make_study

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture()
def storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    make_study(url, "s", POINTS, failed=1)
    return url


def test_format_metric_by_the_catalog_and_columns_named_after_a_metric() -> None:
    assert format_metric("gflops", 0.123456) == "0.1235" and format_metric("best_gflops", 0.123456) == "0.1235"
    assert format_metric("held_out_top1", 87.6543) == "87.65" and format_metric("top1_drop", 0.2) == "0.20"
    assert format_metric("img_per_s", 123.6) == "124" and format_metric("interval", 0.123456) == "0.1235"
    assert format_metric("kl", 0.00301) == "0.00301" and format_metric("kl", 3e-5) == "3e-05"  # significant digits
    assert format_metric("top1", math.nan) == "-" and format_metric("preset", "tome-r8") == "tome-r8"
    assert set(METRICS) == set(CATALOG) and all(CATALOG[m].direction in ("maximize", "minimize") for m in METRICS)


def test_front_table(storage, capsys):
    assert main(["front", "--study", "s", "--storage", storage, "--max-gflops", "2.6"]) == 0
    out = capsys.readouterr().out
    assert "7 trials, 6 complete, 1 fail" in out and "front on top1, gflops within gflops <= 2.6: 3 trials" in out
    assert "hypervolume" in out and "reference top1 70, gflops 4" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("number"))
    rows = lines[header + 1:]
    assert [int(r.split()[0]) for r in rows] == [2, 4, 5]
    assert "tome-r13" in rows[1] and "merge(r=13)@0-11" in rows[1] and "2.0000" in rows[1]


def test_front_json_csv_and_plot(storage, tmp_path, capsys):
    assert main(["front", "--study", "s", "--storage", storage, "--objectives", "top1,gflops", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["number"] for r in data["front"]] == [0, 1, 2, 4, 5]
    assert data["trials"] == {"COMPLETE": 6, "FAIL": 1} and data["reference"] == {"top1": 70.0, "gflops": 4.0}
    assert data["front"][1]["preset"] == "evit-0.7" and data["front"][0]["peak_mem_mb"] is None
    assert paretoken.Plan.from_dict(data["front"][1]["plan"]) == paretoken.preset("evit-0.7")
    assert data["hypervolume"] == pytest.approx(query.hypervolume(query.load("s", storage)))

    csv, png = tmp_path / "front.csv", tmp_path / "front.png"
    history = tmp_path / "hv.html"
    assert main(["front", "--study", "s", "--storage", storage, "--min-top1", "78", "--csv", str(csv),
                 "--plot", str(png), "--history", str(history)]) == 0
    assert "hypervolume" in history.read_text()
    table = pd.read_csv(csv)
    assert table["number"].tolist() == [0, 1, 2]
    assert json.loads(table.loc[1, "plan"]) == paretoken.preset("evit-0.7").to_dict()
    assert png.stat().st_size > 10_000

    capsys.readouterr()
    assert main(["front", "--study", "s", "--storage", storage, "--max-top1-drop", "2", "--max-gflops", "3",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["number"] for r in data["front"]] == [1, 2]
    assert data["budgets"] == {"max_gflops": 3.0, "min_top1": None, "max_top1_drop": 2.0}
    assert main(["front", "--study", "s", "--storage", storage, "--max-top1-drop", "2"]) == 0
    assert "within top1_drop <= 2: 3 trials" in capsys.readouterr().out


def test_front_compares_several_studies(storage, capsys):
    make_study(storage, "t", POINTS[:3], failed=0)
    assert main(["front", "--study", "s", "--study", "t", "--storage", storage, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["study"] for s in data["studies"]] == ["s", "t"]
    assert [s["front_size"] for s in data["studies"]] == [5, 3]


def test_export_cli(storage, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["export", "--study", "s", "--storage", storage, "--best", "--max-gflops", "2.6",
                 "--out", str(out)]) == 0
    assert "trial 2 of study s" in capsys.readouterr().out
    plan = paretoken.load_plan(out)
    assert plan.meta["provenance"]["trial"] == 2 and plan.meta["metrics"]["top1"] == 78.0
    assert main(["export", "--study", "s", "--storage", storage, "--trial", "1", "--out", str(out)]) == 0
    assert paretoken.load_plan(out) == paretoken.preset("evit-0.7")
    # the fewest GFLOPs within a top-1 floor: tome-r13 (77.0 at 2.0), not keep 0.3 (60.0 at 1.0)
    assert main(["export", "--study", "s", "--storage", storage, "--cheapest", "--min-top1", "77",
                 "--out", str(out)]) == 0
    assert paretoken.load_plan(out) == paretoken.preset("tome-r13")
    assert main(["export", "--study", "s", "--storage", storage, "--cheapest", "--out", str(out)]) == 0
    assert paretoken.load_plan(out).meta["provenance"]["trial"] == 5


@pytest.mark.parametrize("args,needle", [
    (["front", "--study", "nope"], "studies there: s"),
    (["front", "--study", "s", "--objectives", "top1,acc"], "objectives: 'acc' is unknown; valid: top1"),
    (["front", "--study", "s", "--plot", "front.gif"], "valid: a file ending in .png"),
    (["export", "--study", "s", "--trial", "6"], "trial 6 is FAIL (RuntimeError: out of memory)"),
    (["export", "--study", "s", "--best", "--max-gflops", "0.1"], "no COMPLETE trial within gflops <= 0.1"),
    (["front", "--study", "s", "--objectives", "top1,peak_mem_mb"], "no COMPLETE trial has 'peak_mem_mb'"),
    (["front", "--study", "s", "--plot", "/proc/no/front.png"], "/proc/no"),
    (["front", "--study", "s", "--csv", "/dev/null/front.csv"], "/dev/null"),
])
def test_bad_input_is_one_line_exit_2(storage, tmp_path, capsys, args, needle):
    assert main([*args, "--storage", storage]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("paretoken: error: ") and needle in err[0]


def test_bad_input_in_a_fresh_process_has_no_warning_or_traceback(storage, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "paretoken.cli", "export", "--study", "s", "--storage", storage,
                           "--trial", "6", "--out", str(tmp_path / "p.yaml")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "paretoken: error: export: trial 6 is FAIL (RuntimeError: out of memory); export a COMPLETE trial"]
    proc = subprocess.run([sys.executable, "-m", "paretoken.cli", "front", "--study", "absent"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "studies/absent.db" in proc.stderr and not (tmp_path / "studies").exists()
