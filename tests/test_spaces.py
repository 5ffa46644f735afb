"""Search spaces: every sampled plan is valid, presets are expressible, plans apply to a timm ViT."""
from __future__ import annotations

import dataclasses
import warnings

import optuna
import pytest
import torch

import paretoken
from paretoken.compress.ops import get_op
from paretoken.compress.plan import Plan, Stage
from paretoken.errors import ParetokenError
from paretoken.evaluators.models import build_default_architecture
from paretoken.spaces import SPACES, get_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

FAMILY_OPS = {"tome": {"merge"}, "evit": {"prune_fuse"}, "dynamicvit": {"prune"}, "asvit": {"threshold"},
              "jmp": {"joint"}, "slim": {"slim"}, "mixed": {"prune", "prune_fuse", "merge", "joint", "threshold",
                                                                       "pitome", "prune_merge"}}

EXPRESSIBLE = {
    "tome": {"tome-r8", "tome-r13", "tome-r16"},
    "evit": {"evit-0.7", "evit-0.5"},
    "dynamicvit": {"dynamicvit-0.7"},
    "asvit": {"asvit"},
    "jmp": {"jmp"},
    "slim": {"slim"},
    "mixed": {"tome-r8", "tome-r13", "tome-r16", "evit-0.7", "evit-0.5", "dynamicvit-0.7", "asvit", "jmp"},
}


def _samples(space, n, depth=12, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    plans = []
    for _ in range(n):
        trial = study.ask()
        plan = space.sample(trial, depth)
        study.tell(trial, 0.0)
        plans.append((trial.params, plan))
    return plans


def test_registry_lists_every_family_and_rejects_unknown_names():
    assert set(SPACES) == set(FAMILY_OPS)
    for name, space in SPACES.items():
        assert get_space(name) is space and space.name == name
        assert space.description and space.params
        assert space.describe()["params"][0]["name"]
    with pytest.raises(ParetokenError) as err:
        get_space("tomee")
    message = str(err.value)
    assert "\n" not in message and "'tomee'" in message and all(n in message for n in SPACES)


@pytest.mark.parametrize("name", sorted(FAMILY_OPS))
@pytest.mark.parametrize("depth", [12, 4])
def test_many_random_samples_are_valid_plans(name, depth):
    space = get_space(name)
    plans = _samples(space, 200, depth=depth, seed=depth)
    distinct = {repr(p.to_dict()) for _, p in plans}
    assert len(distinct) > 100  # the space is not degenerate
    for params, plan in plans:
        assert isinstance(plan, Plan)
        plan.check_depth(depth)
        again = Plan.from_dict(plan.to_dict())  # the stored form rebuilds the same plan
        assert again == plan
        for stage in plan.stages:
            assert stage.op in FAMILY_OPS[name]
            assert stage.score in get_op(stage.op).scores and stage.score != "predictor"
            if stage.keep is not None:  # no float noise such as 0.7000000000000001
                assert stage.keep == round(stage.keep, 6) and 0 < stage.keep < 1
            if stage.r is not None:
                assert stage.r > 0
        # no stage of the space's choosing in the last block (moot under prefix_only_last); a schedule over
        # every block (ToMe's constant r or ramp, the mixed space's base ramp, a slim pyramid) keeps its entry,
        # derived from the others
        last = {s.layer: s for s in plan.stages}.get(depth - 1)
        if name in ("evit", "dynamicvit", "asvit", "jmp") or params.get("schedule") == "per_layer":
            assert last is None
        if name == "mixed":
            assert depth - 1 not in {v for k, v in params.items() if k.startswith("override_")}
            assert last is None or last.op == "merge"
        if name == "slim" and depth > 1:  # the pyramid's last step repeats the one before: no sampled keep there
            by = {s.layer: s for s in plan.stages}
            assert f"keep_{depth - 1}" not in params and by.get(depth - 1) == (
                dataclasses.replace(by[depth - 2], layer=depth - 1) if depth - 2 in by else None)
        if name == "slim":  # a pyramid: counts never grow with depth
            counts, current = [], 196
            for stage in plan.stages:
                current = round(current * stage.keep)
                counts.append(current)
            assert counts == sorted(counts, reverse=True)
        # the inverse reproduces the sampled plan
        inverse = space.params_for(plan, depth)
        assert inverse is not None
        assert space.sample(optuna.trial.FixedTrial(inverse), depth) == plan
    # the prefix-only last block is the search's, not the space's: no parameter, never set, ignored by the inverse
    assert not any(p.prefix_only_last or "prefix_only_last" in params for params, p in plans)
    assert all(space.params_for(dataclasses.replace(p, prefix_only_last=True), depth) == space.params_for(p, depth)
               for _, p in plans[:20])


@pytest.mark.parametrize("depth", [1, 2])
def test_slim_pyramids_of_the_shallowest_models(depth):
    """One block: its keep is sampled (it is the only one). Two: block 0's, repeated in block 1."""
    space = get_space("slim")
    for params, plan in _samples(space, 20, depth=depth):
        assert set(params) == {"keep_0"}
        keep = params["keep_0"]
        assert plan.stages == (() if keep == 1.0 else tuple(Stage(layer, "slim", keep=keep) for layer in range(depth)))
        assert space.params_for(plan, depth) == params


@pytest.mark.parametrize("name", sorted(FAMILY_OPS))
def test_presets_of_the_family_are_expressible_and_others_are_not(name):
    space = get_space(name)
    expressible = {p for p, pr in paretoken.PRESETS.items() if space.params_for(pr.plan, 12) is not None}
    assert expressible == EXPRESSIBLE[name]
    for preset in expressible:
        params = space.params_for(paretoken.preset(preset), 12)
        assert space.sample(optuna.trial.FixedTrial(params), 12) == paretoken.preset(preset)
        # a study that enqueues these params gets exactly the preset
        study = optuna.create_study()
        study.enqueue_trial(params)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no out-of-range warning for enqueued params
            trial = study.ask()
            assert space.sample(trial, 12) == paretoken.preset(preset)
    # 12-block presets do not fit a 6-block model
    assert space.params_for(paretoken.preset("evit-0.7"), 6) is None
    # every space can express the uncompressed model
    assert space.sample(optuna.trial.FixedTrial(space.params_for(Plan(), 12)), 12) == Plan()


def test_tome_schedules():
    tome = get_space("tome")
    linear = {"schedule": "linear", "r_first": 0, "r_last": 22}
    ramp = tome.sample(optuna.trial.FixedTrial(linear), 12)
    assert [s.r for s in ramp.stages] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]  # block 0 has r = 0: no stage
    assert tome.params_for(ramp, 12) == linear
    per_layer = {"schedule": "per_layer", **{f"r_{i}": i % 3 for i in range(11)}}  # no r_11: moot
    plan = tome.sample(optuna.trial.FixedTrial(per_layer), 12)
    assert [(s.layer, s.r) for s in plan.stages] == [(i, i % 3) for i in range(11) if i % 3]
    assert tome.params_for(plan, 12) == per_layer
    assert tome.params_for(Plan((Stage(3, "merge", r=2), Stage(11, "merge", r=5))), 12) is None


def test_mixed_space_overrides_a_tome_ramp():
    mixed = get_space("mixed")
    params = {"r_first": 13, "r_last": 13, "overrides": 2,
              "override_0": 3, "op_3": "prune_fuse", "keep_3": 0.7, "score_3": "head_weighted",
              "override_1": 10, "op_10": "merge", "r_10": 2}
    plan = mixed.sample(optuna.trial.FixedTrial(params), 12)
    assert [(s.layer, s.op, s.r or s.keep) for s in plan.stages] == (
        [(i, "merge", 13) for i in (0, 1, 2)] + [(3, "prune_fuse", 0.7)]
        + [(i, "merge", 13) for i in range(4, 10)] + [(10, "merge", 2), (11, "merge", 13)])
    assert plan.stages[3].score == "head_weighted"
    # a ToMe schedule is a pure base ramp (two parameters), so a sampler finds its neighbours
    assert mixed.params_for(paretoken.preset("tome-r13"), 12) == {"r_first": 13, "r_last": 13, "overrides": 0}
    assert mixed.params_for(plan, 12) == params  # the base that leaves the fewest overrides
    assert mixed.params_for(paretoken.preset("evit-0.7"), 12)["r_first"] == 0
    assert mixed.sample(optuna.trial.FixedTrial(mixed.params_for(plan, 12)), 12) == plan
    # a repeated block overrides once
    assert mixed.sample(optuna.trial.FixedTrial({**params, "override_1": 3}), 12) == Plan(
        tuple(Stage(10, "merge", r=13) if s.layer == 10 else s for s in plan.stages))
    # the last block is not the space's to override (moot under prefix_only_last): such a plan is not expressible
    assert mixed.params_for(Plan((Stage(11, "prune", keep=0.5),)), 12) is None
    # more blocks off every ramp than the space allows: not expressible
    assert mixed.params_for(Plan(tuple(Stage(layer, "prune", keep=0.9) for layer in range(1, 6))), 12) is None


def test_bad_depth_is_one_line_error():
    with pytest.raises(ParetokenError, match="depth"):
        get_space("evit").sample(optuna.trial.FixedTrial({}), 0)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "gp"])
def test_samplers_handle_the_conditional_mixed_space(sampler):
    """Define-by-run with conditional parameters under each multi-objective sampler (synthetic objective)."""
    make = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=0, n_startup_trials=5, multivariate=True, group=True),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=0, population_size=6),
        "gp": lambda: optuna.samplers.GPSampler(seed=0, n_startup_trials=4, warn_independent_sampling=False),
    }[sampler]
    space = get_space("mixed")
    n = 8 if sampler == "gp" else 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TPE's group and multivariate are "experimental"
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=make())
        for _ in range(n):
            trial = study.ask()
            plan = space.sample(trial, 12)
            study.tell(trial, [len(plan.stages), sum(s.keep or 0.5 for s in plan.stages)])
    assert len(study.best_trials) >= 1


def test_plans_of_each_family_apply_to_a_timm_vit():
    torch.manual_seed(0)
    model = build_default_architecture().eval()
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        base = model(images)
        for name in sorted(FAMILY_OPS):
            for params, plan in _samples(get_space(name), 3, seed=1):
                paretoken.apply(model, plan)
                out = model(images)
                assert out.shape == base.shape and torch.isfinite(out).all(), (name, plan.describe())
                counts = paretoken.token_counts(model)
                assert counts.shape == (2, 12)
                assert (counts[:, 1:] <= counts[:, :-1]).all()  # tokens never grow
        paretoken.apply(model, Plan())
        assert torch.equal(model(images), base)


def test_a_plan_of_each_family_applies_to_a_timm_model_by_name():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for name in sorted(FAMILY_OPS):
            _, plan = _samples(get_space(name), 1, seed=2)[0]
            paretoken.apply(model, plan)
            assert torch.isfinite(model(images)).all(), (name, plan.describe())


def test_mixed_without_the_newer_ops_samples_as_before_they_were_registered():
    """``MixedSpace(ops=...)`` restricted to the five ops it had before PiToMe and DiffRate joined asks the
    same parameters with the same distributions, so a study made then goes on with it."""
    from paretoken.spaces.families import MixedSpace

    old = MixedSpace(ops=("prune", "prune_fuse", "merge", "joint", "threshold"))
    assert "pitome" not in old.description and "pitome" in get_space("mixed").description
    ops_asked = set()
    for params, plan in _samples(old, 150, depth=12, seed=5):
        ops_asked |= {v for k, v in params.items() if k.startswith("op_")}
        assert old.params_for(plan, 12) is not None
    assert ops_asked == {"prune", "prune_fuse", "merge", "joint", "threshold"}
    pitome = Plan((Stage(2, "pitome", r=4, margin=0.5),))
    assert old.params_for(pitome, 12) is None and get_space("mixed").params_for(pitome, 12) is not None
    with pytest.raises(ParetokenError, match="ops: slim is invalid; valid: a list without repeats of prune, "):
        MixedSpace(ops=("merge", "slim"))
