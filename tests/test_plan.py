"""The Plan: round trips, validation messages, presets."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

import paretoken
from paretoken import Plan, Stage
from paretoken.compress.presets import PRESETS

FULL = {"version": 1, "stages": [
    {"layer": 0, "op": "merge", "score": "keys", "r": 8},
    {"layer": 2, "op": "prune", "score": "head_weighted", "keep": 0.7},
    {"layer": 3, "op": "prune_fuse", "score": "cls_attn", "r": 20},
    {"layer": 5, "op": "joint", "score": "cls_attn", "mass": 0.9, "sim": 0.45},
    {"layer": 7, "op": "threshold", "score": "head_weighted", "threshold": 0.6},
    {"layer": 9, "op": "slim", "score": "cls_attn", "keep": 0.5},
], "prefix_only_last": True}


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_round_trip_is_exact(tmp_path, suffix):
    plan = Plan.from_dict(FULL)
    assert plan.to_dict() == FULL
    path = plan.save(tmp_path / f"plan{suffix}")
    loaded = paretoken.load_plan(path)
    assert loaded == plan and loaded.to_dict() == FULL
    if suffix == ".json":
        assert json.loads(path.read_text()) == FULL


def test_defaults_and_ordering():
    plan = Plan((Stage(6, "merge", r=4), Stage(2, "threshold", threshold=1.0)))
    assert [s.layer for s in plan.stages] == [2, 6]
    assert plan.stages[0].score == "head_weighted" and plan.stages[1].score == "keys"
    assert plan.per_image and not Plan((Stage(1, "prune", keep=0.5),)).per_image


BAD = [
    ({"layer": 1, "op": "prun", "keep": 0.5},
     "stage 0: op 'prun' is unknown; valid: prune, prune_fuse, merge, joint, threshold, slim, pitome, "
     "prune_merge"),
    ({"layer": 1, "op": "prune", "keep": 1.5}, "stage 0: keep 1.5 is out of range; valid: 0 < keep <= 1"),
    ({"layer": 1, "op": "prune", "keep": 0}, "stage 0: keep 0 is out of range; valid: 0 < keep <= 1"),
    ({"layer": 1, "op": "merge", "r": -2}, "stage 0: r -2 is invalid; valid: an integer >= 0"),
    ({"layer": 1, "op": "merge", "r": 2.5}, "stage 0: r 2.5 is invalid; valid: an integer >= 0"),
    ({"layer": -1, "op": "merge", "r": 2}, "stage 0: layer -1 is invalid; valid: a block index, an integer >= 0"),
    ({"layer": 1, "op": "merge", "r": 2, "score": "cls_attn"},
     "stage 0: score 'cls_attn' does not fit op 'merge'; valid: keys"),
    ({"layer": 1, "op": "prune", "keep": 0.5, "score": "attention"},
     "stage 0: score 'attention' is unknown; valid: cls_attn, head_weighted, keys, predictor"),
    ({"layer": 1, "op": "prune", "keep": 0.5, "r": 3}, "stage 0: op 'prune' needs exactly one of keep or r; got 2"),
    ({"layer": 1, "op": "prune"}, "stage 0: op 'prune' needs exactly one of keep or r; got 0"),
    ({"layer": 1, "op": "joint", "mass": 0.5}, "stage 0: op 'joint' needs exactly one of sim; got 0"),
    ({"layer": 1, "op": "joint", "mass": 0.5, "sim": 2}, "stage 0: sim 2 is out of range; valid: -1 <= sim <= 1"),
    ({"layer": 1, "op": "threshold", "threshold": 0.5, "keep": 0.5},
     "stage 0: field 'keep' does not apply to op 'threshold'; valid: threshold"),
    ({"layer": 1, "op": "threshold", "threshold": -1}, "stage 0: threshold -1 is out of range; valid: threshold > 0"),
    ({"layer": 1, "op": "prune", "keep": 0.5, "ratio": 2}, "stage 0: field 'ratio' is unknown; valid: layer, op, "
     "score, keep, r"),
    ({"layer": 1, "op": "merge", "r": 2, "fuse": "sum"}, "stage 0: fuse 'sum' is unknown; valid: average, mlerp, drop"),
    ({"layer": 1, "op": "prune", "keep": 0.5, "fuse": "mlerp"}, "stage 0: field 'fuse' does not apply to op 'prune'; "
     "valid: keep/r"),
    ({"op": "prune", "keep": 0.5}, "stage 0: field 'layer' is missing"),
]


@pytest.mark.parametrize("stage,message", BAD, ids=[m for _, m in BAD])
def test_validation_names_field_value_and_valid_values(stage, message):
    with pytest.raises(paretoken.ParetokenError) as err:
        Plan.from_dict({"version": 1, "stages": [stage]})
    assert str(err.value) == message and "\n" not in str(err.value)


def test_plan_level_errors(tmp_path):
    with pytest.raises(paretoken.ParetokenError, match="layer 3 has two stages"):
        Plan.from_dict({"stages": [{"layer": 3, "op": "merge", "r": 1}, {"layer": 3, "op": "prune", "keep": 0.5}]})
    with pytest.raises(paretoken.ParetokenError, match="version 2 is unsupported; valid: 1"):
        Plan.from_dict({"version": 2, "stages": []})
    with pytest.raises(paretoken.ParetokenError, match="does not exist"):
        paretoken.load_plan(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("stages: [ {layer: 1\n")
    with pytest.raises(paretoken.ParetokenError, match="not valid YAML/JSON"):
        paretoken.load_plan(tmp_path / "bad.yaml")
    with pytest.raises(paretoken.ParetokenError, match="layer 12 is out of range; valid: 0..11"):
        Plan.from_dict({"stages": [{"layer": 12, "op": "merge", "r": 1}]}).check_depth(12)
    with pytest.raises(paretoken.ParetokenError) as err:
        Plan.from_dict({"stages": [], "prefix_only_last": "yes"})
    assert str(err.value) == "plan: prefix_only_last 'yes' is invalid; valid: true, false"
    with pytest.raises(paretoken.ParetokenError) as err:
        Plan.from_dict({"stages": [], "prefix_only": True})
    assert str(err.value) == "plan: field 'prefix_only' is unknown; valid: version, stages, prefix_only_last, meta"


def test_prefix_only_last_is_part_of_the_plan():
    plain = Plan((Stage(3, "merge", r=4),))
    short = Plan((Stage(3, "merge", r=4),), prefix_only_last=True)
    assert short != plain and "prefix_only_last" not in plain.to_dict()  # old plan files read and write as before
    assert short.describe() == "L3 merge(score=keys, r=4); prefix-only last block"
    assert Plan(prefix_only_last=True).describe() == "prefix-only last block"
    moot = Plan((Stage(3, "merge", r=4), Stage(11, "prune", keep=0.5)), prefix_only_last=True)
    assert moot.stages_run(12) == short.stages and moot.stages_run(13) == moot.stages  # only the last block's
    assert dataclasses.replace(moot, prefix_only_last=False).stages_run(12) == moot.stages
    # a stored plan as it runs: moot stage dropped, provenance and int/float spelling not telling plans apart
    from paretoken.compress.plan import plan_as_run

    stored = {**moot.to_dict(), "meta": {"from": "an export"}}
    assert plan_as_run(stored, 12) == short and hash(plan_as_run(stored, 12)) == hash(short)
    assert plan_as_run(moot.to_dict(), 13) == moot != short
    whole = {"stages": [{"layer": 3, "op": "prune", "keep": 1}]}
    assert plan_as_run(whole, 12) == Plan((Stage(3, "prune", keep=1.0),))
    assert plan_as_run({"stages": 3}, 12) is None and plan_as_run(None, 12) is None
    from paretoken.results.query import plan_label

    assert plan_label(short) == "merge(r=4)@3 + prefix-only last" and plan_label(Plan(prefix_only_last=True)) == (
        "prefix-only last")


def test_a_date_in_a_plan_files_meta_reads_as_the_string_it_is(tmp_path):
    path = tmp_path / "dated.yaml"
    path.write_text("version: 1\nmeta: {made: 2024-05-01}\nstages:\n  - {layer: 3, op: prune, keep: 0.7}\n")
    plan = paretoken.load_plan(path)
    assert plan.meta == {"made": "2024-05-01"}
    assert paretoken.load_plan(plan.save(tmp_path / "again.YAML")).meta == plan.meta  # YAML whatever the case
    assert (tmp_path / "again.YAML").read_text().startswith("version: 1")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_meta_numbers_that_are_not_finite_read_and_write_as_null(tmp_path, suffix):
    path = tmp_path / "nan.yaml"
    path.write_text("version: 1\nmeta: {metrics: {top1: .nan, kl: .inf}, runs: [1, -.inf]}\nstages: []\n")
    assert paretoken.load_plan(path).meta == {"metrics": {"top1": None, "kl": None}, "runs": [1, None]}
    built = Plan(meta={"metrics": {"kl": math.inf}, "runs": (math.nan, 2.5)})  # as a library caller makes one
    written = built.save(tmp_path / f"built{suffix}")
    assert paretoken.load_plan(written).meta == {"metrics": {"kl": None}, "runs": [None, 2.5]}
    assert json.dumps(built.to_dict(), allow_nan=False)  # strict JSON, as studies store it


def test_plan_files_read_as_written(tmp_path):
    """Exponent floats are numbers (YAML 1.2; PyYAML's 1.1 made them strings); a key given twice is
    refused (PyYAML kept the last one silently)."""
    (tmp_path / "exp.yaml").write_text("stages:\n  - {layer: 2, op: threshold, threshold: 5e-1}\n")
    assert paretoken.load_plan(tmp_path / "exp.yaml").stages[0].threshold == 0.5
    (tmp_path / "twice.yaml").write_text("stages:\n  - {layer: 2, op: merge, r: 4}\nstages: []\n")
    with pytest.raises(paretoken.ParetokenError, match=r"\(line 3: duplicate key 'stages'\)"):
        paretoken.load_plan(tmp_path / "twice.yaml")
    (tmp_path / "merged.yaml").write_text("meta: {base: &b {op: prune, keep: 0.7}}\nstages:\n"
                                          "  - {<<: *b, layer: 3}\n  - {<<: *b, layer: 6, keep: 0.5}\n")
    assert [s.keep for s in paretoken.load_plan(tmp_path / "merged.yaml").stages] == [0.7, 0.5]  # a merge key overridden
    meta = {"study": "1e5", "commit": "12e4567", "lr": 1e-05}  # strings that look like floats stay strings
    assert paretoken.load_plan(Plan(meta=meta).save(tmp_path / "meta.yaml")).meta == meta


def test_presets_are_valid_and_documented():
    expected = {"tome-r8", "tome-r13", "tome-r16", "evit-0.7", "evit-0.5", "dynamicvit-0.7", "asvit", "jmp", "slim",
                "pitome-0.9", "pitome-0.925", "tofu-r13", "diffrate-2.9", "diffrate-2.3"}
    assert set(PRESETS) == expected
    for name, p in PRESETS.items():
        assert p.source and p.plan.stages, name
        p.plan.check_depth(12)
        assert Plan.from_dict(p.plan.to_dict()) == p.plan
    slim = [s.keep for s in paretoken.preset("slim").stages]
    assert all(k <= 1 for k in slim)  # counts never grow with depth
    pitome = [(s.r, s.margin) for s in paretoken.preset("pitome-0.9").stages]  # PiToMe's own count and margins
    assert pitome[:3] == [(19, 0.75), (17, 0.6875), (16, 0.625)] and len(pitome) == 12
    tofu = paretoken.preset("tofu-r13").stages
    assert [s.fuse for s in tofu] == ["drop"] * 7 + ["mlerp"] * 5 and {s.r for s in tofu} == {13}
    # DiffRate's kept counts (class token included) after pruning and after merging, block by block
    counts, tokens = [], 197
    for s in paretoken.preset("diffrate-2.9").stages:
        counts.append((tokens - s.pruned, tokens - s.pruned - s.merged))
        tokens -= s.pruned + s.merged
    assert counts[:3] == [(196, 194), (190, 176), (168, 156)] and counts[-1] == (3, 3)
    with pytest.raises(paretoken.ParetokenError, match="preset: 'tome' is unknown; valid: tome-r8"):
        paretoken.preset("tome")
