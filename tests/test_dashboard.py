"""optuna-dashboard (the README's viewer) serves a study written by a real search: objective names,
every trial with its plan and metrics, a failed trial with its error."""
from __future__ import annotations

import json
from wsgiref.util import setup_testing_defaults

import optuna
import optuna_dashboard

import paretoken
from paretoken.evaluators.evaluate import EvalConfig
from paretoken.search import enqueue_plan, run_search
from paretoken.search.storage import open_storage


def _get(app, path: str) -> dict:
    """GET ``path`` from the WSGI ``app``: the decoded JSON body (asserts status 200)."""
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, REQUEST_METHOD="GET")
    status: list[str] = []
    body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
    assert status == ["200 OK"], (path, status, body[:300])
    return json.loads(body)


def test_dashboard_shows_the_search_trials_with_plans_and_metrics(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = "sqlite:///studies/dash.db"
    config = EvalConfig(checkpoint=checkpoint, images=16, batch_size=16, speed=False, flops_images=2)
    run_search("dash", storage=storage, space="evit", n_trials=0, eval_config=config, log=lambda line: None)
    study = optuna.load_study(study_name="dash", storage=open_storage(storage))
    enqueue_plan(study, paretoken.Plan((paretoken.Stage(20, "prune", keep=0.5),)), label="bad-layer")
    run_search("dash", storage=storage, space="evit", n_trials=4, eval_config=config, log=lambda line: None)

    app = optuna_dashboard.wsgi(open_storage(storage))
    summaries = _get(app, "/api/studies")["study_summaries"]
    assert [(s["study_name"], s["directions"]) for s in summaries] == [("dash", ["maximize", "minimize"])]
    detail = _get(app, f"/api/studies/{summaries[0]['study_id']}")
    assert detail["objective_names"] == ["top1", "gflops"]  # from study.set_metric_names
    stored = {t.number: t for t in study.get_trials()}
    shown = {t["number"]: t for t in detail["trials"]}
    assert set(shown) == set(stored) and len(shown) == 4
    states = set()
    for number, trial in shown.items():
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert json.loads(attrs["plan"]) == stored[number].user_attrs["plan"]
        states.add(trial["state"])
        if trial["state"] == "Complete":
            assert trial["values"] == stored[number].values
            assert float(attrs["top1"]) == stored[number].user_attrs["top1"] == trial["values"][0]
        else:
            assert trial["state"] == "Fail" and "layer 20 is out of range" in attrs["error"]
    assert states == {"Complete", "Fail"}
